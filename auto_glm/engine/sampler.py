"""Turns one step's logits into tokens: penalties, logit bias and grammar masks,
greedy/temperature, top-k/top-p/min-p.

Sampling draws exponential noise ``q`` and takes ``argmax(probs / q)``, which is exact
categorical sampling (the exponential race). Filters run on the top-K candidates rather
than the whole vocabulary whenever every sampled row's kept set provably fits in them.
A seeded request owns a generator that is created once and draws its own vocabulary-sized
noise each step, so its output depends only on its seed, never on its batch neighbours.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from auto_glm.engine.logit_constraints import LogitConstraints
from auto_glm.engine.request import Request

__all__ = ["Sampler", "SamplerResult", "SamplingBatch", "apply_penalties"]

TokenLogprobs = tuple[float, list[tuple[int, float]]]


def _flat_ids(id_lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows' ids in one flat tensor plus the row of each: one host-to-device copy."""
    ids = torch.tensor(list(itertools.chain.from_iterable(id_lists)), dtype=torch.long)
    lens = torch.tensor([len(x) for x in id_lists], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(id_lists)), lens)
    return ids.to(device), rows.to(device)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of the requests that sample this step, in logits order."""

    request_ids: list[str]
    seeds: list[int | None]  # [B] None for unseeded and for greedy rows
    num_logprobs: list[int | None]  # [B] top alternatives wanted per row
    greedy: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows, whose argmax comes first
    top_k: torch.Tensor  # [B] int64; 0 = off
    top_p: torch.Tensor  # [B] float32; 1 = off
    min_p: torch.Tensor  # [B] float32; 0 = off
    repetition_penalty: torch.Tensor  # [B] float32; 1 = off
    presence_penalty: torch.Tensor  # [B] float32; 0 = off
    frequency_penalty: torch.Tensor  # [B] float32; 0 = off
    output_ids: torch.Tensor | None  # [N_out] flat output ids, only when a penalty is on
    output_rows: torch.Tensor | None  # [N_out] row of each output id
    prompt_ids: torch.Tensor | None  # [N_prompt] flat prompt ids, only for repetition penalty
    prompt_rows: torch.Tensor | None  # [N_prompt]
    all_greedy: bool
    any_greedy: bool
    any_penalty: bool
    any_repetition_penalty: bool
    # filter flags and top-k bounds look at sampled (non-greedy) rows only
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    max_top_k: int  # largest top_k among sampled rows, 0 if none
    all_sampled_top_k: bool  # every sampled row has a top-k
    max_num_logprobs: int | None  # None when no row wants logprobs
    constraints: LogitConstraints | None  # logit_bias and grammars; None when no row has any

    @property
    def size(self) -> int:
        return len(self.request_ids)

    @classmethod
    def from_requests(cls, requests: list[Request], device: torch.device | str) -> SamplingBatch:
        if not requests:
            raise ValueError("no requests to sample for: build a SamplingBatch only when B >= 1")
        device = torch.device(device)
        params = [r.sampling_params for r in requests]
        greedy = [p.greedy for p in params]
        sampled = [p for p in params if not p.greedy]

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        any_rep = any(p.repetition_penalty != 1.0 for p in params)
        any_penalty = any_rep or any(
            p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params
        )
        out_ids = out_rows = prompt_ids = prompt_rows = None
        if any_penalty:
            out_ids, out_rows = _flat_ids([r.output_token_ids for r in requests], device)
        if any_rep:
            prompt_ids, prompt_rows = _flat_ids([r.prompt_token_ids for r in requests], device)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            request_ids=[r.request_id for r in requests],
            seeds=[None if p.greedy else p.seed for p in params],
            num_logprobs=[p.logprobs for p in params],
            greedy=column(greedy, torch.bool),
            temperature=column([1.0 if p.greedy else p.temperature for p in params]),
            top_k=column([p.top_k for p in params], torch.long),
            top_p=column([p.top_p for p in params]),
            min_p=column([p.min_p for p in params]),
            repetition_penalty=column([p.repetition_penalty for p in params]),
            presence_penalty=column([p.presence_penalty for p in params]),
            frequency_penalty=column([p.frequency_penalty for p in params]),
            output_ids=out_ids,
            output_rows=out_rows,
            prompt_ids=prompt_ids,
            prompt_rows=prompt_rows,
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            any_penalty=any_penalty,
            any_repetition_penalty=any_rep,
            any_top_k=any(p.top_k > 0 for p in sampled),
            any_top_p=any(p.top_p < 1.0 for p in sampled),
            any_min_p=any(p.min_p > 0.0 for p in sampled),
            max_top_k=max((p.top_k for p in sampled), default=0),
            all_sampled_top_k=all(p.top_k > 0 for p in sampled),
            max_num_logprobs=max(wanted) if wanted else None,
            constraints=LogitConstraints.from_requests(requests, device),
        )


@dataclass
class SamplerResult:
    token_ids: list[int]  # [B]
    logprobs: list[TokenLogprobs | None]  # [B] (chosen logprob, top-n (id, logprob)) or None


def _flat_keys(ids: torch.Tensor, rows: torch.Tensor, vocab: int) -> torch.Tensor:
    """Positions ``row * V + id`` in the flattened logits; ids outside the vocabulary
    (tokenizer-only added tokens) are dropped."""
    valid = (ids >= 0) & (ids < vocab)
    return (rows * vocab + ids)[valid]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt + output, HF semantics) then presence/frequency (output, OpenAI).

    Touches only the seen (row, token) positions instead of building [B, V] counts.
    """
    assert batch.output_ids is not None and batch.output_rows is not None
    vocab = logits.shape[-1]
    flat = logits.reshape(-1).clone()  # [B * V]
    out_keys = _flat_keys(batch.output_ids, batch.output_rows, vocab)  # [N_out]
    if batch.any_repetition_penalty:
        assert batch.prompt_ids is not None and batch.prompt_rows is not None
        seen = torch.cat([out_keys, _flat_keys(batch.prompt_ids, batch.prompt_rows, vocab)])
        vals = flat[seen]
        pen = batch.repetition_penalty[seen // vocab]
        # duplicate keys write identical values, so plain (non-accumulating) writes are exact
        flat[seen] = torch.where(vals > 0, vals / pen, vals * pen)
    keys, counts = torch.unique(out_keys, return_counts=True)
    rows = keys // vocab
    flat[keys] -= batch.presence_penalty[rows] + batch.frequency_penalty[rows] * counts
    return flat.view_as(logits)


def _filter_sorted(
    vals: torch.Tensor,
    lse: torch.Tensor | None,
    batch: SamplingBatch,
) -> torch.Tensor:
    """Probabilities of the candidates ``vals`` ([B, K], sorted descending) after top-k,
    top-p and min-p, unnormalized, 0 where filtered out.

    ``lse`` [B] is the log-normalizer of the whole row, needed by rows without a top-k
    when K is smaller than the vocabulary: top-p counts mass of the full distribution.
    """
    ranks = torch.arange(vals.shape[-1], device=vals.device)
    has_k = batch.top_k > 0  # [B]
    vals = vals.masked_fill(has_k[:, None] & (ranks >= batch.top_k[:, None]), float("-inf"))
    norm = vals.logsumexp(-1)  # top-k rows renormalize over their k kept tokens
    if lse is not None:
        norm = torch.where(has_k, norm, lse)
    probs = (vals - norm[:, None]).exp()  # [B, K]
    if batch.any_top_p:
        # keep the shortest prefix reaching top_p: drop a token once the mass before it does
        before = probs.cumsum(-1) - probs
        drop = (before >= batch.top_p[:, None]) & (batch.top_p < 1.0)[:, None]
        probs = probs.masked_fill(drop, 0.0)
    if batch.any_min_p:
        probs = probs.masked_fill(probs < batch.min_p[:, None] * probs[:, :1], 0.0)
    return probs


class Sampler:
    """Samples one token per row; keeps each seeded request's generator across steps.

    ``nucleus_candidates`` is how many top tokens are tried first for rows without a
    top-k; when their nucleus (or min-p set) does not fit, the rows are fully sorted.
    """

    def __init__(self, nucleus_candidates: int = 256) -> None:
        self.nucleus_candidates = nucleus_candidates
        self._generators: dict[str, torch.Generator] = {}
        self._shared: dict[torch.device, torch.Generator] = {}  # unseeded rows, per device

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator."""
        self._generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerResult:
        if logits.dim() != 2 or logits.shape[0] != batch.size:
            raise ValueError(
                f"logits have shape {tuple(logits.shape)} but the batch has "
                f"{batch.size} rows: pass [B, V] logits of the sampling rows only"
            )
        raw_logprobs = logits.log_softmax(-1) if batch.max_num_logprobs is not None else None
        if batch.any_penalty:
            logits = apply_penalties(logits, batch)
        if batch.constraints is not None:
            logits = batch.constraints.apply(logits)
        if batch.all_greedy:
            tokens = logits.argmax(-1)  # [B]
        else:
            tokens = self._sample(logits, batch)
            if batch.any_greedy:
                tokens = torch.where(batch.greedy, logits.argmax(-1), tokens)
        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * batch.size
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, tokens, batch)
        return SamplerResult(token_ids=token_list, logprobs=logprobs)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits / batch.temperature[:, None]
        vocab = logits.shape[-1]
        if not (batch.any_top_k or batch.any_top_p or batch.any_min_p):
            probs = logits.softmax(-1)
            return (probs / self._noise(batch, probs.shape, None, vocab)).argmax(-1)
        # filters keep few tokens: work on the top-K candidates, not the whole vocabulary
        k = batch.max_top_k
        if not batch.all_sampled_top_k:
            k = max(k, self.nucleus_candidates)
        k = min(k, vocab)
        vals, idx = logits.topk(k, dim=-1)  # [B, K] sorted descending
        lse = logits.logsumexp(-1) if k < vocab and not batch.all_sampled_top_k else None
        probs = _filter_sorted(vals, lse, batch)  # [B, K]
        # a row without top-k fits in K if its last candidate is already filtered out
        if lse is not None and not bool(
            (batch.greedy | (batch.top_k > 0) | (probs[:, -1] == 0)).all()
        ):
            vals, idx = logits.sort(dim=-1, descending=True)
            probs = _filter_sorted(vals, None, batch)
        choice = (probs / self._noise(batch, probs.shape, idx, vocab)).argmax(-1, keepdim=True)
        return idx.gather(-1, choice).squeeze(-1)

    def _noise(
        self, batch: SamplingBatch, shape: torch.Size, idx: torch.Tensor | None, vocab: int
    ) -> torch.Tensor:
        """Exponential noise [B, K]; seeded rows draw over the whole vocabulary (``vocab``
        ids, then picked at their candidates ``idx``) so the draw never depends on K."""
        device = batch.greedy.device
        shared = self._shared.get(device)
        if shared is None:
            shared = self._shared[device] = torch.Generator(device=device)
            shared.seed()
        # -log(U) is Exp(1); U == 0 gives q = inf, which merely excludes that token
        noise = torch.rand(shape, generator=shared, device=device).log_().neg_()
        for row, seed in enumerate(batch.seeds):
            if seed is None:
                continue
            gen = self._generators.get(batch.request_ids[row])
            if gen is None:
                gen = self._generators[batch.request_ids[row]] = torch.Generator(device=device)
                gen.manual_seed(seed)
            uniform = torch.rand(vocab, generator=gen, device=device)  # [V]
            noise[row] = (uniform if idx is None else uniform[idx[row]]).log_().neg_()
        return noise


def _gather_logprobs(
    raw: torch.Tensor,
    tokens: torch.Tensor,
    batch: SamplingBatch,
) -> list[TokenLogprobs | None]:
    """Raw-model logprobs of the chosen tokens and each row's top-n, as Python lists."""
    chosen = raw.gather(-1, tokens[:, None]).squeeze(-1).tolist()
    values, ids = raw.topk(min(batch.max_num_logprobs or 0, raw.shape[-1]), dim=-1)  # [B, n]
    top_vals, top_ids = values.tolist(), ids.tolist()
    return [
        None
        if n is None
        else (chosen[row], list(zip(top_ids[row][:n], top_vals[row][:n], strict=True)))
        for row, n in enumerate(batch.num_logprobs)
    ]
