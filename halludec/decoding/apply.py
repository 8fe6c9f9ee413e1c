"""``apply`` (install strategies for one ``generate`` call, always restore) and ``generate`` (the one-liner).

``apply`` is a context manager in the style of lm-eval's ``steer()``: every change it makes to the model is
paired with its undo on an ``ExitStack``, so the model comes back exactly as it was (attention implementation
of every sub-config, hooks, controller attributes), also when ``generate`` raises inside the block.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import nn
from transformers import LogitsProcessorList

from halludec.decoding import attention
from halludec.decoding.base import Strategy, resolve_strategies
from halludec.decoding.context import CallContext, LayerPlan, merge_rows
from halludec.decoding.side import SideBranches
from halludec.vlm_adapters import VLMAdapter, get_adapter

StrategySpec = str | Strategy | Sequence[str | Strategy]


@contextmanager
def apply(
    model: nn.Module,
    strategy: StrategySpec,
    inputs: Mapping[str, Any],
    *,
    processor: Any | None = None,
    questions: Sequence[str] | None = None,
    adapter: VLMAdapter | None = None,
) -> Iterator[CallContext]:
    """Install ``strategy`` on ``model`` for one ``generate`` call on ``inputs``; restore on exit.

    Args:
        model: A loaded vision-language model (any supported family).
        strategy: A registered name (``"vhr"``, ``"pai:repro"``), a ``Strategy``, or a list of them (composition:
            attention edits in list order inside each layer, then logits processors in list order).
        inputs: The inputs that will be passed to ``generate`` (``input_ids`` ``[B, L]``, ``attention_mask``,
            image tensors). Left padding is supported.
        processor: The processor (or tokenizer) that built ``inputs``; needed by strategies that locate the
            question tokens.
        questions: Optional question text per row, to locate the question tokens exactly.
        adapter: Override the adapter chosen from ``model.config.model_type``.

    Yields:
        The ``CallContext``; pass ``call.logits_processors`` to ``generate`` (``halludec.generate`` does).

    Example:
        >>> with halludec.apply(model, "vhr", inputs, processor=processor) as call:
        ...     out = model.generate(**inputs, logits_processor=call.logits_processors, max_new_tokens=32)
    """
    strategies = resolve_strategies(strategy if isinstance(strategy, (str, Strategy)) else list(strategy))
    adapter = adapter or get_adapter(model)
    call = CallContext(model, adapter, strategies, inputs, processor, list(questions) if questions else None)
    with ExitStack() as stack:
        for s in strategies:
            if s.needs_image:
                adapter.require_images(call.input_ids, f"Strategy {s.name!r}")
        _install_attention(stack, model, adapter)
        call.exit_stack = stack
        for s in strategies:
            s.prepare(call)
        call.plans = _plans(call, strategies)
        for layer in sorted(call.sliding_layers & set(call.plans)):
            hook = adapter.attention(layer).register_forward_pre_hook(call.track_cache, with_kwargs=True)
            stack.callback(hook.remove)
        _install_side_branches(stack, call, strategies)
        call.logits_processors = LogitsProcessorList(p for s in strategies for p in s.logits_processors(call))
        for module in adapter.attention_modules():
            stack.callback(_restore_controller, module, getattr(module, attention.CONTROLLER_ATTR, _ABSENT))
            setattr(module, attention.CONTROLLER_ATTR, call)
        yield call


def generate(
    model: nn.Module,
    inputs: Mapping[str, Any],
    strategy: StrategySpec = "none",
    *,
    processor: Any | None = None,
    questions: Sequence[str] | None = None,
    adapter: VLMAdapter | None = None,
    **generate_kwargs: Any,
) -> Any:
    """``model.generate(**inputs, **generate_kwargs)`` with ``strategy`` applied for the call.

    Greedy, seeded sampling and beam search all work, as do left-padded batches. Strategy hyperparameters live on
    the strategy (``halludec.get_strategy("vhr", alpha=2.0)``), never in ``generate_kwargs``.

    Args:
        model: A loaded vision-language model.
        inputs: Processor output (``input_ids``, ``attention_mask``, image tensors).
        strategy: Name, preset (``"name:preset"``), ``Strategy`` instance, or a list of them.
        processor: The processor/tokenizer that built ``inputs`` (for strategies that need the question span).
        questions: Optional question text per row.
        adapter: Override the model's adapter.
        **generate_kwargs: Passed to ``model.generate`` (``max_new_tokens``, ``do_sample``, ``num_beams``, a
            user ``logits_processor`` list, ...). Strategies' logits edits run inside the forward, before every
            processor.

    Returns:
        Exactly what ``model.generate`` returns.
    """
    with apply(model, strategy, inputs, processor=processor, questions=questions, adapter=adapter) as call:
        user = generate_kwargs.pop("logits_processor", None) or []
        processors = LogitsProcessorList([*call.logits_processors, *user])
        if processors:
            generate_kwargs["logits_processor"] = processors
        owner = next((s for s in call.strategies if s.owns_search), None)
        if owner is not None:  # e.g. OPERA: its own search loop, inside this context
            return owner.search(call, generate_kwargs)
        return model.generate(**inputs, **generate_kwargs)


def _install_attention(stack: ExitStack, model: nn.Module, adapter: VLMAdapter) -> None:
    """Route the text backbone's attention through ``"halludec"``; restore every sub-config on exit."""
    previous = _attn_implementations(model)
    stack.callback(_restore_attn, model, previous)
    attention.register()
    key = _text_config_key(model)
    model.set_attn_implementation({key: attention.ATTN_NAME} if key else attention.ATTN_NAME)
    text_impl = adapter.text_config._attn_implementation
    if text_impl != attention.ATTN_NAME:
        raise RuntimeError(
            f"Could not switch the text backbone of {type(model).__name__} to halludec's attention "
            f"(it stayed {text_impl!r}); this model may not dispatch attention through AttentionInterface."
        )


