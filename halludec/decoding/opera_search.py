"""OPERA's search on one batch row: a generator asking for forwards (``opera_batch`` drives the rows together).

Each batch row is searched on its own slice of the cache (a rollback moves a row back to its own length, which a
shared cache cannot hold). A step feeds the ``K * C`` candidate rows in one forward; the chosen continuations are
among them, so their cache rows, logits and attention rows are kept and no other forward is needed (a redo step
after a rollback, or a dead beam's token that is no candidate, is fed as usual). The beam bookkeeping (top-``2K``
continuations, finished hypotheses with the length penalty, the early-stopping heuristic) follows transformers'
vectorised ``_beam_search`` step for step, so with no penalty, no rollback and every token a candidate the search
returns what ``model.generate(num_beams=K)`` returns. Every model call goes through the model's own
``prepare_inputs_for_generation`` and ``_update_model_kwargs_for_generation``, as generate's loops do.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from halludec.decoding.opera import (
    RowResult,
    candidate_scores,
    column_scores,
    fill_value,
    log_columns,
    mark_cache,
    normalised_rows,
    restore_cache,
    smallest_mode,
    take_rows,
)

if TYPE_CHECKING:
    from halludec.decoding.context import CallContext
    from halludec.decoding.opera import OPERAConfig
    from halludec.decoding.opera_batch import Request, Search

NEG = -1.0e9  # transformers' beam search masks with this value


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
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None  # the last forward's recorded attention rows
        self.fed: tuple | None = None  # this step's batched candidate forward: (marks, output, rows, candidates)

    # -------------------------------------------------------------------------------------------- main loop
    def run(self, input_ids: torch.Tensor, logits: torch.Tensor) -> Search:
        """Search from the prefill's ``logits [K, V]`` for prompts ``input_ids [K, L]``: a generator yielding
        forward requests (see ``opera_batch.run_searches``) and returning the row's result."""
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
        prompt = (mark_cache(self.cache), dict(self.kw)) if roll else None
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
                    penalty, loc = yield from self._candidates(seqs, cand, colsum, t)  # [K, C] each
                    locs = torch.cat([locs, smallest_mode(loc, t + 1)[:, None]], dim=1)  # [K, t + 1]
                    if roll:
                        history.append(Snapshot(t, b.clone(), locs.clone(), len(scores)))
                    if roll and (pos := self._rollback_position(locs, t, rollbacks, history)) is not None:
                        b, locs, refeed, redo = self._rollback(pos, history, rejects, prompt)
                        colsum, logits = yield from refeed
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
            colsum, locs = colsum[source], locs[source]
            kept = self._keep(source, token) if self.fed is not None else None
            if kept is None:  # no candidate forward this step (or a chosen token was no candidate): feed them
                self.cache.reorder_cache(source)
                kept = yield from self._feed(b.seqs[0, :, : b.cur_len], reads)
            logits, row = kept
            if reads:
                colsum = F.pad(colsum, (0, 1)) + log_columns(row[:, -(t + 1) :], cfg.scale_factor)  # [K, t + 1]
        if self.fed is not None:
            restore_cache(self.cache, self.fed[0])
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
    def _forward(self, seqs: torch.Tensor, kwargs: dict[str, Any]) -> Generator[Request, Any, Any]:
        """Ask for a forward of ``seqs`` (the last token fed) with ``kwargs``; returns the model output."""
        out, self.rows = yield seqs, kwargs
        return out

    def _row(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded last row: normalised attention ``[K, keys]`` and its image mass ``[K]``."""
        top, image = self.rows  # [K, q, keys], [K, q]
        top, image = top[:, -1].float().to(self.device), image[:, -1].float().to(self.device)  # the layer's device
        return normalised_rows(top), image / top.sum(-1).clamp_min(torch.finfo(torch.float32).tiny)

    def _feed(self, seqs: torch.Tensor, reads: bool) -> Generator[Request, Any, tuple]:
        """Feed each beam's last token: the next logits ``[K, V]`` and (when read) its attention row."""
        out = yield from self._forward(seqs, self.kw)
        self.kw = self.model._update_model_kwargs_for_generation(out, self.kw)
        logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32, device=seqs.device)  # [K, V]
        return logits, (self._row()[0] if reads else None)

    def _candidates(self, seqs: torch.Tensor, cand: torch.Tensor, colsum: torch.Tensor, t: int) -> Generator:
        """Feed every candidate in one forward of ``K * C`` rows (beam ``k``'s candidate ``c`` in row ``k * C + c``,
        on the beam's cache rows repeated ``C`` times; the cache keeps those rows until ``_keep`` picks the chosen
        ones): each candidate's over-trust penalty and location ``[K, C]``. Composed with other strategies (their
        per-row state, side-branch rows laid out for ``K`` main rows): one forward of the ``K`` beam rows per
        candidate instead, the cache rewound after each."""
        if len(self.call.strategies) > 1:
            return (yield from self._candidates_serial(seqs, cand, colsum, t))
        k, c = cand.shape
        marks = mark_cache(self.cache)
        index = torch.arange(k, device=cand.device).repeat_interleave(c)  # [K * C]: beam of each candidate row
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.batch_select_indices(index.to(layer.keys.device))  # new tensors; ``marks`` keeps the old
        ids = torch.cat([seqs.index_select(0, index), cand.reshape(-1, 1)], dim=1)  # [K * C, cur_len + 1]
        try:
            out = yield from self._forward(ids, take_rows(self.kw, index, k))
        except BaseException:
            restore_cache(self.cache, marks)
            raise
        row, image = self._row()  # [K * C, keys], [K * C]
        self.fed = (marks, out, row, cand)  # the chosen continuations are among these rows: ``_keep``
        rows = row[:, -(t + 1) :].reshape(k, c, t + 1)  # the response tokens, the candidate last
        score, loc = column_scores(colsum, rows, self.cfg.scale_factor, self.cfg.fp16_scores)
        if t + 1 <= self.cfg.early_tokens:  # the first tokens: a bonus for attending to the image instead
            score = -image.reshape(k, c)  # [K, C]
        return score, loc

    def _keep(self, source: torch.Tensor, token: torch.Tensor) -> tuple | None:
        """After the batched candidate forward, the chosen continuations (beam ``source [K]``, ``token [K]``) were
        fed already: keep their cache rows, and return their next logits ``[K, V]`` and attention rows (what
        ``_feed`` would compute). None (the cache put back) where a chosen token is no candidate (a dead beam)."""
        marks, out, row, cand = self.fed
        self.fed = None
        hit = cand[source] == token[:, None]  # [K, C]
        if not bool(hit.any(-1).all()):
            restore_cache(self.cache, marks)
            return None
        pick = source * cand.shape[1] + hit.int().argmax(-1)  # [K]: the candidate rows of the chosen continuations
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.batch_select_indices(pick.to(layer.keys.device))  # [K, H, S + 1, d]
        self.kw = self.model._update_model_kwargs_for_generation(out, self.kw)
        logits = out.logits[pick.to(out.logits.device), -1, :]  # [K, V]
        return logits.to(copy=True, dtype=torch.float32, device=self.device), row[pick]

    def _candidates_serial(self, seqs: torch.Tensor, cand: torch.Tensor, colsum: torch.Tensor, t: int) -> Generator:
        """``_candidates`` one candidate at a time: ``C`` forwards of the ``K`` beam rows, the cache rewound after
        each (what composed strategies see as ``C`` decoding steps of ``K`` rows)."""
        marks = mark_cache(self.cache)
        rows, images = [], []
        for c in range(cand.shape[1]):
            try:
                yield from self._forward(torch.cat([seqs, cand[:, c : c + 1]], dim=1), self.kw)
            finally:
                restore_cache(self.cache, marks)
            row, image = self._row()
            rows.append(row[:, -(t + 1) :])  # [K, t + 1]: the response tokens, the candidate last
            images.append(image)
        score, loc = column_scores(colsum, torch.stack(rows, 1), self.cfg.scale_factor, self.cfg.fp16_scores)
        if t + 1 <= self.cfg.early_tokens:
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
        """Go back to step ``pos``: its beams, the cache put back to the prompt's, earlier choices there excluded.

        Returns:
            ``(beams, locations [K, pos + 1], refeed, excluded [n])``; ``refeed`` is a generator feeding the
            response tokens ``0 .. pos - 1`` again, returning ``(colsum [K, pos], logits [K, V])``.
        """
        while history[-1].t > pos:
            history.pop()
        snap = history[-1]
        rejects[pos] = torch.cat([r for r in (rejects.get(pos), snap.choice) if r is not None])
        for later in [p for p in rejects if p > pos]:
            del rejects[later]
        b, self.fed = snap.beams.clone(), None
        marks, kwargs = prompt
        restore_cache(self.cache, marks)
        self.kw = dict(kwargs)
        return b, snap.locs.clone(), self._refeed(b, pos), rejects[pos]

    def _refeed(self, b: Beams, pos: int) -> Generator[Request, Any, tuple]:
        """Feed the first ``pos`` response tokens of ``b`` from the prompt's cache: ``(colsum, logits)``."""
        colsum, length = b.scores.new_zeros(b.seqs.shape[1], 0), self.prompt_len  # [K, 0]
        for j in range(pos):  # one token at a time: every forward looks like a decoding step to other strategies
            logits, row = yield from self._feed(b.seqs[0, :, : length + j + 1], self.cfg.reads_attention)
            colsum = F.pad(colsum, (0, 1)) + log_columns(row[:, -(j + 1) :], self.cfg.scale_factor)  # [K, j + 1]
        return colsum, logits

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
