"""Turns one step's logits into tokens: penalties, logit bias and grammar masks,
greedy/temperature, top-k/top-p/min-p.

Sampling draws exponential noise ``q`` and takes ``argmax(probs / q)``, which is exact
categorical sampling (the exponential race). Filters run on the top-K candidates rather
than the whole vocabulary whenever every sampled row's kept set fits in them.

Noise: unseeded rows share one torch generator per device and draw in one call. A seeded
row's noise for token ``t`` is a pure hash of (seed, tokens generated so far, ``t``) (see
:mod:`auto_glm.engine.sampling_rng`), drawn at its candidate ids only, so its tokens depend
on its seed alone, never on its batch neighbours, on K, or on the device; the sampler keeps
no per-request state.

Syncs: a step copies device to host once, at the end (tokens, whether each row's logits
were finite, and logprobs, packed into one tensor); :meth:`Sampler.sample` leaves that
copy to the caller, who may start it without waiting (see the model runner). Rows with
top-p or min-p but no top-k may keep more tokens than the K candidates hold; checking that
on the host would be a sync in mid-step, so with ``sync_free`` (the default off the CPU)
such batches sort the whole vocabulary instead, while the CPU, where a check costs no
transfer, tries the candidates first and sorts only when they fall short.
Both give the same distribution, and greedy rows the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from auto_glm.engine.sampling_batch import SamplingBatch
from auto_glm.engine.sampling_rng import exponential_noise

__all__ = ["SampledRows", "Sampler", "SamplerResult", "SamplingBatch", "apply_penalties"]

TokenLogprobs = tuple[float, list[tuple[int, float]]]


@dataclass
class SamplerResult:
    token_ids: list[int]  # [B]; meaningless where the row is not finite
    logprobs: list[TokenLogprobs | None]  # [B] (chosen logprob, top-n (id, logprob)) or None
    finite: list[bool]  # [B] False where the row's logits held NaN or infinity


def _flat_keys(ids: torch.Tensor, rows: torch.Tensor, vocab: int, sink: int) -> torch.Tensor:
    """Positions ``row * V + id`` in the flattened logits; ids outside the vocabulary
    (tokenizer-only added tokens) go to ``sink``, a scratch slot past the logits."""
    valid = (ids >= 0) & (ids < vocab)
    return torch.where(valid, rows * vocab + ids, sink)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt + output, HF semantics) then presence/frequency (output, OpenAI).

    Touches only the seen (row, token) positions instead of building [B, V] counts, and
    never asks the host about data-dependent sizes: out-of-vocabulary ids land in a scratch
    slot whose row has neutral penalties.
    """
    assert batch.output_ids is not None and batch.output_rows is not None
    vocab = logits.shape[-1]
    sink = logits.numel()  # sink // vocab == B: the padded, neutral row below
    flat = torch.cat([logits.reshape(-1), logits.new_zeros(1)])  # [B * V + 1]
    out_keys = _flat_keys(batch.output_ids, batch.output_rows, vocab, sink)  # [N_out]
    if batch.any_repetition_penalty:
        assert batch.prompt_ids is not None and batch.prompt_rows is not None
        prompt_keys = _flat_keys(batch.prompt_ids, batch.prompt_rows, vocab, sink)
        seen = torch.cat([out_keys, prompt_keys])  # [N_out + N_prompt]
        vals = flat[seen]
        pen = F.pad(batch.repetition_penalty, (0, 1), value=1.0)[seen // vocab]
        # duplicate keys write identical values, so plain (non-accumulating) writes are exact
        flat[seen] = torch.where(vals > 0, vals / pen, vals * pen)
    ordered = out_keys.sort().values
    counts = torch.searchsorted(ordered, out_keys, right=True) - torch.searchsorted(
        ordered, out_keys
    )  # [N_out] occurrences of each key
    rows = out_keys // vocab
    presence = F.pad(batch.presence_penalty, (0, 1))[rows]
    frequency = F.pad(batch.frequency_penalty, (0, 1))[rows]
    flat[out_keys] = flat[out_keys] - (presence + frequency * counts)
    return flat[:sink].view_as(logits)


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
    """Samples one token per row.

    ``nucleus_candidates`` is how many top tokens are tried first for rows without a
    top-k; when their nucleus (or min-p set) does not fit, the rows are fully sorted.
    ``sync_free`` sorts such batches at once instead of checking the fit on the host;
    None picks it from the logits' device (on everywhere but the CPU).
    ``native_argmax``: a batch that only takes each row's argmax reads bfloat16 or float16
    logits as they are (half the bytes of a float32 copy, the same tokens); None picks it
    from the logits' device (on everywhere but the CPU, whose float32 reductions are the
    faster).
    """

    def __init__(
        self,
        nucleus_candidates: int = 256,
        sync_free: bool | None = None,
        native_argmax: bool | None = None,
    ) -> None:
        self.nucleus_candidates = nucleus_candidates
        self.sync_free = sync_free
        self.native_argmax = native_argmax
        self._shared: dict[torch.device, torch.Generator] = {}  # unseeded rows, per device

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerResult:
        rows = self.sample(logits, batch)
        return rows.read(rows.packed)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SampledRows:
        """The tokens of ``logits`` [B, V] (float32, or the model's bfloat16 or float16), left
        on the device; :meth:`__call__` reads them back at once. Computed in float32, except
        the argmax of a batch that takes nothing else with ``native_argmax`` (the same token:
        the float32 copy of a value is exact)."""
        if logits.dim() != 2 or logits.shape[0] != batch.size:
            raise ValueError(
                f"logits have shape {tuple(logits.shape)} but the batch has "
                f"{batch.size} rows: pass [B, V] logits of the sampling rows only"
            )
        native = self.native_argmax
        if native is None:
            native = logits.device.type != "cpu"
        if not (native and _argmax_only(batch)):
            logits = logits.float()
        # a NaN or inf anywhere in a row makes its sum NaN or inf (finite logits are far too
        # small to overflow a float32 sum): one pass, 20-40x cheaper on the CPU than
        # isfinite().all()
        finite = torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))  # [B]
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
        if raw_logprobs is None:
            return SampledRows(tokens, torch.stack([tokens, finite.long()]), None)  # [2, B]
        return _with_logprobs(raw_logprobs, tokens, finite, batch)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits / batch.temperature[:, None]
        vocab = logits.shape[-1]
        if not (batch.any_top_k or batch.any_top_p or batch.any_min_p):
            probs = logits.softmax(-1)
            return (probs / self._noise(batch, probs.shape, None)).argmax(-1)
        # filters keep few tokens: work on the top-K candidates, not the whole vocabulary
        sync_free = self.sync_free
        if sync_free is None:
            sync_free = logits.device.type != "cpu"
        k = batch.max_top_k
        if not batch.all_sampled_top_k:
            k = vocab if sync_free else max(k, self.nucleus_candidates)
        k = min(k, vocab)
        lse = None
        if k == vocab:
            vals, idx = logits.sort(dim=-1, descending=True)  # [B, V]
        else:
            vals, idx = logits.topk(k, dim=-1)  # [B, K] sorted descending
            if not batch.all_sampled_top_k:
                lse = logits.logsumexp(-1)
        probs = _filter_sorted(vals, lse, batch)  # [B, K]
        # a row without top-k fits in K if its last candidate is already filtered out;
        # reading that is a host sync, done only here, on the CPU path
        if lse is not None and not bool(
            (batch.greedy | (batch.top_k > 0) | (probs[:, -1] == 0)).all()
        ):
            vals, idx = logits.sort(dim=-1, descending=True)
            probs = _filter_sorted(vals, None, batch)
        choice = (probs / self._noise(batch, probs.shape, idx)).argmax(-1, keepdim=True)
        return idx.gather(-1, choice).squeeze(-1)

    def _noise(
        self, batch: SamplingBatch, shape: torch.Size, idx: torch.Tensor | None
    ) -> torch.Tensor:
        """Exponential noise [B, K] for the candidates ``idx`` [B, K] (None: the whole
        vocabulary, K == V). Seeded rows hash their (seed, position, candidate id)."""
        device = batch.greedy.device
        ids = torch.arange(shape[-1], device=device)[None] if idx is None else idx  # [1|B, K]
        if batch.all_seeded:
            return exponential_noise(batch.seed_lo, batch.seed_hi, batch.output_lens, ids)
        shared = self._shared.get(device)
        if shared is None:
            shared = self._shared[device] = torch.Generator(device=device)
            shared.seed()
        # -log(U) is Exp(1); U == 0 gives q = inf, which merely excludes that token
        noise = torch.rand(shape, generator=shared, device=device).log_().neg_()
        rows = batch.seeded_rows
        if rows is not None:
            row_ids = ids if idx is None else idx[rows]  # [1|S, K]
            seeded = (batch.seed_lo[rows], batch.seed_hi[rows], batch.output_lens[rows])
            noise[rows] = exponential_noise(*seeded, row_ids)
        return noise


