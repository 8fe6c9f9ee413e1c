"""The embedded default: a tiny LLaVA trained on synthetic scenes, and its benchmarks (lab-pope, lab-chair).

``lab_path()`` is the folder that holds the shipped weights, tokenizer and processor (loadable with
``from_pretrained``); ``load_lab()`` loads them. ``python -m halludec.lab.train`` reproduces the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def lab_path() -> Path:
    """The folder of the shipped lab model (``config.json``, ``model.safetensors``, tokenizer, processor).

    Returns:
        The folder, loadable with ``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor``.

    Raises:
        FileNotFoundError: when the package was installed without its data files.
    """
    if not (WEIGHTS_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"The lab model's weights are missing from {WEIGHTS_DIR}. Reinstall halludec with its package data, or "
            f"train them: python -m halludec.lab.train --out {WEIGHTS_DIR}"
        )
    return WEIGHTS_DIR


def model_source(name: str) -> str:
    """What ``--model`` names: ``lab`` -> the lab model's folder; anything else unchanged (HF id or folder)."""
    return str(lab_path()) if name == "lab" else name


def load_lab(device: str = "cpu") -> tuple[Any, Any]:
    """Load the lab model and its processor (float32).

    Args:
        device: Where to put the model.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = lab_path()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype="float32").to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor
