"""Turn a scheduler plan into the packed tensors and attention metadata of one forward pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from auto_glm.engine.plan import SchedulerOutput
from auto_glm.engine.request import Request
from auto_glm.layers.attention_backends import AttentionBackend, ScheduledSequence, StepLayout
from auto_glm.platforms import tensor_on

__all__ = ["ModelInput", "prepare_input"]


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    metadata: Any  # built by the attention backend
    sample_rows: torch.Tensor  # [num_sampled] row of the last fed token of each sampling request
    sample_requests: list[Request]  # [num_sampled]
    order: list[int]  # [num_reqs] plan index of each request, in batch row order
    # a plan made ahead: the rows fed a token in flight (a placeholder in input_ids until
    # the device gathers it), and the index of each among sample_requests; both [num_pending]
    pending_rows: list[int]
    pending_samples: list[int]


def prepare_input(
    plan: SchedulerOutput, backend: AttentionBackend, block_size: int, device: torch.device
) -> ModelInput:
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
    sequences: list[ScheduledSequence] = []
    pending_rows: list[int] = []
    pending_samples: list[int] = []
    pending = plan.pending
    num_decodes = 0
    for i in order:
        req, n, pos = plan.requests[i], plan.num_scheduled_tokens[i], plan.start_positions[i]
        row = len(ids)
        in_flight = bool(pending) and pending[i]
        if in_flight:  # one token, not in all_token_ids yet
            ids.append(0)
            pending_rows.append(row)
            pending_samples.append(len(sample_rows))
        else:
            ids.extend(req.all_token_ids[pos : pos + n])
        positions.extend(range(pos, pos + n))
        slot_mapping.extend(plan.slot_mapping[offsets[i] : offsets[i] + n])
        if pos + n == req.num_tokens + in_flight:
            sample_rows.append(row + n - 1)
            sample_requests.append(req)
        num_decodes += n == 1
        sequences.append(ScheduledSequence(row, n, pos, list(plan.block_tables[i])))
    layout = StepLayout(slot_mapping, sequences, num_decodes, block_size)
    return ModelInput(
        input_ids=tensor_on(ids, torch.long, device),
        positions=tensor_on(positions, torch.long, device),
        metadata=backend.build_metadata(layout, device),
        sample_rows=tensor_on(sample_rows, torch.long, device),
        sample_requests=sample_requests,
        order=order,
        pending_rows=pending_rows,
        pending_samples=pending_samples,
    )
