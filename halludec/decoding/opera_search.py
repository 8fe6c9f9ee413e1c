"""OPERA's decoding loop, run by ``model.generate(custom_generate=...)`` after generate's own input preparation.

One batched prefill (generate's ``_prefill``), then each batch row is searched alone on its slice of the cache: a
rollback moves a row back to its own length, which a shared cache cannot hold. The beam bookkeeping (top-``2K``
continuations, finished hypotheses with the length penalty, the early-stopping heuristic) follows transformers'
vectorised ``_beam_search`` step for step, so with no penalty, no rollback and every token a candidate the search
returns what ``model.generate(num_beams=K)`` returns. Every model call goes through the model's own
``prepare_inputs_for_generation`` and ``_update_model_kwargs_for_generation``, as generate's loops do.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from halludec.decoding.opera import (
    IMAGE_KEY,
    ROWS_KEY,
    RowResult,
    assemble,
    candidate_scores,
    check_cache,
    check_generation,
    column_scores,
    fill_value,
    log_columns,
    normalised_rows,
    smallest_mode,
)

if TYPE_CHECKING:
    from halludec.decoding.context import CallContext
    from halludec.decoding.opera import OPERA, OPERAConfig

NEG = -1.0e9  # transformers' beam search masks with this value


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
    results = []
    for start in range(0, rows, beams):
        part = slice(start, start + beams)
        kwargs = model_kwargs if rows == beams else _row_kwargs(model_kwargs, part, rows)
        search = RowSearch(model, call, config, gen, processors, stopping, kwargs, start)
        results.append(search.run(input_ids[part], logits[part]))
    cache = model_kwargs["past_key_values"] if rows == beams else None
    return assemble(results, gen, beams, fill_value(gen), cache)


def _row_kwargs(kwargs: dict[str, Any], part: slice, rows: int) -> dict[str, Any]:
    """One batch row's model kwargs: its cache rows, mask, positions; image inputs (read at the prefill) dropped."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "past_key_values":
            out[key] = _row_cache(value, part)
        elif not isinstance(value, torch.Tensor):
            out[key] = value
        elif key == "position_ids" and value.dim() == 3:
            out[key] = value[:, part]  # [4 | 3, K, L]
        elif value.dim() >= 1 and value.shape[0] == rows:
            out[key] = value[part]
    return out


def _row_cache(cache: Any, part: slice) -> Any:
    """A cache holding only the rows ``part`` of ``cache`` (new layer objects; ``cache`` unchanged)."""
    row = copy.copy(cache)
    row.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in row.layers:
        if layer.is_initialized:
            layer.batch_select_indices(torch.arange(part.start, part.stop, device=layer.keys.device))
    return row


def _mark(cache: Any) -> list[dict[str, Any]]:
    """The cache layers' state (tensor references: updates replace the tensors, never write into them)."""
    return [dict(vars(layer)) for layer in cache.layers]