def _argmax_only(batch: SamplingBatch) -> bool:
    """Whether the batch's tokens are the rows' argmax of the raw logits: every row greedy,
    nothing added to the logits, no logprobs."""
    return (
        batch.all_greedy
        and not batch.any_penalty
        and batch.constraints is None
        and batch.max_num_logprobs is None
    )


def _with_logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, finite: torch.Tensor, batch: SamplingBatch
) -> SampledRows:
    """Tokens, finite flags, and raw-model logprobs of the chosen tokens and each row's
    top-n, packed for one device-to-host copy: ids fit float64 exactly, float32 logprobs
    too."""
    n = min(batch.max_num_logprobs or 0, raw.shape[-1])
    values, ids = raw.topk(n, dim=-1)  # [B, n]
    chosen = raw.gather(-1, tokens[:, None])  # [B, 1]
    packed = torch.cat([tokens[:, None], ids], 1).double()  # [B, 1 + n]
    flags = finite[:, None].double()  # [B, 1]
    packed = torch.cat([packed, chosen.double(), values.double(), flags], 1)  # [B, 3 + 2n]
    return SampledRows(tokens, packed, batch.num_logprobs)


@dataclass
class SampledRows:
    """One step's sampling, still on the device: ``packed`` holds all the host reads of it
    (one copy), ``tokens`` the ids alone, which the next step may feed without reading them."""

    tokens: torch.Tensor  # [B] int64
    # [2, B] int64 (ids, finite flags); with logprobs [B, 3 + 2n] float64 (id, top-n ids,
    # the id's logprob, top-n logprobs, finite flag)
    packed: torch.Tensor
    num_logprobs: list[int | None] | None  # [B] logprobs wanted per row; None: none wanted

    def read(self, packed: torch.Tensor) -> SamplerResult:
        """The result, from ``packed`` or its copy on the host."""
        if self.num_logprobs is None:
            token_ids, ok = packed.tolist()
            return SamplerResult(token_ids, [None] * len(token_ids), [bool(f) for f in ok])
        rows = packed.tolist()
        n = (packed.shape[1] - 3) // 2
        token_ids = [int(row[0]) for row in rows]
        logprobs: list[TokenLogprobs | None] = []
        for row, want in zip(rows, self.num_logprobs, strict=True):
            if want is None:
                logprobs.append(None)
                continue
            want = min(want, n)  # a vocabulary smaller than the request has no more
            top_ids, top_values = row[1 : 1 + want], row[2 + n : 2 + n + want]
            top = [(int(i), v) for i, v in zip(top_ids, top_values, strict=True)]
            logprobs.append((row[1 + n], top))
        return SamplerResult(token_ids, logprobs, [bool(row[-1]) for row in rows])
