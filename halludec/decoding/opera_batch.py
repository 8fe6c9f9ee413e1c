"""OPERA's decoding loop, run by ``model.generate(custom_generate=...)`` after generate's own input preparation.

One batched prefill (generate's ``_prefill``); then each batch row keeps its own search (``opera_search.RowSearch``),
cache and model kwargs (a rollback moves a row back to its own length, which one shared cache cannot hold). A search
is a generator: it yields a forward request ``(input_ids [n, len], kwargs)`` and gets back the model output for its
``n`` rows. ``run_searches`` collects the requests of all rows still searching and feeds the requests of one shape
(the same cache length and number of rows: the rows in lockstep, i.e. every row that has not rolled back to another
length) as one forward: the rows' caches and kwargs concatenated; the output, the updated caches and the recorded
attention rows split back. A row's output is what its own forward would give, up to the rounding of float32 matrix
products over more rows.
"""

from __future__ import annotations

import copy
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import torch

from halludec.decoding import opera_search
from halludec.decoding.opera import (
    IMAGE_KEY,
    ROWS_KEY,
    RowResult,
    assemble,
    check_cache,
    check_generation,
    fill_value,
    row_cache,
    take_rows,
)

if TYPE_CHECKING:
    from halludec.decoding.context import CallContext
    from halludec.decoding.opera import OPERA, OPERAConfig

Request = tuple[torch.Tensor, dict[str, Any]]
"""A forward request: ``input_ids [n, len]`` and the model kwargs of those rows (their own cache included)."""
Search = Generator[Request, Any, RowResult]


def make_decoder(strategy: OPERA, call: CallContext) -> Any:
    """The ``custom_generate`` callable running OPERA's search for ``strategy`` in ``call``."""

    def opera_decode(
        model: Any,
        input_ids: torch.LongTensor,
        logits_processor: Any,
        stopping_criteria: Any,
        generation_config: Any,
        synced_gpus: bool = False,
        streamer: Any = None,
        **model_kwargs: Any,
    ) -> Any:
        return decode(
            model,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            model_kwargs,
            call,
            strategy.config,
        )

    return opera_decode


