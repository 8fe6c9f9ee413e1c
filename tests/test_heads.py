"""Head scoring (criteria on planted tiny models), sink dimensions, profiles, the `heads` CLI, profile strategies."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

import halludec
from halludec.decoding import vhr as vhr_mod
from halludec.heads import (
    CRITERIA,
    HeadProfile,
    find_sink_dimensions,
    head_mask,
    head_set,
    load_profile,
    save_profile,
    score_dataset,
    score_heads,
    score_rows,
)
from halludec.heads.cli import add_heads_subcommand
from halludec.heads.criteria import _LastRowRecorder
from halludec.tiny import build_tiny, tiny_batch
from tests.conftest import QUESTIONS, tiny
from tests.helpers import assert_same_snapshot, max_score_diff, snapshot

KW = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
SCORES = {"output_scores": True, "return_dict_in_generate": True}
TXT_DIM, IMG_DIM = 63, 62  # hidden dimensions reserved for the planted image-attention head
SINK_DIMS = (5, 17)


def _plant_image_head(model, layer: int = 2, head: int = 2, c: float = 0.05, strength: float = 30.0) -> None:
    """Make head ``head`` of ``layer`` attend (almost) only to image tokens, by setting weights.

    Construction: two hidden dimensions are reserved and kept constant through the residual stream: ``TXT_DIM`` = c
    on every token (embedding column and projector bias) and ``IMG_DIM`` = c on image tokens only (projector bias;
    0 in the embedding table). No layer reads or writes them (their q/k/v/gate/up columns and o/down rows are zeroed),
    except the planted head: its query gets ``strength * norm(x)[TXT_DIM]`` and its key-value head's key gets
    ``strength * norm(x)[IMG_DIM]`` in the last rotary pair of the head, whose RoPE frequency (1e4^(-14/16) rad per
    position) barely rotates over a ~60-token prompt. So every query has a large positive component there and only
    image keys match it: the logit ``q.k * d^-0.5`` is ~+50 on image keys and ~0 on text keys, and the softmax puts
    ~all the mass on the image. The other query head sharing that key-value head (GQA) gets that query component
    zeroed, so it ignores the planted key.
    """
    adapter = halludec.get_adapter(model)
    d = adapter.dims
    group = d.num_heads // d.num_kv_heads
    kv = head // group
    rope = d.head_dim // 2 - 1  # last rotary pair (lowest frequency)
    reserved = [TXT_DIM, IMG_DIM]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # [V, D]
        emb[:, TXT_DIM], emb[:, IMG_DIM] = c, 0.0
        proj = model.model.multi_modal_projector.linear_2
        proj.weight[reserved] = 0.0
        proj.bias[reserved] = c
        for block in adapter.layers:
            attn, mlp = block.self_attn, block.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight[:, reserved] = 0.0
            attn.o_proj.weight[reserved] = 0.0
            mlp.down_proj.weight[reserved] = 0.0
        attn = adapter.layers[layer].self_attn
        for other in range(kv * group, (kv + 1) * group):
            attn.q_proj.weight[other * d.head_dim + rope] = 0.0
        attn.q_proj.weight[head * d.head_dim + rope, TXT_DIM] = strength
        attn.k_proj.weight[kv * d.head_dim + rope] = 0.0
        attn.k_proj.weight[kv * d.head_dim + rope, IMG_DIM] = strength


def _plant_sinks(model, batch):
    """Pre-hook on layer 0 adding a massive activation in SINK_DIMS at each row's first token and one image token."""
    adapter = halludec.get_adapter(model)
    first = batch["attention_mask"].argmax(-1).tolist()
    image_pos = [int(torch.nonzero(m)[3]) for m in adapter.image_mask(batch["input_ids"])]

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != batch["input_ids"].shape[1]:
            return None
        h = hidden.clone()
        for b in range(h.shape[0]):
            for pos in (first[b], image_pos[b]):
                h[b, pos, SINK_DIMS[0]] += 1000.0
                h[b, pos, SINK_DIMS[1]] -= 1000.0
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    return adapter.layers[0].register_forward_pre_hook(hook, with_kwargs=True), first, image_pos


