"""The multimodal part of one forward pass: M-RoPE positions and image embeddings.

The vision tower runs for an image in the step whose prefill chunk first covers one of its
placeholder tokens (all such images of the step in one call); its tokens stay on the request
(``Request.image_embeds``) until the chunk that covers its last placeholder, then are
dropped. A chunk boundary may fall inside an image: each chunk takes the slice of the
image's tokens that it covers. A preempted request re-encodes what it dropped when its
prefill is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from auto_glm.engine.plan import SchedulerOutput
from auto_glm.engine.request import Request
from auto_glm.platforms import to_device

__all__ = ["VisionInput", "prepare_vision_input"]


@dataclass
class VisionInput:
    positions: torch.Tensor  # [3, num_tokens] M-RoPE rows
    image_embeds: torch.Tensor | None  # [N, D] image tokens fed this step
    image_rows: torch.Tensor | None  # [N] their rows in the packed batch


def _mrope(model, request: Request) -> torch.Tensor:
    """The prompt's M-RoPE rows [3, num_prompt_tokens], with ``request.rope_offset``."""
    if request.mrope is None:
        grids = [image.grid_thw for image in request.images]
        request.mrope, request.rope_offset = model.mrope_positions(
            request.num_prompt_tokens, list(zip(request.image_offsets, grids, strict=True))
        )
    return request.mrope


def _positions(model, request: Request, start: int, count: int) -> torch.Tensor:
    """[3, count] M-RoPE rows of tokens ``start .. start + count - 1``."""
    rows = _mrope(model, request)
    delta = request.rope_offset
    num_prompt = rows.shape[1]
    if start + count <= num_prompt:
        return rows[:, start : start + count]
    tail_start = max(start, num_prompt)  # generated tokens sit at index + delta in each row
    tail = torch.arange(tail_start + delta, start + count + delta).expand(3, -1)
    if start >= num_prompt:
        return tail
    return torch.cat((rows[:, start:], tail), dim=1)


def _encode_missing(model, plan: SchedulerOutput, device: torch.device) -> None:
    """Run the vision tower once for every image first reached by this step's chunks."""
    pending: list[tuple[Request, int]] = []
    for request, count, start in zip(
        plan.requests, plan.num_scheduled_tokens, plan.start_positions, strict=True
    ):
        for index, (offset, image) in enumerate(
            zip(request.image_offsets, request.images, strict=True)
        ):
            covered = offset < start + count and offset + image.num_tokens > start
            if covered and index not in request.image_embeds:
                pending.append((request, index))
    if not pending:
        return
    images = [request.images[index] for request, index in pending]
    embeds = model.encode_images(
        [to_device(image.pixel_values, device) for image in images],
        [image.grid_thw for image in images],
    )
    for (request, index), embed in zip(pending, embeds, strict=True):
        request.image_embeds[index] = embed


def prepare_vision_input(
    plan: SchedulerOutput, order: list[int], model, device: torch.device
) -> VisionInput:
    """Positions and image tokens of a step whose requests are packed in ``order``."""
    _encode_missing(model, plan, device)
    positions: list[torch.Tensor] = []
    embeds: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    row = 0
    for i in order:
        request, count = plan.requests[i], plan.num_scheduled_tokens[i]
        start = plan.start_positions[i]
        end = start + count
        positions.append(_positions(model, request, start, count))
        for index, (offset, image) in enumerate(
            zip(request.image_offsets, request.images, strict=True)
        ):
            lo, hi = max(start, offset), min(end, offset + image.num_tokens)
            if lo >= hi:
                continue
            embeds.append(request.image_embeds[index][lo - offset : hi - offset])
            rows.append(torch.arange(row + lo - start, row + hi - start))
            if hi == offset + image.num_tokens:  # prefill has passed the image
                del request.image_embeds[index]
        row += count
    return VisionInput(
        positions=to_device(torch.cat(positions, dim=1), device),
        image_embeds=torch.cat(embeds) if embeds else None,
        image_rows=to_device(torch.cat(rows), device) if rows else None,
    )
