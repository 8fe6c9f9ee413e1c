"""Train the lab model from scratch on CPU: ``python -m halludec.lab.train --out DIR``.

Deterministic for a seed and a thread count (``--threads``; torch's CPU kernels may sum in a different order with
another count). The shipped weights were trained with the defaults; the command and its wall time are recorded in
the folder's ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_SEED_STRIDE = 10**9  # training scene seeds: seed * stride + counter (held-out scenes use EVAL_SEED_BASE+)


def _lr(step: int, steps: int, lr: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def quick_eval(model: Any, processor: Any, n_scenes: int = 150, batch_size: int = 64) -> dict[str, float]:
    """POPE-style accuracy from the first answer token (yes vs no logit) on validation scenes, per split.

    Args:
        model: The lab model.
        processor: Its processor.
        n_scenes: Validation scenes (disjoint from the benchmark's held-out scenes).
        batch_size: Prompts per forward.

    Returns:
        ``{"random": acc, "popular": acc, "adversarial": acc, "yes_adversarial": ratio}`` in percent / ratio.
    """
    import torch

    from halludec.lab.bench import VALID_SEED_BASE, build_lab_pope, held_out_scenes
    from halludec.vlm_adapters.inputs import chat_inputs

    scenes = held_out_scenes(n_scenes, VALID_SEED_BASE)
    questions = build_lab_pope(scenes)
    yes_id = processor.tokenizer.convert_tokens_to_ids("yes")
    no_id = processor.tokenizer.convert_tokens_to_ids("no")
    out: dict[str, float] = {}
    model.eval()
    for split, rows in questions.items():
        correct, yes = 0, 0
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = chat_inputs(processor, [r.load_image() for r in chunk], [r.question for r in chunk])
            with torch.no_grad():
                logits = model(**batch).logits[:, -1]  # [b, V]
            pred_yes = (logits[:, yes_id] > logits[:, no_id]).tolist()
            correct += sum(p == (r.label == "yes") for p, r in zip(pred_yes, chunk, strict=True))
            yes += sum(pred_yes)
        out[split] = 100.0 * correct / len(rows)
        out[f"yes_{split}"] = yes / len(rows)
    model.train()
    return out


def train(
    out: str | Path,
    steps: int = 4000,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 100,
    seed: int = 0,
    threads: int = 1,
    text_layers: int = 4,
    patch_size: int = 16,
    easy_frac: float = 0.15,
    p_caption: float = 0.35,
    eval_every: int = 500,
    log_every: int = 50,
    keep_checkpoints: bool = False,
) -> dict[str, Any]:
    """Train the lab model and save it (weights, tokenizer, processor, ``training.json``) to ``out``.

    Args:
        out: Output folder (loadable with ``from_pretrained`` afterwards).
        steps: Optimiser steps.
        batch_size: Examples per step.
        lr: Peak learning rate (AdamW, linear warm-up, cosine to 0.1x).
        warmup: Warm-up steps.
        seed: Seeds the weights, the scenes and the example choices.
        threads: torch CPU threads (results are deterministic for a given seed and thread count).
        text_layers: Decoder layers.
        patch_size: Vision patch size (64 / patch_size squared image tokens).
        easy_frac: Share of the first steps on easy (fully visible) scenes.
        p_caption: Share of caption examples.
        eval_every: Run :func:`quick_eval` every this many steps (0: never).
        log_every: Print the loss every this many steps.
        keep_checkpoints: Also save the model at every evaluation (``out/checkpoints/step-N``).

    Returns:
        The training record written to ``training.json``.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    from halludec.lab.data import make_batch
    from halludec.lab.model import build_config, build_processor

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    processor = build_processor(patch_size=patch_size)
    model = LlavaForConditionalGeneration(build_config(text_layers=text_layers, patch_size=patch_size))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )
    rng = np.random.Generator(np.random.PCG64([seed, 7]))
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    running = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup, 0.1)
        seeds = [seed * TRAIN_SEED_STRIDE + step * batch_size + i for i in range(batch_size)]
        batch = make_batch(processor, seeds, rng, easy=step < easy_frac * steps, p_caption=p_caption)
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).logits  # [B, L, V]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none"
        )  # [B, L-1]
        loss = (nll * batch.weights[:, 1:]).sum() / batch_size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running += float(loss.detach())
        if log_every and (step + 1) % log_every == 0:
            elapsed = time.perf_counter() - start
            print(
                f"step {step + 1}/{steps} loss {running / log_every:.4f} {elapsed / (step + 1):.3f} s/step", flush=True
            )
            running = 0.0
        if eval_every and (step + 1) % eval_every == 0:
            metrics = quick_eval(model, processor)
            history.append({"step": step + 1, **{k: round(v, 4) for k, v in metrics.items()}})
            print(f"eval step {step + 1}: {history[-1]}", flush=True)
            if keep_checkpoints:
                save(model, processor, Path(out) / "checkpoints" / f"step-{step + 1}", {"step": step + 1})
                model.train()
    wall = time.perf_counter() - start
    record = {
        "command": f"python -m halludec.lab.train --steps {steps} --batch-size {batch_size} --lr {lr} --seed {seed} "
        f"--threads {threads} --text-layers {text_layers} --patch-size {patch_size}",
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "seed": seed,
        "threads": threads,
        "text_layers": text_layers,
        "patch_size": patch_size,
        "easy_frac": easy_frac,
        "p_caption": p_caption,
        "wall_time_s": round(wall, 1),
        "torch": torch.__version__,
        "history": history,
    }
    save(model, processor, out, record)
    return record


def save(model: Any, processor: Any, out: str | Path, record: dict[str, Any]) -> None:
    """Write the model (safetensors), the processor and ``training.json`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m halludec.lab.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--keep-checkpoints", action="store_true", help="save the model at every evaluation too")
    args = p.parse_args(argv)
    train(
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        text_layers=args.text_layers,
        patch_size=args.patch_size,
        eval_every=args.eval_every,
        keep_checkpoints=args.keep_checkpoints,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