def _restore(cache: Any, marks: list[dict[str, Any]]) -> None:
    for layer, state in zip(cache.layers, marks, strict=True):
        vars(layer).clear()
        vars(layer).update(state)


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[:, index]`` along the beam dim for ``[1, n, ...]`` tensors (transformers' ``_gather_beams``)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


@dataclass
class Beams:
    """One row's beam-search state, transformers' layout with a leading batch dim of 1.

    Attributes:
        seqs: ``[1, K, max_len]`` running sequences; ``cur_len`` positions are filled.
        scores: ``[1, K]`` running scores.
        bidx: ``[1, K, max_len - L]`` running beam indices.
        fin_seqs: ``[1, K, max_len]`` finished hypotheses.
        fin_scores: ``[1, K]`` their length-penalised scores (``-1e9``: none).
        fin_bidx: ``[1, K, max_len - L]``.
        fin_done: ``[1, K]`` bool.
        early_ok: ``[1, 1]`` bool: a running beam can still beat the finished ones.
        cur_len: Filled positions.
    """

    seqs: torch.Tensor
    scores: torch.Tensor
    bidx: torch.Tensor
    fin_seqs: torch.Tensor
    fin_scores: torch.Tensor
    fin_bidx: torch.Tensor
    fin_done: torch.Tensor
    early_ok: torch.Tensor
    cur_len: int

    def clone(self) -> Beams:
        """A deep copy (tensors cloned)."""
        return Beams(**{f.name: _copy(getattr(self, f.name)) for f in fields(self)})


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


@dataclass
class Snapshot:
    """The state at the start of step ``t`` (after its locations were recorded), for a rollback to ``t``."""

    t: int
    beams: Beams
    locs: torch.Tensor  # [K, t + 1]
    n_out: int  # output score entries before step t
    choice: torch.Tensor | None = None  # [K] flat (beam * V + token) continuations chosen at step t


class RowSearch:
    """OPERA's beam search on one batch row (``K`` cache rows)."""

    def __init__(
        self,
        model: Any,
        call: CallContext,
        config: OPERAConfig,
        gen: Any,
        processors: Any,
        stopping: Any,
        kwargs: dict[str, Any],
        offset: int,
    ) -> None:
        self.model, self.call, self.cfg, self.gen = model, call, config, gen
        self.processors, self.stopping, self.kw, self.offset = processors, stopping, kwargs, offset
        self.cache = kwargs["past_key_values"]
        eos = gen._eos_token_tensor
        self.keep = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * gen.num_beams
        self.record = gen.return_dict_in_generate and gen.output_scores
        row = offset // gen.num_beams
        call.state[IMAGE_KEY] = call.image_mask[row : row + 1]  # [1, L]: read by the attention recorder

    # -------------------------------------------------------------------------------------------- main loop
    def run(self, input_ids: torch.Tensor, logits: torch.Tensor) -> RowResult:
        """Search from the prefill's ``logits [K, V]`` for prompts ``input_ids [K, L]``."""
        cfg, k, vocab = self.cfg, input_ids.shape[0], logits.shape[-1]
        self.prompt_len = length = input_ids.shape[1]
        self.device = logits.device
        b = self._init(input_ids)
        reads, roll = cfg.reads_attention, cfg.reads_attention and cfg.threshold is not None
        colsum = logits.new_zeros(k, 0)  # [K, t] log column products over the generated rows
        locs = torch.zeros(k, 0, dtype=torch.long, device=logits.device)  # [K, t] per-beam locations
        history: deque[Snapshot] = deque(maxlen=cfg.window + 1)
        rejects: dict[int, torch.Tensor] = {}
        rollbacks: dict[int, int] = {}
        prompt = (_mark(self.cache), dict(self.kw)) if roll else None
        scores: list[torch.Tensor] = []
        raw: list[torch.Tensor] = []
        redo: torch.Tensor | None = None
        while True:
            t = b.cur_len - length
            seqs = b.seqs[0, :, : b.cur_len]  # [K, cur_len]
            processed = self.processors(seqs, F.log_softmax(logits, dim=-1))  # [K, V]
            if redo is not None:  # the step after a rollback: the whole vocabulary, earlier choices excluded
                step = processed.reshape(-1).index_fill(0, redo, float("-inf")).view(k, vocab)
                redo = None
            elif cfg.num_attn_candidates is None:
                step = processed
            else:
                top, cand = processed.topk(min(cfg.num_attn_candidates, vocab), dim=-1)  # [K, C]
                if reads:
                    penalty, loc = self._candidates(seqs, cand, colsum, t)  # [K, C] each
                    locs = torch.cat([locs, smallest_mode(loc, t + 1)[:, None]], dim=1)  # [K, t + 1]
                    if roll:
                        history.append(Snapshot(t, b.clone(), locs.clone(), len(scores)))
                    if roll and (pos := self._rollback_position(locs, t, rollbacks, history)) is not None:
                        b, locs, colsum, logits, redo = self._rollback(pos, history, rejects, prompt)
                        del scores[history[-1].n_out :], raw[history[-1].n_out :]
                        continue
                    if cfg.penalty_weights > 0:
                        top = top - cfg.penalty_weights * penalty
                step = candidate_scores(top, cand, vocab)
                if not torch.isfinite(step).any():  # every candidate excluded: fall back to the plain scores
                    step = candidate_scores(processed.gather(1, cand), cand, vocab)
            scores.append(step)
            raw.append(logits)
            b, source, token, done = self._advance(b, step, scores)
            if history and history[-1].t == t:
                history[-1].choice = source * vocab + token
            if done:
                break
            self.cache.reorder_cache(source)
            colsum, locs = colsum[source], locs[source]
            logits, row = self._feed(b.seqs[0, :, : b.cur_len], reads)
            if reads:
                colsum = F.pad(colsum, (0, 1)) + log_columns(row[:, -(t + 1) :], cfg.scale_factor)  # [K, t + 1]
        return self._result(b, scores, raw)

    def _init(self, input_ids: torch.Tensor) -> Beams:
        k, length, max_len = input_ids.shape[0], input_ids.shape[1], self.gen.max_length
        device = input_ids.device
        seqs = torch.full((1, k, max_len), fill_value(self.gen), dtype=torch.int64, device=device)
        seqs[:, :, :length] = input_ids[None]
        scores = torch.zeros((1, k), dtype=torch.float, device=device)
        scores[:, 1:] = NEG
        bidx = torch.full((1, k, max_len - length), -1, dtype=torch.int32, device=device)
        return Beams(
            seqs=seqs,
            scores=scores,
            bidx=bidx,
            fin_seqs=seqs.clone(),
            fin_scores=torch.full((1, k), NEG, dtype=torch.float, device=device),
            fin_bidx=bidx.clone(),
            fin_done=torch.zeros((1, k), dtype=torch.bool, device=device),
            early_ok=torch.ones((1, 1), dtype=torch.bool, device=device),
            cur_len=length,
        )

    # ------------------------------------------------------------------------------------------ model calls
    def _forward(self, seqs: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        inputs = self.model.prepare_inputs_for_generation(seqs, next_sequence_length=1, **kwargs)
        return self.model(**inputs, return_dict=True)

    def _row(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded last row: normalised attention ``[K, keys]`` and its image mass ``[K]``."""
        top, image = self.call.state[ROWS_KEY]  # [K, q, keys], [K, q]
        top, image = top[:, -1].float().to(self.device), image[:, -1].float().to(self.device)  # the layer's device
        return normalised_rows(top), image / top.sum(-1).clamp_min(torch.finfo(torch.float32).tiny)

    def _feed(self, seqs: torch.Tensor, reads: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed each beam's last token: the next logits ``[K, V]`` and (when read) its attention row."""
        out = self._forward(seqs, self.kw)
        self.kw = self.model._update_model_kwargs_for_generation(out, self.kw)
        logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32, device=seqs.device)  # [K, V]
        return logits, (self._row()[0] if reads else None)

    def _candidates(self, seqs: torch.Tensor, cand: torch.Tensor, colsum: torch.Tensor, t: int) -> tuple:
        """Feed every candidate once (cache rewound after each): its over-trust penalty and location ``[K, C]``."""
        marks = _mark(self.cache)
        rows, images = [], []
        for c in range(cand.shape[1]):
            self._forward(torch.cat([seqs, cand[:, c : c + 1]], dim=1), self.kw)
            _restore(self.cache, marks)
            row, image = self._row()
            rows.append(row[:, -(t + 1) :])  # [K, t + 1]: the response tokens, the candidate last
            images.append(image)
        score, loc = column_scores(colsum, torch.stack(rows, 1), self.cfg.scale_factor, self.cfg.fp16_scores)
        if t + 1 <= self.cfg.early_tokens:  # the first tokens: a bonus for attending to the image instead
            score = -torch.stack(images, 1)  # [K, C]
        return score, loc

    # ------------------------------------------------------------------------------------------- rollback
    def _rollback_position(self, locs: torch.Tensor, t: int, counts: dict[int, int], history: deque) -> int | None:
        """Where to roll back to (the position to choose again), or None; updates the per-position counts."""
        cfg = self.cfg
        location = int(smallest_mode(locs[:, -1], t + 1))  # the mode of the beams' locations
        if not bool(((locs == location).sum(-1) > cfg.threshold).all()) or location < cfg.early_tokens:
            return None
        pos = location + 1
        if counts.get(pos, 0) >= cfg.num_attn_candidates:  # this position's rollbacks are used up: the one before
            pos -= 1
            if counts.get(pos, 0) >= cfg.num_attn_candidates:
                return None
        target = max(1, t - cfg.window) if t - pos > cfg.window else pos
        snap = next((s for s in history if s.t == target), None)
        if target < 1 or snap is None or snap.choice is None:
            return None
        counts[pos] = counts.get(pos, 0) + 1
        return target

    def _rollback(self, pos: int, history: deque, rejects: dict[int, torch.Tensor], prompt: tuple) -> tuple:
        """Go back to step ``pos``: its beams, the cache rebuilt from the prompt, earlier choices there excluded."""
        while history[-1].t > pos:
            history.pop()
        snap = history[-1]
        rejects[pos] = torch.cat([r for r in (rejects.get(pos), snap.choice) if r is not None])
        for later in [p for p in rejects if p > pos]:
            del rejects[later]
        b, length = snap.beams.clone(), self.prompt_len
        marks, kwargs = prompt
        _restore(self.cache, marks)
        self.kw = dict(kwargs)
        reads = self.cfg.reads_attention
        colsum = b.scores.new_zeros(b.seqs.shape[1], 0)  # [K, 0]
        for j in range(pos):  # one token at a time: every forward looks like a decoding step to other strategies
            logits, row = self._feed(b.seqs[0, :, : length + j + 1], reads)
            colsum = F.pad(colsum, (0, 1)) + log_columns(row[:, -(j + 1) :], self.cfg.scale_factor)  # [K, j + 1]
        return b, snap.locs.clone(), colsum, logits, rejects[pos]

    # ---------------------------------------------------------------------------------------- beam steps
    def _advance(self, b: Beams, step: torch.Tensor, scores: list[torch.Tensor]) -> tuple:
        """One beam-search selection (transformers' ``_beam_search`` steps c-g); returns the new state, the source
        beam ``[K]`` and token ``[K]`` of each running beam, and whether the row is done."""
        k, vocab = step.shape
        length, cur = self.prompt_len, b.cur_len
        lp, early = self.gen.length_penalty, self.gen.early_stopping
        acc = (step[None] + b.scores[:, :, None]).reshape(1, k * vocab)  # [1, K * V]
        top_lp, top_idx = torch.topk(acc, k=self.keep)  # [1, 2K]
        src, tok = top_idx // vocab, top_idx % vocab
        top_seqs = _gather(b.seqs, src)  # [1, 2K, max_len]
        top_seqs[:, :, cur] = tok
        top_bidx = _gather(b.bidx, src)
        top_bidx[:, :, cur - length] = src + self.offset
        hits = self.stopping(top_seqs[0, :, : cur + 1], tuple(scores) if self.record else None).reshape(1, -1)
        run_lp = top_lp + hits.to(torch.float32) * NEG
        nxt = torch.topk(run_lp, k=k)[1]  # [1, K]
        did = hits & (torch.arange(self.keep, device=hits.device) < k)[None]
        fin_lp = top_lp / ((cur + 1 - length) ** lp)
        fin_lp = fin_lp + (torch.all(b.fin_done, dim=-1, keepdim=True) & (early is True)).to(torch.float32) * NEG
        fin_lp = fin_lp + (~b.early_ok).to(torch.float32) * NEG
        fin_lp = fin_lp + (~did) * NEG
        merged = torch.cat((b.fin_scores, fin_lp), dim=1)  # [1, 3K]
        best = torch.topk(merged, k=k)[1]  # [1, K]
        new = Beams(
            seqs=_gather(top_seqs, nxt),
            scores=_gather(run_lp, nxt),
            bidx=_gather(top_bidx, nxt),
            fin_seqs=_gather(torch.cat((b.fin_seqs, top_seqs), dim=1), best),
            fin_scores=_gather(merged, best),
            fin_bidx=_gather(torch.cat((b.fin_bidx, top_bidx), dim=1), best),
            fin_done=_gather(torch.cat((b.fin_done, did), dim=1), best),
            early_ok=b.early_ok,
            cur_len=cur + 1,
        )
        hyp = self.gen.max_length - length if early == "never" and lp > 0.0 else new.cur_len - length
        best_running = new.scores[:, :1] / (hyp**lp)
        worst = torch.where(new.fin_done, torch.min(new.fin_scores, dim=1, keepdim=True)[0], NEG)
        new.early_ok = b.early_ok & torch.any(best_running > worst, dim=-1, keepdim=True)
        going = torch.any(new.early_ok) & ~(torch.all(new.fin_done) & (early is True)) & ~torch.all(hits)
        return new, _gather(src, nxt)[0], _gather(tok, nxt)[0], not bool(going)

    def _result(self, b: Beams, scores: list[torch.Tensor], raw: list[torch.Tensor]) -> RowResult:
        keep, length = self.gen.num_return_sequences, self.prompt_len
        bidx = b.fin_bidx[0, :keep]  # [R, max_len - L]
        generated = int((bidx + 1).bool().sum(dim=1).max())
        sequences = b.fin_seqs[0, :keep, : length + generated]  # [R, L + g]
        return RowResult(sequences, b.fin_scores[0, :keep], bidx[:, :generated], scores, raw)
