"""The model-family adapter: where a VLM keeps its text layers, image tokens and vision tower.

An adapter is mostly data. ``VLMAdapter`` implements everything the supported families share through
transformers' common API (``get_decoder()``, ``layers[i].self_attn.o_proj``, ``config.image_token_id``); a family
file only overrides what differs (the vision tower's attribute, tokens that wrap an image span, position ids).

Everything here runs once per ``generate`` call, before decoding starts, never on the per-step path.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from halludec.vlm_adapters.spans import char_span_to_tokens, contiguous_runs, template_parts

Span = tuple[int, int]
"""A half-open ``[start, end)`` token range in the (left-padded) ``input_ids`` of one row."""


@dataclass(frozen=True)
class ModelDims:
    """Structural sizes of the text backbone.

    Attributes:
        num_layers: Decoder layers.
        num_heads: Query heads per layer (head-level rules apply to these, also under GQA).
        num_kv_heads: Key/value heads per layer.
        head_dim: Size of one head.
        hidden_size: Residual-stream width.
        vocab_size: Output vocabulary size.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


class VLMAdapter:
    """Common access to one loaded vision-language model.

    Subclasses set ``model_types`` (the ``config.model_type`` values they serve) and override the class
    attributes below where their family differs.

    Args:
        model: A loaded ``...ForConditionalGeneration`` model.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    vision_tower_attr: ClassVar[str] = "vision_tower"
    """Attribute of ``model.model`` that holds the vision encoder."""
    wrapper_token_attrs: ClassVar[tuple[str, ...]] = ()
    """Config attributes naming tokens that wrap an image span; dropped with it in image-free inputs."""
    image_input_keys: ClassVar[tuple[str, ...]] = (
        "pixel_values",
        "image_sizes",
        "image_grid_thw",
        "pixel_attention_mask",
        "batch_num_images",
    )
    """Input keys that carry the image itself; absent from image-free inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.text_config = model.config.get_text_config()

    # ----------------------------------------------------------------- structure
    @property
    def decoder(self) -> nn.Module:
        """The text decoder (``model.get_decoder()``), whose ``layers`` are steered."""
        return self.model.get_decoder()

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, index = ``layer_idx``."""
        return self.decoder.layers

    def attention(self, layer: int) -> nn.Module:
        """The self-attention module of decoder layer ``layer``."""
        self.check_layer(layer)
        return self.layers[layer].self_attn

    def attention_modules(self) -> list[nn.Module]:
        """All text self-attention modules, in layer order."""
        return [layer.self_attn for layer in self.layers]

    def o_proj(self, layer: int) -> nn.Linear:
        """The output projection of layer ``layer``; its input is the per-head output ``[B, q, H*d]``."""
        return self.attention(layer).o_proj

    @property
    def dims(self) -> ModelDims:
        """Structural sizes of the text backbone."""
        tc = self.text_config
        heads = tc.num_attention_heads
        return ModelDims(
            num_layers=len(self.layers),
            num_heads=heads,
            num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            hidden_size=tc.hidden_size,
            vocab_size=tc.vocab_size,
        )

    def config_fingerprint(self) -> str:
        """sha256 of the structural fields (model_type, layers, heads, KV heads, hidden size, vocab).

        Per-model defaults and head profiles are matched by this, never by a checkpoint name alone.
        """
        d = self.dims
        fields = {
            "model_type": self.config.model_type,
            "num_layers": d.num_layers,
            "num_heads": d.num_heads,
            "num_kv_heads": d.num_kv_heads,
            "hidden_size": d.hidden_size,
            "vocab_size": d.vocab_size,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def check_layer(self, layer: int) -> None:
        """Raise ``ValueError`` when ``layer`` is not a valid decoder-layer index."""
        n = len(self.layers)
        if not isinstance(layer, int) or not 0 <= layer < n:
            raise ValueError(
                f"Layer index {layer!r} is out of range for this model, which has {n} decoder layers "
                f"(valid: 0..{n - 1}). Check the strategy's layer settings."
            )

    def sliding_layers(self) -> list[int]:
        """Indices of sliding-window attention layers (their cache keeps only the last keys)."""
        types = getattr(self.text_config, "layer_types", None) or []
        window = getattr(self.text_config, "sliding_window", None)
        return [i for i, t in enumerate(types) if t == "sliding_attention" and window]

    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder module."""
        return getattr(self.model.model, self.vision_tower_attr)

    # ------------------------------------------------------------------- tokens
    @property
    def image_token_id(self) -> int:
        """The id of the (expanded) image placeholder token."""
        tid = getattr(self.config, "image_token_id", None)
        if tid is None:
            tid = getattr(self.config, "image_token_index", None)
        if tid is None:
            raise ValueError(
                f"{type(self.model).__name__} config has neither `image_token_id` nor `image_token_index`; "
                "set one of them on the config so halludec can find the image tokens."
            )
        return int(tid)

    @property
    def pad_token_id(self) -> int:
        """The padding id used when re-padding rows (the text config's pad id, else 0)."""
        return _pad_id(self.config)

    def wrapper_token_ids(self) -> list[int]:
        """Ids of tokens that wrap image spans (e.g. Qwen's ``<|vision_start|>``)."""
        ids = (getattr(self.config, attr, None) for attr in self.wrapper_token_attrs)
        return [int(i) for i in ids if i is not None]

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of image-token positions.

        Args:
            input_ids: ``[B, L]`` token ids (left padding allowed).

        Returns:
            ``[B, L]`` bool tensor, True on image tokens.
        """
        return input_ids == self.image_token_id

    def image_spans(self, input_ids: torch.Tensor) -> list[list[Span]]:
        """The image spans of every row: one contiguous run of image tokens per image.

        Args:
            input_ids: ``[B, L]`` token ids. Positions index the padded row.

        Returns:
            Per row, a list of half-open ``(start, end)`` spans in order (empty when the row has no image).
        """
        return [contiguous_runs(row) for row in self.image_mask(input_ids).cpu()]

    def require_images(self, input_ids: torch.Tensor, who: str) -> None:
        """Raise ``ValueError`` naming the rows of ``input_ids`` that have no image token.

        Args:
            input_ids: ``[B, L]`` token ids.
            who: What needs the image (used in the message), e.g. ``"strategy 'vhr'"``.
        """
        has = self.image_mask(input_ids).any(dim=-1).cpu()
        missing = [i for i, h in enumerate(has.tolist()) if not h]
        if missing:
            raise ValueError(
                f"{who} needs image tokens in every prompt, but rows {missing} of input_ids contain no "
                f"image token (id {self.image_token_id}). Build the inputs with the model's processor and an "
                "image (e.g. processor.apply_chat_template with an image entry), or use strategy='none'."
            )

    def query_spans(
        self,
        input_ids: torch.Tensor,
        tokenizer: Any,
        questions: Sequence[str] | None = None,
        chat_template_owner: Any | None = None,
    ) -> list[Span]:
        """The user's question tokens in every row.

        With ``questions``, each question's text is located in the decoded tokens after the row's last image
        span. Without, the processor's chat template is rendered around a sentinel question to learn the
        template text before and after the question, which is then matched against the row. Offsets are never
        hard-coded.

        Args:
            input_ids: ``[B, L]`` token ids (left padding allowed).
            tokenizer: The tokenizer that produced ``input_ids`` (a processor's ``.tokenizer`` works).
            questions: Optional question text per row, as it appears in the prompt.
            chat_template_owner: The processor or tokenizer whose chat template built the prompt; defaults to
                ``tokenizer``.

        Returns:
            Per row, the half-open token span of the question.

        Raises:
            ValueError: when a question cannot be located (with the decoded text around it).
        """
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        if questions is not None and len(questions) != input_ids.shape[0]:
            raise ValueError(
                f"Got {len(questions)} questions for a batch of {input_ids.shape[0]} rows; pass one question "
                "per row of input_ids."
            )
        parts = None
        if questions is None:
            owner = chat_template_owner or tokenizer
            image_token = getattr(owner, "image_token", None) or getattr(tok, "image_token", None)
            before, after = template_parts(owner, image_token)
            special = _special_ids(tok)
            for tid in special:
                before = before.replace(tok.convert_ids_to_tokens(tid), "")
            parts = (_round_trip(tok, before), _round_trip(tok, after))
        spans: list[Span] = []
        image_spans = self.image_spans(input_ids)
        pad_id = getattr(tok, "pad_token_id", None)
        for row, (ids, img) in enumerate(zip(input_ids.tolist(), image_spans, strict=True)):
            start = img[-1][1] if img else _first_non_pad(ids, pad_id)
            if questions is None:  # template tokens closing the image (</img>, <|vision_end|>, <bos>, ...)
                while start < len(ids) and ids[start] in special:
                    start += 1
            tail = ids[start:]
            pieces = [tok.decode(tail[: k + 1], skip_special_tokens=False) for k in range(len(tail))]
            text = pieces[-1] if pieces else ""
            if questions is not None:
                q = questions[row].strip()
                c0 = text.find(q)
                found = _find_ids(tail, tok(q, add_special_tokens=False)["input_ids"]) if q and c0 < 0 else None
                if found is not None:  # a normalising tokenizer (lower-casing, word-level): match the question's ids
                    spans.append((start + found[0], start + found[1]))
                    continue
                if not q or c0 < 0:
                    raise ValueError(
                        f"Question {questions[row]!r} of row {row} was not found in the prompt text after the "
                        f"image: {text!r}. Pass the question exactly as it was put into the prompt."
                    )
                c1 = c0 + len(q)
            else:
                before, after = parts
                c0, c1 = _strip_template(text, before, after, row)
            t0, t1 = char_span_to_tokens([len(p) for p in pieces], c0, c1)
            spans.append((start + t0, start + t1))
        return spans

    # -------------------------------------------------------------- side inputs
    def text_only_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The same prompts with every image removed: image tokens (and their wrappers) dropped, rows re-left-padded.

        Args:
            inputs: Model inputs with ``input_ids`` ``[B, L]`` and ``attention_mask``.

        Returns:
            New inputs of length ``L'`` (the longest image-free row): ``input_ids``, ``attention_mask`` and every
            other per-token ``[B, L]`` tensor filtered the same way (type ids set to 0); image tensors removed.
        """
        ids = inputs["input_ids"]
        drop = self.image_mask(ids)
        for tid in self.wrapper_token_ids():
            drop |= ids == tid
        kept = self.drop_tokens(inputs, drop)
        return {k: v for k, v in kept.items() if k not in self.image_input_keys}

    def without_spans_inputs(self, inputs: Mapping[str, Any], spans: Sequence[Span]) -> dict[str, Any]:
        """The same inputs with one token span per row removed (e.g. the question), images kept.

        Args:
            inputs: Model inputs.
            spans: Per row, the half-open span to drop (``query_spans`` gives the question's).

        Returns:
            New inputs, rows re-left-padded; image tensors unchanged.
        """
        ids = inputs["input_ids"]
        if len(spans) != ids.shape[0]:
            raise ValueError(f"Got {len(spans)} spans for {ids.shape[0]} rows; pass one span per row.")
        positions = torch.arange(ids.shape[1], device=ids.device)  # [L]
        start = torch.tensor([s for s, _ in spans], device=ids.device)[:, None]  # [B, 1]
        end = torch.tensor([e for _, e in spans], device=ids.device)[:, None]  # [B, 1]
        return self.drop_tokens(inputs, (positions >= start) & (positions < end))

    def drop_tokens(self, inputs: Mapping[str, Any], drop: torch.Tensor) -> dict[str, Any]:
        """Remove the positions flagged in ``drop`` from every row and re-left-pad.

        Args:
            inputs: Model inputs with ``input_ids`` ``[B, L]`` and optionally ``attention_mask``.
            drop: ``[B, L]`` bool, True on positions to remove.

        Returns:
            New inputs of length ``L'`` (the longest remaining row): ``input_ids`` (pads = the pad id),
            ``attention_mask`` and every other per-token ``[B, L]`` tensor gathered the same way (type ids of
            dropped image tokens do not survive; remaining type ids are kept); position ids dropped.
        """
        ids = inputs["input_ids"]
        am = inputs.get("attention_mask")
        am = torch.ones_like(ids) if am is None else am
        keep = am.bool() & ~drop  # [B, L]
        new_len = int(keep.sum(dim=-1).max())
        # Stable sort that moves kept positions to the right end of each row, in order: left padding.
        order = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices[:, -new_len:]  # [B, L']
        new_keep = torch.gather(keep, 1, order)
        pad_id = _pad_id(self.config)
        out: dict[str, Any] = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == ids.shape:
                gathered = torch.gather(value, 1, order)
                if key == "input_ids":
                    gathered = gathered.masked_fill(~new_keep, pad_id)
                elif key == "attention_mask":
                    gathered = new_keep.to(value.dtype)
                else:  # per-token type ids: pads get 0
                    gathered = gathered.masked_fill(~new_keep, 0)
                out[key] = gathered
            elif key not in ("position_ids", "cache_position", "rope_deltas"):
                out[key] = value
        return out

    def position_ids_for(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Explicit position ids for a prefill of ``inputs``, as ``generate`` builds them (left padding aware).

        Args:
            inputs: Model inputs with ``input_ids`` ``[B, L]`` and optionally ``attention_mask``.

        Returns:
            ``[B, L]`` long tensor: ``cumsum(mask) - 1``, pads set to 1 (families with 3-D positions override).
        """
        ids = inputs["input_ids"]
        am = inputs.get("attention_mask")
        am = torch.ones_like(ids) if am is None else am
        return (am.long().cumsum(-1) - 1).masked_fill(am == 0, 1)  # [B, L]

    def noised_image_inputs(
        self,
        inputs: Mapping[str, Any],
        noise_step: int = 500,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """The same inputs with Gaussian diffusion noise on the pixels (VCD's distorted image).

        ``x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps`` with VCD's 1000-step schedule
        ``beta = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5`` and ``abar_t = prod_{s<=t}(1 - beta_s)``
        (VCD's ``add_diffusion_noise``). Applied to ``pixel_values`` whatever their layout (Qwen's flattened
        patches included), since the noise is element-wise.

        Args:
            inputs: Model inputs with ``pixel_values``.
            noise_step: Diffusion step ``t`` in ``[0, 999]``; larger is noisier.
            generator: Optional generator for reproducible noise.

        Returns:
            A shallow copy of ``inputs`` with new ``pixel_values``.
        """
        if not 0 <= noise_step < 1000:
            raise ValueError(f"noise_step={noise_step} is out of range; use an integer in [0, 999] (VCD uses 500).")
        if inputs.get("pixel_values") is None:
            raise ValueError("noised_image_inputs needs `pixel_values` in the inputs; none were given.")
        pixels = inputs["pixel_values"]
        betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
        abar = float(torch.cumprod(1.0 - betas, dim=0)[noise_step])
        eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32, device="cpu").to(pixels.device)
        noised = math.sqrt(abar) * pixels.float() + math.sqrt(1.0 - abar) * eps
        out = dict(inputs)
        out["pixel_values"] = noised.to(pixels.dtype)
        return out

    # ----------------------------------------------------------- vision tower
    def vision_attention_modules(self) -> list[nn.Module]:
        """The vision encoder's self-attention modules, in layer order."""
        tower = self.vision_tower
        mods = [m for name, m in tower.named_modules() if _is_vision_attention(name, m)]
        if not mods:
            raise ValueError(f"Found no self-attention modules in the vision tower {type(tower).__name__}.")
        return mods

    def run_vision_tower(self, inputs: Mapping[str, Any]) -> Any:
        """Encode the images of ``inputs`` with the vision tower (and projector); returns the image features."""
        names = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask")
        kwargs = {k: inputs[k] for k in names if inputs.get(k) is not None}
        return self.model.model.get_image_features(**kwargs)

    def vision_config_key(self) -> str:
        """The name of the vision sub-config (whose attention implementation drives the vision tower)."""
        for key in ("vision_config", "vision_tower_config"):
            if getattr(self.config, key, None) is not None:
                return key
        raise ValueError(f"{type(self.config).__name__} has no vision sub-config.")


def _is_vision_attention(name: str, module: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("self_attn", "attn", "attention") and any(
        hasattr(module, p) for p in ("q_proj", "qkv", "query", "qkv_proj")
    )


def _pad_id(config: Any) -> int:
    for cfg in (config, config.get_text_config()):
        pid = getattr(cfg, "pad_token_id", None)
        if pid is not None:
            return int(pid)
    return 0


def _special_ids(tok: Any) -> set[int]:
    """Ids of special and added tokens (template markup such as ``<|im_start|>`` or ``</img>``)."""
    ids = set(getattr(tok, "all_special_ids", []) or [])
    ids.update(int(i) for i in (getattr(tok, "added_tokens_decoder", None) or {}))
    return ids


def _first_non_pad(ids: list[int], pad_id: int | None) -> int:
    for i, t in enumerate(ids):
        if t != pad_id:
            return i
    return len(ids)


def _strip_template(text: str, before: str, after: str, row: int) -> tuple[int, int]:
    """Char span of the question inside ``text`` = ``before + question + after`` (whitespace-tolerant)."""
    b, a = before.strip(), after.strip()
    c0 = text.find(b) if b else 0
    c1 = text.rfind(a) if a else len(text)
    if c0 < 0 or c1 < 0 or c1 < c0 + len(b):
        raise ValueError(
            f"Row {row}: the prompt text after the image, {text!r}, does not follow the chat template "
            f"({before!r} + question + {after!r}). Pass `questions=[...]` to locate the question instead."
        )
    c0 += len(b)
    while c0 < c1 and text[c0].isspace():
        c0 += 1
    while c1 > c0 and text[c1 - 1].isspace():
        c1 -= 1
    return c0, c1


def _round_trip(tok: Any, text: str) -> str:
    """``text`` as the tokenizer decodes it back (a normalising tokenizer lower-cases or re-spaces it)."""
    if not text.strip():
        return text
    decoded = tok.decode(tok(text, add_special_tokens=False)["input_ids"], skip_special_tokens=False)
    return decoded if decoded.strip() != text.strip() else text


def _find_ids(ids: Sequence[int], needle: Sequence[int]) -> tuple[int, int] | None:
    """The first half-open span where ``needle`` occurs in ``ids`` as a contiguous run, else None."""
    n = len(needle)
    for i in range(len(ids) - n + 1) if n else ():
        if list(ids[i : i + n]) == list(needle):
            return i, i + n
    return None