def decode(
    model: Any,
    input_ids: torch.Tensor,
    processors: Any,
    stopping: Any,
    gen: Any,
    model_kwargs: dict[str, Any],
    call: CallContext,
    config: OPERAConfig,
) -> Any:
    """Prefill every row, search each row, and return what ``generate`` returns (sequences or a beam output).

    Args:
        model: The model (``generate``'s ``self``).
        input_ids: ``[B * K, L]`` prompts expanded for the beams.
        processors: generate's logits processors (applied to log-probabilities, as in its beam search).
        stopping: generate's stopping criteria.
        gen: The resolved ``GenerationConfig``.
        model_kwargs: generate's prepared model kwargs (cache, mask, positions, image inputs).
        call: The halludec call context.
        config: OPERA's config.

    Returns:
        ``LongTensor [B * R, L + g]``, or ``GenerateBeamDecoderOnlyOutput`` with ``return_dict_in_generate``.
    """
    check_generation(gen, model_kwargs)
    beams = gen.num_beams
    rows = input_ids.shape[0]
    call.state[IMAGE_KEY] = call.image_mask  # [B, L]; each row's search narrows it to its own row
    out = model._prefill(input_ids, gen, model_kwargs)
    model_kwargs = model._update_model_kwargs_for_generation(out, model_kwargs)
    check_cache(model_kwargs.get("past_key_values"))
    logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32, device=input_ids.device)  # [B * K, V]
    del out
    searches = {}
    for start in range(0, rows, beams):
        part = slice(start, start + beams)
        kwargs = model_kwargs if rows == beams else _row_kwargs(model_kwargs, part, rows)
        search = opera_search.RowSearch(model, call, config, gen, processors, stopping, kwargs, start)
        searches[start // beams] = search.run(input_ids[part], logits[part])
    results = run_searches(model, call, searches, max_rows=rows)
    cache = model_kwargs["past_key_values"] if rows == beams else None
    return assemble([results[row] for row in sorted(results)], gen, beams, fill_value(gen), cache)


def _row_kwargs(kwargs: dict[str, Any], part: slice, rows: int) -> dict[str, Any]:
    """One batch row's model kwargs: its cache rows, mask, positions; image inputs (read at the prefill) dropped."""
    out = take_rows(kwargs, torch.arange(part.start, part.stop), rows)
    out["past_key_values"] = row_cache(kwargs["past_key_values"], part)
    return out


def run_searches(
    model: Any, call: CallContext, searches: dict[int, Search], max_rows: int | None = None
) -> dict[int, RowResult]:
    """Drive every batch row's search to its end, one forward per request shape and round.

    Args:
        model: The model.
        call: The call context (its ``state`` carries the image mask in and the attention rows out).
        searches: Batch row -> its search generator (not started).
        max_rows: At most this many rows per forward (at least one request each); None: no limit. ``decode``
            passes the batch's beam rows ``B * K``, so the candidate forwards (``K * C`` rows per batch row) never
            hold more cache rows than generate's own cache.

    Returns:
        Batch row -> its result.
    """
    results: dict[int, RowResult] = {}
    pending: dict[int, Request] = {}

    def resume(row: int, reply: Any) -> None:
        try:
            pending[row] = searches[row].send(reply)
        except StopIteration as stop:
            results[row] = stop.value
            pending.pop(row, None)

    for row in searches:
        resume(row, None)
    while pending:
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, (ids, _) in pending.items():
            groups.setdefault(tuple(ids.shape), []).append(row)
        for members in groups.values():
            n = pending[members[0]][0].shape[0]
            size = len(members) if max_rows is None else max(1, max_rows // n)
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                replies = forward_rows(model, call, [pending[row] for row in chunk], chunk)
                for row, reply in zip(chunk, replies, strict=True):
                    resume(row, reply)
    return results


def forward_rows(model: Any, call: CallContext, requests: list[Request], rows: list[int]) -> list[Any]:
    """Run equal-shaped requests of batch rows ``rows`` as one forward.

    Args:
        model: The model.
        call: The call context.
        requests: Requests whose ``input_ids`` all have the same shape ``[n, len]``.
        rows: The batch row of each request.

    Returns:
        Per request, ``(output, rows)``: the model output of its own rows (logits, its cache) and the attention rows
        OPERA's hook recorded for them (``(top [n, q, K], image [n, q])``, or None when none were read).
    """
    n = requests[0][0].shape[0]
    call.state[IMAGE_KEY] = torch.cat([call.image_mask[r : r + 1] for r in rows])  # [m, L]: one per request
    if len(requests) == 1:
        ids, kwargs = requests[0]
    else:
        ids = torch.cat([ids for ids, _ in requests])  # [m * n, len]
        kwargs = merge_kwargs([kw for _, kw in requests], n)
    inputs = model.prepare_inputs_for_generation(ids, next_sequence_length=1, **kwargs)
    out = model(**inputs, return_dict=True)
    recorded = call.state.get(ROWS_KEY)
    if len(requests) == 1:
        return [(out, recorded)]
    replies = []
    for i, (_, kw) in enumerate(requests):
        part = slice(i * n, (i + 1) * n)
        split_cache(out.past_key_values, kw["past_key_values"], part)
        reply = copy.copy(out)
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.shape[0] == n * len(requests):
                reply[key] = value[part]
        reply["past_key_values"] = kw["past_key_values"]
        replies.append((reply, None if recorded is None else tuple(r[part] for r in recorded)))
    return replies


def merge_kwargs(kwargs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The model kwargs of several requests of ``n`` rows each, for one forward of all their rows.

    Args:
        kwargs: Per request, its kwargs (the same keys; per-row tensors with ``n`` rows, ``position_ids`` possibly
            ``[3 | 4, n, L]``; the same cache length).
        n: Rows per request.

    Returns:
        The merged kwargs (a new cache object holding every request's rows).
    """
    out: dict[str, Any] = {}
    for key, value in kwargs[0].items():
        if key == "past_key_values":
            out[key] = merge_caches([kw[key] for kw in kwargs])
        elif key == "cache_position" or not isinstance(value, torch.Tensor):
            out[key] = value  # shared: every request is at the same cache length
        elif key == "position_ids" and value.dim() == 3:
            out[key] = torch.cat([kw[key] for kw in kwargs], dim=1)  # [4 | 3, m * n, L]
        elif value.dim() >= 1 and value.shape[0] == n:
            out[key] = torch.cat([kw[key] for kw in kwargs])  # [m * n, ...]
        else:
            raise ValueError(
                f"OPERA cannot batch the model kwarg {key!r} of shape {tuple(value.shape)} across rows (expected "
                f"{n} rows); search one row at a time (batch size 1)."
            )
    return out


def merge_caches(caches: list[Any]) -> Any:
    """A new cache whose layers hold the rows of every cache in ``caches`` (equal lengths), in order."""
    merged = copy.copy(caches[0])
    merged.layers = [copy.copy(layer) for layer in caches[0].layers]
    for i, layer in enumerate(merged.layers):
        if layer.is_initialized:
            layer.keys = torch.cat([c.layers[i].keys for c in caches])  # [m * n, H, S, d]
            layer.values = torch.cat([c.layers[i].values for c in caches])
    return merged


def split_cache(merged: Any, cache: Any, part: slice) -> None:
    """Give ``cache`` the rows ``part`` of ``merged`` (its layers' state replaced, tensors as views)."""
    for mine, layer in zip(cache.layers, merged.layers, strict=True):
        state = dict(vars(layer))
        if layer.is_initialized:
            state["keys"], state["values"] = layer.keys[part], layer.values[part]  # [n, H, S + 1, d]
        vars(mine).clear()
        vars(mine).update(state)