def _profile(model, table, path, criterion="vhd"):
    profile = HeadProfile.for_model(model, torch.tensor(table, dtype=torch.float32), criterion, data="synthetic")
    save_profile(profile, path)
    return profile


# ----------------------------------------------------------------------------------------------------- criteria
def test_planted_image_head_ranks_first_for_image_attention():
    model, processor = build_tiny("llava")
    _plant_image_head(model, layer=2, head=2)
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    model.generate(**batch, max_new_tokens=1)  # transformers installs its output-capturing hooks on first use
    before = snapshot(model)
    scores = score_heads(model, batch, "image_attention")
    assert scores.shape == (4, 4)
    assert head_set(scores, 1) == [(2, 2)]
    assert scores[2, 2] > 0.99
    others = torch.cat([scores.flatten()[:10], scores.flatten()[11:]])
    assert others.max() < 0.5  # random heads spread attention (~0.3 on the 25 of ~60 tokens that are image)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_padded_batch_scores_equal_single_rows(family):
    model, processor = tiny(family)
    batch = tiny_batch(processor, family, QUESTIONS, seed=0)
    singles = [tiny_batch(processor, family, [q], seed=0, image_seed_offset=row) for row, q in enumerate(QUESTIONS)]
    for criterion in ("vhd", "image_attention"):
        rows = score_rows(model, batch, criterion)  # [2, L, H]
        for row, single in enumerate(singles):
            torch.testing.assert_close(rows[row], score_rows(model, single, criterion)[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(score_heads(model, batch, criterion), rows.mean(0))


def test_vhd_is_zero_for_an_image_independent_head():
    """Zeroed v_proj rows of key-value head 0 in layer 1: query heads 0 and 1 (GQA pair) output 0 with and without
    the image, so their VHD (and visual sensitivity) is exactly 0; every other head depends on the image."""
    model, processor = build_tiny("llava")
    adapter = halludec.get_adapter(model)
    head_dim = adapter.dims.head_dim
    with torch.no_grad():
        adapter.layers[1].self_attn.v_proj.weight[:head_dim] = 0.0
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    vhd = score_heads(model, batch, "vhd")
    assert vhd[1, :2].tolist() == [0.0, 0.0]
    assert (vhd[1, 2:] > 1e-3).all()
    assert (vhd[[0, 2, 3]] > 1e-3).all()
    sens = score_heads(model, batch, "visual_sensitivity")
    assert sens[1, :2].tolist() == [0.0, 0.0]
    assert (sens[[0, 2, 3]] > 0).all()
    # the criterion is VHR's raw VHD: VHR with alpha 1 (nothing reinforced) measures the same per row
    with halludec.apply(model, halludec.get_strategy("vhr", alpha=1.0, layers=(1, 3)), batch) as call:
        per_row = call.state["vhr_vhd"]
    for layer in (1, 3):
        torch.testing.assert_close(vhd[layer], per_row[layer].mean(0).cpu(), atol=1e-5, rtol=1e-4)


def test_sink_dimensions_and_image_centric_on_planted_model():
    model, processor = build_tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    with pytest.warns(UserWarning, match="equal image_attention"):
        no_sinks = score_heads(model, batch, "image_centric")
    torch.testing.assert_close(no_sinks, score_heads(model, batch, "image_attention"), atol=0, rtol=0)
    handle, first, image_pos = _plant_sinks(model, batch)
    try:
        report = find_sink_dimensions(model, batch, tau=4.0)  # two dims of 1000 in 64: |x/RMS| ~ 5.7
        visual = score_heads(model, batch, "image_attention")
        centric = score_heads(model, batch, "image_centric", sink_tau=4.0)  # dims found by the finder
        given = score_heads(model, batch, "image_centric", sink_dims=list(SINK_DIMS), sink_tau=4.0)
        unrelated = score_heads(model, batch, "image_centric", sink_dims=[0], sink_tau=4.0)
    finally:
        handle.remove()
    assert report.dims == list(SINK_DIMS)
    for layer in range(4):
        for row in range(2):
            assert {first[row], image_pos[row]} <= set(report.sink_tokens[layer][row])
    torch.testing.assert_close(centric, given)
    assert (centric <= visual + 1e-6).all()
    assert (visual - centric).max() > 1e-3  # the planted image sink's attention is not counted
    torch.testing.assert_close(unrelated, visual)  # no token is massive in dim 0: no sinks
    with pytest.raises(ValueError, match="sink_dims"):
        score_heads(model, batch, "image_centric", sink_dims=[64])


def test_score_dataset_and_errors():
    model, processor = tiny("llava")
    pair = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    one = tiny_batch(processor, "llava", QUESTIONS[:1], seed=0, image_seed_offset=5)
    expected = (2 * score_heads(model, pair, "vhd") + score_heads(model, one, "vhd")) / 3
    torch.testing.assert_close(score_dataset(model, processor, [pair, one], "vhd", progress=True), expected)
    rng = np.random.default_rng(0)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)) for _ in range(3)]
    samples = [[(images[0], "What is this?"), (images[1], "Describe it.")], [(images[2], "Colours?")]]
    scores = score_dataset(model, processor, samples, "image_attention", progress=False)
    assert scores.shape == (4, 4)
    assert ((scores > 0) & (scores < 1)).all()
    with pytest.raises(KeyError, match="Did you mean 'vhd'"):
        score_heads(model, pair, "vhdd")
    assert set(CRITERIA.names()) == {"vhd", "image_attention", "image_centric", "visual_sensitivity"}
    text_only = halludec.get_adapter(model).text_only_inputs(pair)
    with pytest.raises(ValueError, match="needs image tokens"):
        score_heads(model, text_only, "vhd")


