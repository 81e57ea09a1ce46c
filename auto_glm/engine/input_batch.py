"""Turn a scheduler plan into the packed tensors and attention metadata of one forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from auto_glm.engine.plan import SchedulerOutput
from auto_glm.engine.request import Request
from auto_glm.layers.attention import AttentionMetadata, PrefillChunk

__all__ = ["ModelInput", "prepare_input"]


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [num_sampled] row of the last fed token of each sampling request
    sample_requests: list[Request]  # [num_sampled]
    order: list[int]  # [num_reqs] plan index of each request, in batch row order


def _slots(block_table: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Cache slots of positions 0..length-1 of one sequence."""
    offsets = torch.arange(block_size, device=block_table.device)
    return (block_table[:, None] * block_size + offsets).flatten()[:length]


def prepare_input(plan: SchedulerOutput, block_size: int, device: torch.device) -> ModelInput:
    # decodes (one fed token) go first so they share one batched attention call
    order = sorted(range(len(plan.requests)), key=lambda i: plan.num_scheduled_tokens[i] != 1)
    offsets, start = [], 0
    for n in plan.num_scheduled_tokens:
        offsets.append(start)
        start += n
    ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    sample_rows: list[int] = []
    sample_requests: list[Request] = []
    decode_lens: list[int] = []
    decode_tables: list[list[int]] = []
    prefills: list[PrefillChunk] = []
    for i in order:
        req, n, pos = plan.requests[i], plan.num_scheduled_tokens[i], plan.start_positions[i]
        row = len(ids)
        ids.extend(req.all_token_ids[pos : pos + n])
        positions.extend(range(pos, pos + n))
        slot_mapping.extend(plan.slot_mapping[offsets[i] : offsets[i] + n])
        if pos + n == req.num_tokens:
            sample_rows.append(row + n - 1)
            sample_requests.append(req)
        if n == 1:
            decode_lens.append(pos + 1)
            decode_tables.append(plan.block_tables[i])
        elif pos == 0:
            prefills.append(PrefillChunk(row, n))
        else:
            table = torch.tensor(plan.block_tables[i], dtype=torch.long, device=device)
            kv_len = pos + n
            mask = (
                torch.arange(kv_len, device=device)[None, :]
                <= torch.arange(pos, kv_len, device=device)[:, None]
            )
            prefills.append(PrefillChunk(row, n, _slots(table, block_size, kv_len), mask))
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        num_decodes=len(decode_lens),
        prefills=prefills,
    )
    if decode_lens:
        max_blocks = max(len(t) for t in decode_tables)
        md.block_size = block_size
        md.decode_block_tables = torch.tensor(
            [t + [0] * (max_blocks - len(t)) for t in decode_tables],
            dtype=torch.long,
            device=device,
        )
        md.decode_context_lens = torch.tensor(decode_lens, dtype=torch.long, device=device)
    return ModelInput(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        metadata=md,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
        sample_requests=sample_requests,
        order=order,
    )
