"""`halludec speed`: the report's structure on a tiny model (correctness only, no timing assertions)."""

from __future__ import annotations

import json

import pytest

from halludec import speed
from halludec.cli import main


def test_measure_and_report_on_tiny():
    model, processor = speed.build_shape("tiny")
    timings = speed.measure(model, processor, ["none", "vcd"], new_tokens=3, repeats=1)
    doc = speed.report(timings)
    assert set(doc["strategies"]) == {"none", "vcd"}
    for entry in doc["strategies"].values():
        assert entry["ratio"] > 0
        assert entry["per_token_s"] >= 0
    assert "| vcd |" in speed.format_table(doc)


def test_per_token_time_pairs_repetitions_and_never_goes_negative(monkeypatch):
    """Per-token time is the median of each repetition's (total - prefill) over the new tokens; a repetition whose
    one-token call took longer than the full call (timer noise on tiny models) counts as 0, not negative."""
    model, processor = speed.build_shape("tiny")
    # Calls per repetition: prefill (1 token) then total (5 tokens); warm-up first (2 tokens).
    fake = {1: iter([0.50, 0.10, 0.10]), 5: iter([0.40, 0.90, 0.50]), 2: iter([0.0])}
    monkeypatch.setattr(speed, "_run", lambda m, p, i, s, n, c="default": next(fake[n]))
    timing = speed.measure(model, processor, [], new_tokens=5, repeats=3)["baseline"]
    # Differences: -0.10 -> 0, 0.80, 0.40 -> per token 0, 0.2, 0.1 -> median 0.1.
    assert timing.per_token_s == pytest.approx(0.1)
    assert timing.total_s == pytest.approx(0.5)
    assert timing.prefill_s == pytest.approx(0.1)


@pytest.mark.slow
def test_speed_cli_writes_json_with_memory(tmp_path, capsys):
    out = tmp_path / "speed.json"
    argv = ["speed", "--shape", "tiny", "--strategies", "none,pai", "--new-tokens", "3", "--repeats", "1"]
    assert main([*argv, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"baseline", "strategies", "setup"}
    assert doc["strategies"]["pai"]["peak_mem_ratio"] > 0
    assert "plain generate" in capsys.readouterr().out


def test_bad_strategy_name_fails_before_building(capsys):
    assert main(["speed", "--shape", "tiny", "--strategies", "none,vhrr", "--no-memory"]) == 2
    assert "Unknown strategy 'vhrr'" in capsys.readouterr().err


def test_medium_shape_has_576_image_tokens():
    model, processor = speed.build_shape("cpu-medium")
    inputs = speed.make_inputs(model, processor)
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == 576
    assert 590 <= inputs["input_ids"].shape[1] <= 650


@pytest.mark.parametrize("name", ["pai", "paint", "gift", "var"])
def test_last_row_fast_path_equals_the_all_rows_reference(name):
    """Strategies that edit only the last query row (or, VAR, the rows after the image) give the same output as with
    every row computed explicitly."""
    import torch

    import halludec
    from halludec.decoding import STRATEGIES
    from halludec.tiny import tiny_batch
    from tests.conftest import QUESTIONS, tiny

    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    cls = STRATEGIES.get(name)

    class AllRows(cls):
        """Every row explicit (the eager reference); the strategy's edit still applied to the last row only."""

        def attention_rows_for(self, layer, call):
            return "all"

        if cls.edit_scores is not halludec.decoding.Strategy.edit_scores:

            def edit_scores(self, scores, ctx):
                last = cls.edit_scores(self, scores[:, :, -1:], ctx)  # [B, H, 1, K]
                return torch.cat([scores[:, :, :-1], last], dim=2)

    kw = {
        "max_new_tokens": 5,
        "min_new_tokens": 5,
        "do_sample": False,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    active = {
        "pai": {"alpha": 1.0},
        "paint": {"alpha_local": 1.0},
        "gift": {"alpha": 5.0},
        "var": {"sink_dims": (0, 1, 2, 3), "sink_tau": 1.5, "sink_keep_frac": 0.0},
    }[name]
    if name == "var":  # a row range: only rows after the earliest last image token are explicit at the prefill
        with halludec.apply(model, halludec.get_strategy(name, **active), batch, processor=processor) as call:
            image_end = int(call.image_mask.float().cumsum(-1).argmax(-1).min()) + 1
            assert {plan.rows for plan in call.plans.values()} == {image_end}
            assert 0 < image_end < batch["input_ids"].shape[1] - 1
    fast = halludec.generate(model, batch, halludec.get_strategy(name, **active), processor=processor, **kw)
    with halludec.apply(model, AllRows(**active), batch, processor=processor) as call:
        assert all(plan.rows == "all" for plan in call.plans.values())
    ref = halludec.generate(model, batch, AllRows(**active), processor=processor, **kw)
    assert torch.equal(fast.sequences, ref.sequences)
    for a, b in zip(fast.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_static_cache_measure_on_tiny():
    """``--cache static``: every configuration, the baseline included, on the static cache (ratios like for like)."""
    model, processor = speed.build_shape("tiny")
    timings = speed.measure(model, processor, ["none", "vcd"], new_tokens=3, repeats=1, cache="static")
    doc = speed.report(timings)
    assert set(doc["strategies"]) == {"none", "vcd"}
    assert all(entry["ratio"] > 0 for entry in doc["strategies"].values())


def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["speed", "--shape", "tiny", "--strategies", "none", "--device", "cuda", "--no-memory"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
