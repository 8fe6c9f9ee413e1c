"""Compose two strategies, and keep calling ``model.generate`` yourself inside ``halludec.apply``.

Composition applies attention-level edits in list order inside each layer they touch, then logits edits in list
order (here: VHR scales vision-aware heads, VCD contrasts the logits with a noised-image branch batched into the
same forward). ``halludec.apply`` is a context manager: the model is restored exactly when it exits, also on error.

    python examples/02_compose_strategies.py                                    # lab model
    python examples/02_compose_strategies.py --model Qwen/Qwen2-VL-7B-Instruct --image photo.jpg \
        --question "Describe this image in detail."
"""

from __future__ import annotations

import argparse

import torch

import halludec
from halludec.cli import load_model
from halludec.vlm_adapters.inputs import chat_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lab", help="HF id, local folder, or lab (default)")
    parser.add_argument("--image", action="append", help="an image file (repeatable); default: 2 lab scenes")
    parser.add_argument("--question", default="Describe this picture.")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    from PIL import Image

    model, processor = load_model(args.model)
    if args.image:
        images = [Image.open(path).convert("RGB") for path in args.image]
    else:
        from halludec.lab.bench import held_out_scenes

        images = [Image.fromarray(scene.render()) for scene in held_out_scenes(2)]
    questions = [args.question] * len(images)
    inputs = chat_inputs(processor, images, questions, model.device)
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    decode = getattr(processor, "tokenizer", processor).batch_decode
    start = inputs["input_ids"].shape[1]

    # 1. A composition is a list; each entry a name, a preset ("pai:repro") or a configured Strategy.
    composed = [halludec.get_strategy("vhr", model=model, alpha=2.0), halludec.get_strategy("vcd", alpha=1.0)]
    out = halludec.generate(model, inputs, composed, processor=processor, questions=questions, **kwargs)
    for i, text in enumerate(decode(out[:, start:], skip_special_tokens=True)):
        print(f"[{i}] vhr+vcd   : {text.strip()}")

    # 2. The context manager: install once, call model.generate as often as you like (same inputs' rows).
    weight = model.get_input_embeddings().weight
    before = weight.detach().clone()
    with halludec.apply(model, ["vhr", "vcd"], inputs, processor=processor, questions=questions):
        greedy = model.generate(**inputs, **kwargs)
        beams = model.generate(**inputs, **kwargs, num_beams=2)
    for i, (g, b) in enumerate(
        zip(
            decode(greedy[:, start:], skip_special_tokens=True),
            decode(beams[:, start:], skip_special_tokens=True),
            strict=True,
        )
    ):
        print(f"[{i}] greedy    : {g.strip()}")
        print(f"[{i}] 2 beams   : {b.strip()}")
    restored = halludec.get_adapter(model).text_config._attn_implementation
    print(f"attention after the block: {restored}; weights unchanged: {torch.equal(before, weight)}")


if __name__ == "__main__":
    main()