# ----------------------------------------------------------------------------------------------------- profiles
def test_profile_round_trip_and_head_sets(tmp_path):
    model, _ = tiny("llava")
    table = [[0.1, 0.9, 0.2, 0.3], [0.5, 0.5, 0.0, 0.4], [0.05, 0.6, 0.7, 0.8], [0.2, 0.2, 0.2, 1.5]]
    path = tmp_path / "sub" / "p.json"
    profile = _profile(model, table, path)
    raw = json.loads(path.read_text())  # plain JSON
    assert raw["scores"] == table
    assert raw["model_type"] == "llava"
    assert raw["config_fingerprint"] == halludec.get_adapter(model).config_fingerprint()
    assert raw["halludec_version"] == halludec.__version__
    assert (raw["num_layers"], raw["num_heads"], raw["criterion"]) == (4, 4, "vhd")
    loaded = load_profile(path, model)
    assert loaded == profile
    assert load_profile(str(path)) == profile
    # top-k over all heads, best first: k = 10 % of 16 heads -> 2
    assert head_set(loaded) == [(3, 3), (0, 1)]
    assert head_set(loaded, 3) == [(3, 3), (0, 1), (2, 3)]
    assert head_set(loaded, 0.25) == [(3, 3), (0, 1), (2, 3), (2, 2)]
    # VHR's per-layer rule: strictly above the layer's (lower) median; ties at the median are out
    expected = [(0, 1), (0, 3), (1, 0), (1, 1), (2, 2), (2, 3), (3, 3)]  # layer 3: the three 0.2 ties are out
    assert sorted(head_set(loaded, rule="above_median")) == expected
    mask = head_mask(loaded, 4, 4)
    assert mask.dtype == torch.bool
    assert torch.nonzero(mask).tolist() == [[0, 1], [3, 3]]
    assert head_mask([(1, 2)], 4, 4).sum() == 1
    for bad in (0, 1.5, -1, True):
        with pytest.raises(ValueError, match="k="):
            head_set(loaded, bad)
    with pytest.raises(ValueError, match="rule="):
        head_set(loaded, rule="best")
    with pytest.raises(ValueError, match="outside a model"):
        head_mask([(4, 0)], 4, 4)


