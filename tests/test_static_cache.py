"""The fast path: every strategy on ``cache_implementation="static"`` and under ``torch.compile``.

- Every strategy of the strategy matrix (active config) gives, on the static cache, the tokens it gives on the
  default cache (greedy, batch 2 left-padded): fast on the required families, every tiny family in the slow tier.
- Compiled as ``generate`` compiles a static-cache decoding step on a GPU (here on CPU, backend ``"eager"``): no
  graph break, one graph for every decoding step, and a second call with the same strategy reuses it. Counted with
  torch's own ``torch._dynamo.utils.counters``.
"""

from __future__ import annotations

import pytest
import torch

import halludec
from halludec.tiny import available_tiny_families, build_tiny, tiny_batch
from tests.conftest import QUESTIONS, REQUIRED_FAMILIES, tiny
from tests.test_strategy_matrix import MATRIX, UNSUPPORTED

KW = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "output_scores": True}
NAMES = sorted(MATRIX)
OTHER_FAMILIES = [f for f in available_tiny_families() if f not in REQUIRED_FAMILIES]
FAST_COMPILE = ("pai", "vcd")  # attention edits + a side branch (PAI's CFG); the slow tier compiles every strategy


def _config(name: str) -> dict:
    neutral, active = MATRIX[name]
    return neutral if active is None else active


def _assert_static_equals_default(family: str, name: str) -> None:
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    strategy = halludec.get_strategy(name, **_config(name))
    kw = {**KW, "return_dict_in_generate": True}
    default = halludec.generate(model, batch, strategy, processor=processor, **kw)
    if (name, "static_cache") in UNSUPPORTED:  # declined with a clear error
        with pytest.raises(ValueError, match=UNSUPPORTED[name, "static_cache"]):
            halludec.generate(model, batch, strategy, processor=processor, cache_implementation="static", **kw)
        return
    static = halludec.generate(model, batch, strategy, processor=processor, cache_implementation="static", **kw)
    assert torch.equal(default.sequences, static.sequences)
    for a, b in zip(default.scores, static.scores, strict=True):
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b))
        torch.testing.assert_close(a[finite], b[finite], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_static_cache_equals_default_cache(name, family):
    _assert_static_equals_default(family, name)


@pytest.mark.skipif("gemma3" not in available_tiny_families(), reason="no tiny Gemma3")
@pytest.mark.parametrize("name", ["paint", "vcd"])
def test_static_cache_sliding_window_layers(name):
    """Gemma3's static sliding-window layers (window 16 < prompt): key positions mapped, side rows written."""
    _assert_static_equals_default("gemma3", name)


@pytest.mark.slow
@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_static_cache_equals_default_cache_every_family(name, family):
    _assert_static_equals_default(family, name)


def _compiled_generate(model, batch, strategy, processor, new_tokens: int) -> torch.Tensor:
    """``generate`` on the static cache with the decoding step compiled as on a GPU (backend "eager" on CPU)."""
    from transformers import CompileConfig

    config = CompileConfig(backend="eager", fullgraph=False)
    config._compile_all_devices = True  # transformers' switch to compile on CPU (tests)
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    return halludec.generate(
        model, batch, strategy, processor=processor, cache_implementation="static", compile_config=config, **kw
    )


def _assert_compiles_once(name: str) -> None:
    from torch._dynamo.utils import counters

    model, processor = build_tiny("llava", seed=0)  # its own model: compiling leaves state on it
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    strategy = halludec.get_strategy(name, **_config(name))
    if (name, "static_cache") in UNSUPPORTED:  # declined with a clear error
        with pytest.raises(ValueError, match=UNSUPPORTED[name, "static_cache"]):
            _compiled_generate(model, batch, strategy, processor, 5)
        return
    eager = halludec.generate(model, batch, strategy, processor=processor, max_new_tokens=5, min_new_tokens=5)
    torch._dynamo.reset()
    counters.clear()
    try:
        first = _compiled_generate(model, batch, strategy, processor, 5)  # prefill + 4 compiled decoding steps
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 1  # traced once, reused at every step
        again = _compiled_generate(model, batch, strategy, processor, 5)  # a new call: same graph
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    assert torch.equal(first, eager)
    assert torch.equal(again, eager)


@pytest.mark.parametrize("name", FAST_COMPILE)
def test_compiled_static_step_has_no_graph_break_and_no_recompile(name):
    _assert_compiles_once(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if n not in FAST_COMPILE])
def test_compiled_static_step_every_strategy(name):
    _assert_compiles_once(name)
