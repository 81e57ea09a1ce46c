"""Multimodal engine input: token ids with their images, already preprocessed.

:func:`prepare_input_with_images` turns a chat-template rendering (one image placeholder
token per image) and the images into an :class:`EngineInput`: it runs the checkpoint's image
processor, expands each placeholder to the image's token count and hashes each image's
pixels, so that the prefix cache never mixes two different images behind the same text.
Everything here is pure and safe to call on any thread.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "EngineInput",
    "ImageFeatures",
    "ImageInputError",
    "ImageTokenIds",
    "RequestInputError",
    "image_features",
    "image_offsets",
    "prepare_input_with_images",
]


class RequestInputError(ValueError):
    """A request refused or ended for what it asked for, not for a fault of the engine's;
    ``code`` names it as the API does (``invalid_schema``: a grammar that gave up mid-reply;
    ``invalid_image``)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # pickles whole (subclasses too), across an engine process's pipe
        return type(self).__new__, (type(self),), {**vars(self), "args": self.args}


class ImageInputError(RequestInputError):
    """An image the checkpoint's image processor refuses (an aspect ratio past its limit);
    ``index`` is its place among the request's images, from 0."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message, "invalid_image")
        self.index = index


@dataclass(frozen=True)
class ImageFeatures:
    """One preprocessed image."""

    pixel_values: torch.Tensor  # [N_patches, patch_dim] from the image processor
    grid_thw: tuple[int, int, int]  # in patches, before merging
    num_tokens: int  # placeholder tokens after merging
    content_hash: int  # of the pixels and grid: two different images never share it


@dataclass(frozen=True)
class EngineInput:
    token_ids: list[int]  # image placeholders already expanded
    images: tuple[ImageFeatures, ...] = ()


@dataclass(frozen=True)
class ImageTokenIds:
    """The special tokens of a multimodal vocabulary that the engine must recognise."""

    image: int  # one placeholder per image token
    video: int  # refused: video input is not implemented


def _content_hash(pixel_values: torch.Tensor, grid: tuple[int, int, int]) -> int:
    """128-bit digest of an image's grid, dtype and pixel bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((grid, str(pixel_values.dtype), tuple(pixel_values.shape))).encode())
    digest.update(pixel_values.contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little")


def image_features(
    pixel_values: torch.Tensor, grid_thw: Sequence[int], merge: int
) -> ImageFeatures:
    """Features of one image from its patches and (t, h, w) patch grid."""
    grid = tuple(int(v) for v in grid_thw)
    num_tokens = grid[0] * grid[1] * grid[2] // merge**2
    return ImageFeatures(pixel_values, grid, num_tokens, _content_hash(pixel_values, grid))


def _refuse_video(token_ids: Sequence[int], tokens: ImageTokenIds) -> None:
    if tokens.video in token_ids:
        raise ValueError(
            "the prompt has a video placeholder, but video input is not implemented; "
            "send the frames as images"
        )


def image_offsets(
    token_ids: Sequence[int], tokens: ImageTokenIds, images: Sequence[ImageFeatures]
) -> tuple[int, ...]:
    """Index of the first placeholder of each image in expanded ``token_ids``; raises
    ValueError when the placeholders do not match the images or a video token appears."""
    _refuse_video(token_ids, tokens)
    offsets: list[int] = []
    index, end = 0, len(token_ids)
    while index < end:
        if token_ids[index] != tokens.image:
            index += 1
            continue
        if len(offsets) == len(images):
            raise ValueError(
                f"the prompt has more image placeholder tokens than the {len(images)} "
                "image(s) given; give one image per image placeholder"
            )
        size = images[len(offsets)].num_tokens
        run = token_ids[index : index + size]
        if len(run) < size or any(t != tokens.image for t in run):
            raise ValueError(
                f"image {len(offsets)} needs {size} consecutive placeholder tokens; expand each "
                "placeholder with EngineClient.prepare() before submitting"
            )
        offsets.append(index)
        index += size
    if len(offsets) != len(images):
        raise ValueError(
            f"the prompt has {len(offsets)} image placeholder(s) but {len(images)} image(s) "
            "were given; give one image per image placeholder"
        )
    return tuple(offsets)


def prepare_input_with_images(
    token_ids: Sequence[int],
    images: Sequence[Any],
    image_processor: Any,
    tokens: ImageTokenIds,
    merge: int,
) -> EngineInput:
    """Preprocess ``images`` (PIL) and expand the one placeholder token of each to its
    token count. ``token_ids`` is the chat template's rendering; raises ValueError when
    the placeholders and images disagree or the prompt has a video placeholder."""
    _refuse_video(token_ids, tokens)
    count = sum(1 for t in token_ids if t == tokens.image)
    if count != len(images):
        raise ValueError(
            f"the prompt has {count} image placeholder(s) but {len(images)} image(s) were "
            "given; put one image item in the messages per image"
        )
    features = []
    for index, image in enumerate(images):
        try:
            out = image_processor(images=[image], return_tensors="pt")
        except ValueError as exc:
            width, height = image.size
            raise ImageInputError(
                f"image {index + 1} ({width}x{height} pixels) cannot be prepared for the model: "
                f"{exc}; crop or pad it to a less extreme shape",
                index,
            ) from exc
        grid = out["image_grid_thw"][0].tolist()
        features.append(image_features(out["pixel_values"], grid, merge))
    expanded: list[int] = []
    remaining = iter(features)
    for t in token_ids:
        if t == tokens.image:
            expanded.extend([t] * next(remaining).num_tokens)
        else:
            expanded.append(t)
    return EngineInput(expanded, tuple(features))