def test_mismatched_and_malformed_profiles(tmp_path):
    llava, _ = tiny("llava")
    qwen, _ = tiny("qwen2_vl")
    path = tmp_path / "llava.json"
    _profile(llava, [[0.0] * 4] * 4, path)
    with pytest.raises(ValueError, match=r"made for .*llava.* used with .*qwen2_vl.*halludec heads --model"):
        load_profile(path, qwen)  # same 4 x 4 shape, another family: the fingerprint differs
    raw = json.loads(path.read_text())
    raw.update(num_layers=5, scores=[[0.0] * 4] * 5)
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"5 layers x 4 heads.*4 layers x 4 heads.*layers/heads differ"):
        load_profile(path, llava)
    raw.update(scores=[[0.0] * 4] * 4)
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="malformed score table"):
        load_profile(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_profile(path)
    path.write_text(json.dumps({"model": "x"}))
    with pytest.raises(ValueError, match="lacks the field"):
        load_profile(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_profile(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------------------- CLI
def _heads_parser():
    parser = argparse.ArgumentParser(prog="halludec")
    add_heads_subcommand(parser.add_subparsers(dest="command"))
    return parser


def test_cli_writes_profile_and_heatmap(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib", reason="the heatmap needs the bench extra (matplotlib)")
    from PIL import Image

    model, processor = build_tiny("llava")
    model_dir, data = tmp_path / "model", tmp_path / "images"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(data / f"img{i}.png")
    (data / "notes.txt").write_text("not an image")
    out, plot = tmp_path / "profile.json", tmp_path / "heads.png"
    argv = ["heads", "--model", str(model_dir), "--criterion", "vhd", "--data", str(data), "--limit", "2"]
    argv += ["--batch-size", "2", "--out", str(out), "--plot", str(plot), "--top-k", "3", "--no-progress"]
    args = _heads_parser().parse_args(argv)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "top 3 heads by vhd (mean over 2 images)" in printed
    profile = load_profile(out, model)
    assert profile.criterion == "vhd"
    assert profile.data["n_images"] == 2
    assert profile.data["question"] == "Describe the image."
    assert profile.tensor().shape == (4, 4)
    assert (profile.data["dtype"], profile.data["device"]) == ("float32", "cpu")  # loaded as `halludec run` loads
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = head_set(profile, 3)
    assert f"layer {best[0][0]:>3}  head {best[0][1]:>3}" in printed

    monkeypatch.setattr("halludec.heads.plot.has_matplotlib", lambda: False)
    assert args.func(args) == 2
    assert "halludec[bench]" in capsys.readouterr().err
    args = _heads_parser().parse_args(["heads", "--model", "x", "--data", str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="is not a folder"):
        args.func(args)


# ------------------------------------------------------------------------------------------ strategies + profiles
def test_vhr_with_profile_uses_exactly_the_profile_heads(tmp_path, monkeypatch):
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    table = torch.zeros(4, 4)
    table[1, 2], table[3, 0], table[0, 1] = 5.0, 4.0, 3.0
    path = tmp_path / "vhd.json"
    _profile(model, table.tolist(), path)

    def no_lockstep(*args, **kwargs):
        raise AssertionError("fixed VHR must not run the lockstep pass")

    monkeypatch.setattr(vhr_mod, "lockstep_prefill", no_lockstep)
    before = snapshot(model)
    strategy = halludec.get_strategy("vhr", profile=str(path), profile_k=0.125)  # 2 of 16 heads
    with halludec.apply(model, strategy, batch) as call:
        scales = {layer: s.tolist() for layer, s in call.state["vhr_scale"].items()}
        assert set(call.plans) == {1, 3}
    assert scales == {1: [[1.0, 1.0, 2.0, 1.0]] * 2, 3: [[2.0, 1.0, 1.0, 1.0]] * 2}
    with halludec.apply(model, halludec.get_strategy("vhr", profile=path, profile_k=0.125, layers=(3,)), batch) as call:
        assert set(call.state["vhr_scale"]) == {3}
    plain = model.generate(**batch, **KW, **SCORES)
    fixed = halludec.generate(model, batch, strategy, **KW, **SCORES)
    assert max_score_diff(plain, fixed) > 1e-4
    neutral = halludec.generate(
        model, batch, halludec.get_strategy("vhr", profile=str(path), alpha=1.0), **KW, **SCORES
    )
    assert torch.equal(plain.sequences, neutral.sequences)
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(ValueError, match="profile_k"):
        halludec.get_strategy("vhr", profile=str(path), profile_k=0.0)
    qwen, qwen_processor = tiny("qwen2_vl")
    with pytest.raises(ValueError, match="made for"):
        halludec.generate(qwen, tiny_batch(qwen_processor, "qwen2_vl", QUESTIONS[:1]), strategy, max_new_tokens=1)


def _recorded(model, batch, strategies):
    recorder = _LastRowRecorder(range(4))
    with halludec.apply(model, [*strategies, recorder], batch), torch.no_grad():
        model(**batch, position_ids=halludec.get_adapter(model).position_ids_for(batch), use_cache=False)
    return torch.stack([recorder.visual[layer] for layer in range(4)], dim=1)  # [B, L, H]


def _changed_heads(model, batch, strategy):
    """(layer, head) pairs whose last-row image share moves when ``strategy`` runs before the recorder."""
    diff = (_recorded(model, batch, [strategy]) - _recorded(model, batch, [])).abs().amax(0)  # [L, H]
    return sorted(map(tuple, torch.nonzero(diff > 1e-6).tolist()))


def test_paint_with_profile_boosts_only_profile_heads(tmp_path):
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    table = torch.zeros(4, 4)
    table[3, 1], table[3, 2], table[0, 0] = 3.0, 2.0, 1.0  # (0, 0) is below PAINT's first layer (2)
    path = tmp_path / "attn.json"
    _profile(model, table.tolist(), path, criterion="image_attention")
    strategy = halludec.get_strategy("paint", profile=str(path), profile_k=0.1875)  # 3 of 16 heads
    assert _changed_heads(model, batch, strategy) == [(3, 1), (3, 2)]
    assert len(_changed_heads(model, batch, halludec.get_strategy("paint"))) == 8  # without: layers 2 and 3
    with halludec.apply(model, strategy, batch) as call:
        assert set(call.plans) == {3}
    plain = model.generate(**batch, **KW, **SCORES)
    assert max_score_diff(plain, halludec.generate(model, batch, strategy, **KW, **SCORES)) > 1e-5


def test_var_with_profile_redistributes_only_profile_heads(tmp_path):
    model, processor = tiny("llava")
    batch = tiny_batch(processor, "llava", QUESTIONS, seed=0)
    table = torch.zeros(4, 4)
    table[2, 0], table[2, 3], table[0, 1] = 3.0, 2.0, 1.0  # VAR steers layer 2 only on this 4-layer model
    path = tmp_path / "centric.json"
    _profile(model, table.tolist(), path, criterion="image_centric")
    active = {"sink_dims": (0, 1, 2, 3), "sink_tau": 1.5, "sink_keep_frac": 0.0}
    strategy = halludec.get_strategy("var", profile=str(path), profile_k=0.1875, **active)
    changed = _changed_heads(model, batch, strategy)
    assert [pair for pair in changed if pair[0] <= 2] == [(2, 0), (2, 3)]  # layer 3 sees layer 2's new outputs
    without = _changed_heads(model, batch, halludec.get_strategy("var", **active))
    assert len([pair for pair in without if pair[0] == 2]) > 2


def test_cli_on_pope_questions(tmp_path, capsys):
    """`--data` may be a POPE benchmark (question files + --image-dir): its questions are asked about its images."""
    from PIL import Image

    from tests.benchmarks.conftest import POPE_IMAGES, write_pope

    model, processor = build_tiny("llava")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    images = tmp_path / "val2014"
    images.mkdir()
    for k, name in enumerate(POPE_IMAGES):
        Image.new("RGB", (30, 30), (80 * k, 90, 200)).save(images / name)
    pope = write_pope(tmp_path / "pope", splits=("random",))
    out = tmp_path / "profile.json"
    argv = ["heads", "--model", str(model_dir), "--criterion", "image_attention", "--data", str(pope)]
    argv += ["--image-dir", str(images), "--limit", "3", "--batch-size", "2", "--out", str(out), "--no-progress"]
    args = _heads_parser().parse_args(argv)
    assert args.func(args) == 0
    profile = load_profile(out, model)
    assert profile.data["source"] == "pope"
    assert profile.data["n_images"] == 3
    assert "mean over 3 images" in capsys.readouterr().out
