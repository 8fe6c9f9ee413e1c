"""``halludec speed``: the cost of every strategy against plain ``model.generate`` on the same inputs.

Random-weight LLaVA models with real shapes are built from configs (no checkpoint needed): ``cpu-medium`` (CLIP
336 px / patch 14 -> 576 image tokens, 2 x 64 vision; Llama 8 layers x 256 hidden x 8 heads, MLP 512, vocab
32064; a ~600-token prompt), ``llava-1.5-7b`` (the real shape, bf16, for a GPU) and ``tiny`` (tests). A checkpoint
can be given instead (``--model``). Each configuration is timed in interleaved repetitions (median): the prefill
(``max_new_tokens=1``) and 64 forced tokens; time per token = (total - prefill) / (new tokens - 1). Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU, and the process's peak RSS on CPU measured in a fresh subprocess per
configuration.

``cache="static"`` times every configuration, plain ``generate`` included, with ``cache_implementation="static"``
(on a GPU ``generate`` then compiles the decoding step), so ratios compare like with like. Each strategy is built
once and reused, and the warm-up runs the full token count, so the timed runs reuse the compiled step.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

SHAPES = ("cpu-medium", "llava-1.5-7b", "tiny")
CACHES = ("default", "static")
DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def default_strategies() -> list[str]:
    """``none`` and every registered strategy that keeps ``generate``'s own search, in registry order.

    A strategy that owns the search (OPERA's beam search) is timed only when named, against plain beam search.
    """
    from halludec.decoding import STRATEGIES

    return ["none", *(name for name, cls in STRATEGIES.items() if name != "none" and not cls.owns_search)]


QUESTION = "Is there a red umbrella next to the bench?"

# VAR needs sink dimensions; random weights have no massive activations, so the speed run forces a sink set
# (low threshold on a few dimensions) to time the redistribution path itself.
SPEED_OVERRIDES: dict[str, dict[str, Any]] = {"var": {"sink_dims": (0, 1, 2, 3), "sink_tau": 1.5}}


@dataclass
class Timing:
    """One configuration's medians."""

    total_s: float
    prefill_s: float
    per_token_s: float
    peak_mem_mb: float | None = None


# (LlamaConfig sizes, CLIPVisionConfig sizes) of each LLaVA shape; CLIP 336 px / patch 14 -> 576 image tokens.
SHAPE_SIZES: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "cpu-medium": (
        {
            "hidden_size": 256,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "intermediate_size": 512,
        },
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 64,
        },
    ),
    "llava-1.5-7b": (
        {
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "intermediate_size": 11008,
        },
        {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "projection_dim": 768,
        },
    ),
}


