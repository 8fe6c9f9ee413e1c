"""Shared fixtures: tiny models of every family, built once per session from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from halludec.tiny import available_tiny_families, build_tiny, tiny_batch  # noqa: E402

REQUIRED_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
QUESTIONS = ["Is there a red cube in the image?", "What is on the table?"]

_CACHE: dict[str, tuple] = {}


def tiny(family: str):
    """(model, processor) for ``family``, built once per test session."""
    if family not in _CACHE:
        model, processor = build_tiny(family, seed=0)
        # One plain call first: transformers installs its output-capturing hooks lazily on the first forward;
        # restoration tests compare against the model as users hold it after that.
        model.generate(**tiny_batch(processor, family, QUESTIONS[:1], seed=0), max_new_tokens=1)
        _CACHE[family] = (model, processor)
    return _CACHE[family]


FAMILIES = available_tiny_families()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model_and_batch(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    return model, processor, batch
