"""Wrap ``model.generate`` with one strategy and show the answers with and without it.

Runs offline on the embedded lab model by default (its own small vocabulary: ask "Describe this picture." or
"Is there a red fork in the image?"); on a GPU pass a real checkpoint and your own images:

    python examples/01_generate_with_strategy.py                       # lab model, 4 held-out lab scenes
    python examples/01_generate_with_strategy.py --strategy vcd --set alpha=0.5
    python examples/01_generate_with_strategy.py --model llava-hf/llava-1.5-7b-hf --image photo.jpg \
        --question "Describe this image in detail." --strategy vhr
"""

from __future__ import annotations

import argparse

import halludec
from halludec.cli import load_model, parse_sets
from halludec.vlm_adapters.inputs import chat_inputs


def load_images(args: argparse.Namespace) -> tuple[list, list[str | None]]:
    """The user's images, or the first held-out lab scenes (PIL images) with what is really in them."""
    from PIL import Image

    if args.image:
        return [Image.open(path).convert("RGB") for path in args.image], [None] * len(args.image)
    from halludec.lab.bench import held_out_scenes

    scenes = held_out_scenes(args.limit)
    return [Image.fromarray(scene.render()) for scene in scenes], [scene.caption() for scene in scenes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lab", help="HF id, local folder, or lab (default)")
    parser.add_argument("--image", action="append", help="an image file (repeatable); default: lab scenes")
    parser.add_argument("--limit", type=int, default=4, help="lab scenes to use when no --image is given")
    parser.add_argument("--question", default="Describe this picture.")
    parser.add_argument("--strategy", default="vhr", help="a strategy name or preset, e.g. vhr, pai:repro")
    parser.add_argument("--set", action="append", default=[], help="strategy field, e.g. --set alpha=2.0")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    model, processor = load_model(args.model)  # from_pretrained; "lab" is the shipped lab model
    images, truths = load_images(args)
    questions = [args.question] * len(images)
    inputs = chat_inputs(processor, images, questions, model.device)  # one left-padded batch, chat template applied
    start = inputs["input_ids"].shape[1]

    # Plain generate, then the same call through halludec. Hyperparameters live on the strategy object;
    # get_strategy(name, model=model) fills in the model's published settings where the paper gives some.
    fields = parse_sets(args.set, [args.strategy])[args.strategy.partition(":")[0]] if args.set else {}
    strategy = halludec.get_strategy(args.strategy, model=model, **fields)
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    plain = model.generate(**inputs, **kwargs)
    steered = halludec.generate(model, inputs, strategy, processor=processor, questions=questions, **kwargs)

    decode = getattr(processor, "tokenizer", processor).batch_decode
    print(f"strategy: {strategy!r}")
    changed = 0
    before = decode(plain[:, start:], skip_special_tokens=True)
    after = decode(steered[:, start:], skip_special_tokens=True)
    for i, (a, b, truth) in enumerate(zip(before, after, truths, strict=True)):
        changed += a.strip() != b.strip()
        if truth is not None:
            print(f"[{i}] in image  : {truth}")
        print(f"[{i}] plain     : {a.strip()}")
        print(f"[{i}] {args.strategy:<10}: {b.strip()}")
    print(f"answers changed: {changed} of {len(images)}")


if __name__ == "__main__":
    main()