def _text_config_key(model: nn.Module) -> str | None:
    config = model.config
    text = config.get_text_config()
    for key in getattr(config, "sub_configs", {}):
        if getattr(config, key, None) is text:
            return key
    return None


def _attn_implementations(model: nn.Module) -> dict[str, Any]:
    """``{"": top, "<sub_config>": impl, ...}`` for the top config and its direct sub-configs."""
    config = model.config
    out: dict[str, Any] = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = sub._attn_implementation
    return out


def _restore_attn(model: nn.Module, previous: dict[str, Any]) -> None:
    if _attn_implementations(model) != previous:
        model.set_attn_implementation(previous)


def _plans(call: CallContext, strategies: list[Strategy]) -> dict[int, LayerPlan]:
    plans: dict[int, LayerPlan] = {}
    for s in strategies:
        layers = s.attention_layers(call)
        for layer in sorted(layers):
            call.adapter.check_layer(layer)
            plan = plans.setdefault(layer, LayerPlan())
            if s.uses_probs():
                plan.prob_strategies.append(s)
                plan.rows = merge_rows(plan.rows, s.attention_rows_for(layer, call))
            if s.uses_head_outputs():
                plan.head_strategies.append(s)
    return plans


def _install_side_branches(stack: ExitStack, call: CallContext, strategies: list[Strategy]) -> None:
    """Collect side inputs and logits editors; when there are any, wrap the model's forward for the call."""
    branches: list[Mapping[str, Any]] = []
    for s in strategies:
        mine = list(s.side_inputs(call) or [])
        call.side_slots[id(s)] = list(range(len(branches), len(branches) + len(mine)))
        branches.extend(mine)
    editors = [s for s in strategies if s.logits_enabled(call)]
    if not branches and not editors:
        return
    call.side = SideBranches(call, branches, editors)
    model = call.model
    own = vars(model)
    had, previous = "forward" in own, own.get("forward")
    model.forward = call.side.wrap(model.forward)

    def restore() -> None:
        if had:
            model.forward = previous
        else:
            del model.forward

    stack.callback(restore)


_ABSENT = object()


def _restore_controller(module: nn.Module, previous: object) -> None:
    """Put back the controller an enclosing ``apply`` had installed, or remove ours."""
    if previous is _ABSENT:
        if hasattr(module, attention.CONTROLLER_ATTR):
            delattr(module, attention.CONTROLLER_ATTR)
    else:
        setattr(module, attention.CONTROLLER_ATTR, previous)
