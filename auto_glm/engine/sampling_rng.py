"""Counter-based random numbers for seeded sampling: a pure hash of (seed, position, token).

The uniform of token ``t`` for a row with seed ``s`` that has generated ``n`` tokens so far
is ``hash(s, n, t)``, computed with vectorized int64 tensor ops. It depends on nothing
else: not on the batch neighbours, not on how many candidates the sampler looked at, not on
the device. There is no state to keep between steps.

All mixing is 32-bit arithmetic held in int64 tensors: every value stays below ``2**32``
and every multiplier below ``2**31``, so a product stays below ``2**63`` and masking keeps
its low 32 bits without any overflow. A 64-bit seed enters as its two 32-bit halves.
"""

from __future__ import annotations

import torch

__all__ = ["exponential_noise", "hash32", "mix32", "seed_halves", "uniforms"]

_MASK = 0xFFFFFFFF
# odd multipliers below 2**31 in the xorshift-multiply shape of murmur3's finalizer; their
# avalanche bias measures at the sampling-noise floor of a 200k-input test
_MUL_A = 0x21F0AAAD
_MUL_B = 0x735A2D97
_SALT_SEED = 0x9E3779B9  # keeps seed 0 from hashing the all-zero state
_TWO_POW_32 = 2.0**-32
_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1


def seed_halves(seed: int) -> tuple[int, int]:
    """Low and high 32 bits of a seed, read as a 64-bit two's-complement integer."""
    return seed & _MASK, (seed >> 32) & _MASK


def mix32(h: torch.Tensor) -> torch.Tensor:
    """A bijection of int64 values in ``[0, 2**32)`` onto themselves that scrambles every
    input bit into every output bit; returns a new tensor."""
    return _mix32_(h.clone())


def _mix32_(h: torch.Tensor) -> torch.Tensor:
    """:func:`mix32` in place, through one scratch tensor: no other allocation per pass."""
    scratch = torch.empty_like(h)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=scratch))
    h.mul_(_MUL_A).bitwise_and_(_MASK)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 15, out=scratch))
    h.mul_(_MUL_B).bitwise_and_(_MASK)
    return h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=scratch))


def hash32(
    seed_lo: torch.Tensor, seed_hi: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """int64 hashes in ``[0, 2**32)`` of (seed, position, token id).

    ``seed_lo``, ``seed_hi``, ``positions``: [S] int64 per row; ``token_ids``: [S, K] or
    [1, K] int64 ids to draw for. Returns [S, K]. The row key mixes once per row and each
    id once per id; only the final mix of the two runs per (row, id).
    """
    key = _mix32_(seed_lo ^ _SALT_SEED)
    key = _mix32_(key ^ seed_hi)
    key = _mix32_(key ^ (positions & _MASK))  # [S]
    return _mix32_(mix32(token_ids) ^ key[:, None])  # [S, K]


def uniforms(
    seed_lo: torch.Tensor, seed_hi: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """float32 uniforms [S, K] strictly inside (0, 1): ``(hash + 0.5) / 2**32`` rounded to
    float32 and kept below 1. Near 0 they step by ``2**-32``, fine enough that the
    exponentials made from them (``-log(1 - u)``, small where u is) rarely tie."""
    h = hash32(seed_lo, seed_hi, positions, token_ids)
    return h.float().add_(0.5).mul_(_TWO_POW_32).clamp_(max=_BELOW_ONE)


def exponential_noise(
    seed_lo: torch.Tensor, seed_hi: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """float32 Exp(1) noise [S, K], ``-log(1 - u)`` of :func:`uniforms`: finite and > 0."""
    h = hash32(seed_lo, seed_hi, positions, token_ids)
    neg_u = h.float().add_(0.5).mul_(-_TWO_POW_32).clamp_(min=-_BELOW_ONE)  # -u
    return neg_u.log1p_().neg_()
