"""Find vision-aware attention heads, save them as a profile, and use the profile in a strategy.

A profile is JSON: the model's config fingerprint, the criterion, a description of the data and a
``[num_layers, num_heads]`` score table. ``vhr``, ``paint`` and ``var`` take ``profile=`` to act on its top heads
(``profile_k`` = share of heads kept), so a head set found once on a dataset is reused across runs.

    python examples/05_head_profile.py                                       # lab model, 16 lab scenes
    python examples/05_head_profile.py --criterion image_attention
    python examples/05_head_profile.py --model llava-hf/llava-1.5-7b-hf --images coco/val2014 --limit 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import halludec
from halludec.cli import load_model
from halludec.heads import HeadProfile, head_set, load_profile, save_profile, score_dataset
from halludec.vlm_adapters.inputs import chat_inputs


def load_images(folder: str | None, limit: int) -> list:
    """The first ``limit`` images of a folder (sorted by name), or held-out lab scenes."""
    from PIL import Image

    if folder:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        return [Image.open(p).convert("RGB") for p in files[:limit]]
    from halludec.lab.bench import VALID_SEED_BASE, held_out_scenes

    # validation scenes: not the benchmark's held-out scenes, so a profile never sees the test images
    return [Image.fromarray(s.render()) for s in held_out_scenes(limit, base=VALID_SEED_BASE)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lab", help="HF id, local folder, or lab (default)")
    parser.add_argument("--images", help="a folder of images (default: lab validation scenes)")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--criterion", default="vhd", help="vhd, image_attention, image_centric, visual_sensitivity")
    parser.add_argument("--question", default="Describe this picture.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="results/example-profile.json")
    args = parser.parse_args()

    model, processor = load_model(args.model)
    images = load_images(args.images, args.limit)
    batches = [
        [(image, args.question) for image in images[i : i + args.batch_size]]
        for i in range(0, len(images), args.batch_size)
    ]
    # [num_layers, num_heads]: the criterion averaged over every image
    scores = score_dataset(model, processor, batches, criterion=args.criterion, progress=False)
    profile = HeadProfile.for_model(
        model, scores, args.criterion, data={"images": args.images or "lab validation scenes", "n": len(images)}
    )
    path = Path(args.out)
    save_profile(profile, path)
    top = head_set(scores, k=0.1)  # the top 10 % of heads, as (layer, head)
    print(f"scores: {tuple(scores.shape)} (layers x heads); top heads: {top}")
    print(f"profile written: {path}")

    # Reuse: load it (the fingerprint is checked against the model) and let VHR reinforce exactly those heads.
    loaded = load_profile(path, model)
    strategy = halludec.get_strategy("vhr", model=model, profile=str(path), profile_k=0.1)
    inputs = chat_inputs(processor, images[:2], [args.question] * 2, model.device)
    out = halludec.generate(model, inputs, strategy, processor=processor, max_new_tokens=24, do_sample=False)
    texts = getattr(processor, "tokenizer", processor).batch_decode(
        out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    print(f"profile criterion: {loaded.criterion}; VHR with the profile's heads:")
    for i, text in enumerate(texts):
        print(f"[{i}] {text.strip()}")


if __name__ == "__main__":
    main()