def shape_config(shape: str, image_token_id: int = 32000, **token_ids: int) -> Any:
    """The ``LlavaConfig`` of a named shape (``cpu-medium`` or ``llava-1.5-7b``; vocab 32064).

    Args:
        shape: A key of :data:`SHAPE_SIZES`.
        image_token_id: Id of the ``<image>`` token.
        **token_ids: ``pad_token_id`` / ``bos_token_id`` / ``eos_token_id`` for the text config.

    Returns:
        The config (build the model on the meta device to inspect a shape without memory).
    """
    import transformers as tf

    text, vision = SHAPE_SIZES[shape]
    return tf.LlavaConfig(
        text_config=tf.LlamaConfig(**text, vocab_size=32064, **token_ids),
        vision_config=tf.CLIPVisionConfig(**vision, image_size=336, patch_size=14),
        image_token_index=image_token_id,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def resolve_device(device: str | None) -> str:
    """``"auto"``/None -> ``"cuda"`` when available else ``"cpu"``; ``"cuda"`` without a GPU is a clear error."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} was asked for, but torch sees no CUDA device; use --device cpu.")
    return device


def resolve_dtype(dtype: str | None, shape: str, device: str) -> Any:
    """The torch dtype: ``"auto"``/None -> bfloat16 for the 7B shape or on a GPU, else float32."""
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if shape == "llava-1.5-7b" or device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is unknown; choose one of auto, {', '.join(DTYPES)}.")
    return getattr(torch, DTYPES[dtype])


def build_shape(shape: str, seed: int = 0, device: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
    """A random-weight LLaVA of the given shape and a matching offline processor.

    Args:
        shape: One of ``SHAPES``.
        seed: Weight seed.
        device: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``), or ``"auto"``/None (CUDA when available).
        dtype: A key of :data:`DTYPES`, or ``"auto"``/None (bfloat16 for the 7B shape or on a GPU, else float32).

    Returns:
        ``(model, processor)``.
    """
    import torch
    import transformers as tf

    from halludec import _tiny_processors as tp
    from halludec.tiny import build_tiny

    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r} is unknown; choose one of {', '.join(SHAPES)}.")
    device = resolve_device(device)
    if shape == "tiny":
        model, processor = build_tiny("llava", seed=seed)
        return model.to(device=device, dtype=resolve_dtype(dtype, shape, device)), processor
    tok = tp.byte_level_tokenizer("<s>", "</s>", {"image_token": "<image>"})
    size = 336
    processor = tf.LlavaProcessor(
        image_processor=tf.CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tp.LLAVA_TEMPLATE,
    )
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = shape_config(shape, image_token_id=tok.image_token_id, **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.LlavaForConditionalGeneration(config).to(resolve_dtype(dtype, shape, device)).eval()
    model.set_attn_implementation("sdpa")
    for name, value in ids.items():
        setattr(model.generation_config, name, value)
    return model.to(device), processor


def make_inputs(model: Any, processor: Any, batch_size: int = 1) -> Any:
    """``batch_size`` rows of one random image and :data:`QUESTION` (left-padded chat-template inputs)."""
    import numpy as np
    from PIL import Image

    from halludec.vlm_adapters.inputs import chat_inputs

    side = processor.image_processor.crop_size["height"]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(batch_size)]
    return chat_inputs(processor, images, [QUESTION] * batch_size, model.device)


def _strategy(name: str, model: Any) -> Any:
    import halludec

    base = name.partition(":")[0]
    return halludec.get_strategy(name, model=model, **SPEED_OVERRIDES.get(base, {}))


def _run(model: Any, processor: Any, inputs: Any, strategy: Any, new_tokens: int, cache: str = "default") -> float:
    """Seconds of one ``generate`` call (plain when ``strategy`` is None; a name or a built ``Strategy``)."""
    import torch

    import halludec

    if cache not in CACHES:
        raise ValueError(f"--cache {cache!r} is unknown; choose one of {', '.join(CACHES)}.")
    kw: dict[str, Any] = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    if cache == "static":
        kw["cache_implementation"] = "static"
    if isinstance(strategy, str):
        strategy = _strategy(strategy, model)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        if strategy is None:
            model.generate(**inputs, **kw)
        else:
            halludec.generate(
                model,
                inputs,
                strategy,
                processor=processor,
                questions=[QUESTION] * len(inputs["input_ids"]),
                **kw,
            )
    sync()
    return time.perf_counter() - start


def measure(
    model: Any,
    processor: Any,
    strategies: list[str],
    new_tokens: int = 64,
    repeats: int = 5,
    batch_size: int = 1,
    cache: str = "default",
) -> dict[str, Timing]:
    """Interleaved timings (median of ``repeats``) of plain generate (key ``"baseline"``) and each strategy.

    Args:
        model: The model.
        processor: Its processor.
        strategies: Strategy names (``name`` or ``name:preset``).
        new_tokens: Forced new tokens per timed call.
        repeats: Interleaved repetitions (the median is kept).
        batch_size: Rows per call.
        cache: ``"default"`` (dynamic cache) or ``"static"`` (``cache_implementation="static"`` for every
            configuration, the baseline included).

    Returns:
        ``{"baseline": Timing, name: Timing, ...}``.
    """
    import warnings

    import torch

    inputs = make_inputs(model, processor, batch_size)
    names: list[str | None] = [None, *strategies]
    built = {n: None if n is None else _strategy(n, model) for n in names}  # reused: no recompiles between calls
    totals: dict[str | None, list[float]] = {n: [] for n in names}
    prefills: dict[str | None, list[float]] = {n: [] for n in names}
    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    limit = getattr(config, key)
    setattr(config, key, max(limit, 4 * len(names)))  # one compiled decoding step per configuration (static cache)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in names:  # warm-up at the timed length: the static cache (and compiled step) keep its size
                _run(model, processor, inputs, built[name], new_tokens if cache == "static" else 2, cache)
            for _ in range(repeats):
                for name in names:
                    prefills[name].append(_run(model, processor, inputs, built[name], 1, cache))
                    totals[name].append(_run(model, processor, inputs, built[name], new_tokens, cache))
    finally:
        setattr(config, key, limit)
    out = {}
    for name in names:
        # Per token: median of each repetition's (total - prefill), paired so the two calls share the machine's
        # load; timer noise can push a difference below zero on tiny models, which reads as 0 (below resolution).
        steps = [max(0.0, t - p) / max(1, new_tokens - 1) for t, p in zip(totals[name], prefills[name], strict=True)]
        out[name or "baseline"] = Timing(
            statistics.median(totals[name]), statistics.median(prefills[name]), statistics.median(steps)
        )
    return out


def load(source: str, device: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
    """A shape name (``SHAPES``) -> random-weight model; anything else -> ``from_pretrained`` checkpoint.

    Args:
        source: A shape name or a checkpoint (HF id or folder).
        device: ``"cpu"``, ``"cuda"``, or ``"auto"``/None.
        dtype: A key of :data:`DTYPES`, or ``"auto"``/None.

    Returns:
        ``(model, processor)``.
    """
    if source in SHAPES:
        return build_shape(source, device=device, dtype=dtype)
    from halludec.cli import load_model

    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    name = "auto" if dtype in (None, "auto") else short.get(DTYPES.get(dtype, dtype), dtype)
    return load_model(source, name, device or "auto")


def peak_memory_mb(
    source: str,
    name: str | None,
    new_tokens: int,
    batch_size: int,
    cache: str = "default",
    device: str | None = None,
    dtype: str | None = None,
) -> float:
    """Peak memory (MB) of one generate call in a fresh process (CPU: peak RSS; CUDA: max allocated)."""
    code = (
        "import json, resource, sys, torch\n"
        "from halludec.speed import load, make_inputs, _run\n"
        f"model, processor = load({source!r}, {device!r}, {dtype!r})\n"
        f"inputs = make_inputs(model, processor, {batch_size})\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"_run(model, processor, inputs, {name!r}, {new_tokens}, {cache!r})\n"
        "if model.device.type == 'cuda':\n"
        "    print(json.dumps(torch.cuda.max_memory_allocated() / 2**20))\n"
        "else:\n"
        "    print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {name or 'baseline'} failed: {proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1]))


def report(timings: dict[str, Timing]) -> dict[str, Any]:
    """The JSON document of the issue: baseline figures and, per strategy, ratios to it."""
    base = timings["baseline"]
    strategies = {}
    for name, t in timings.items():
        if name == "baseline":
            continue
        strategies[name] = {
            "ratio": t.total_s / base.total_s,
            "prefill_s": t.prefill_s,
            "per_token_s": t.per_token_s,
            "total_s": t.total_s,
            "peak_mem_mb": t.peak_mem_mb,
            "peak_mem_ratio": (t.peak_mem_mb / base.peak_mem_mb) if t.peak_mem_mb and base.peak_mem_mb else None,
        }
    return {"baseline": asdict(base), "strategies": strategies}


def format_table(doc: dict[str, Any]) -> str:
    """A markdown table of the report."""
    base = doc["baseline"]
    lines = [
        "| strategy | time ratio | prefill s | per token ms | peak mem ratio |",
        "|---|---|---|---|---|",
        f"| plain generate | 1.00 | {base['prefill_s']:.3f} | {1000 * base['per_token_s']:.1f} | 1.00 |",
    ]
    for name, s in doc["strategies"].items():
        mem = f"{s['peak_mem_ratio']:.2f}" if s["peak_mem_ratio"] else "-"
        lines.append(f"| {name} | {s['ratio']:.2f} | {s['prefill_s']:.3f} | {1000 * s['per_token_s']:.1f} | {mem} |")
    return "\n".join(lines)
