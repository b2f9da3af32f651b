"""Multimodal inputs: what the front sends the engine (MultimodalInput, pickled over the pipe) and what sits
on a Request (MMInputs: opaque to the scheduler, read by the model runner).

A prompt holds one run of `rows` image placeholder tokens per image (the front expands each placeholder);
the embedding rows of image i replace the input embeddings of its run, position by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageSpan:
    offset: int  # first placeholder position in the expanded prompt
    length: int  # embedding rows (= placeholder tokens)
    digest: str = ""  # sha256 of the encoded image, when this server saw it


@dataclass(frozen=True)
class RemoteImage:
    """Where an image's embedding waits (EPD): the encode server's control address and the rows it holds."""

    encoder: str  # tcp://host:port
    rows: int


@dataclass(frozen=True)
class MultimodalInput:
    """Front -> engine. Exactly one source: pixel values (this engine encodes), or a room on encode servers
    (EPD: the language engine fetches the embeddings), or neither (a decode server: its KV arrives)."""

    spans: tuple[ImageSpan, ...]
    pixel_values: tuple[np.ndarray, ...] = ()  # each [3, H, W] float32
    room: int | None = None
    remote: tuple[RemoteImage, ...] = ()

    @property
    def is_remote(self) -> bool:
        return self.room is not None


def expand_placeholders(ids: Sequence[int], image_token_id: int, rows: Sequence[int],
                        digests: Sequence[str] = ()) -> tuple[list[int], tuple[ImageSpan, ...]]:
    """Replace the k-th image placeholder token by rows[k] of them. The number of placeholders must match.
    Raises ValueError."""
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(where) != len(rows):
        raise ValueError(f"the prompt has {len(where)} image placeholder tokens for {len(rows)} images")
    out: list[int] = []
    spans = []
    prev = 0
    for k, (i, n) in enumerate(zip(where, rows)):
        out.extend(ids[prev:i])
        spans.append(ImageSpan(len(out), int(n), digests[k] if k < len(digests) else ""))
        out.extend([image_token_id] * int(n))
        prev = i + 1
    out.extend(ids[prev:])
    return out, tuple(spans)


class MMInputs:
    """Per-request multimodal state in the engine. `embeds[i]` is image i's [rows, H] tensor, or None until
    it is computed / received. The scheduler only reads `ready`."""

    def __init__(self, spans: Sequence[ImageSpan]):
        self.spans = tuple(spans)
        self.embeds: list[torch.Tensor | None] = [None] * len(self.spans)
        self._flat: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def ready(self) -> bool:
        return all(e is not None for e in self.embeds)

    def set(self, i: int, emb: torch.Tensor) -> None:
        if emb.shape[0] != self.spans[i].length:
            raise ValueError(f"image {i}: {emb.shape[0]} embedding rows for {self.spans[i].length} placeholders")
        self.embeds[i] = emb
        self._flat = None

    def rows_for(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Image rows among prompt positions [start, start + n): (offsets from start [K] int64, embeddings
        [K, H]); None when the chunk holds no image token."""
        if not any(s.offset < start + n and s.offset + s.length > start for s in self.spans):
            return None
        pos, emb = self._flatten()  # [R], [R, H]
        sel = ((pos >= start) & (pos < start + n)).nonzero().squeeze(1)  # [K]
        return pos.index_select(0, sel) - start, emb.index_select(0, sel)

    def _flatten(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._flat is None:
            assert self.ready, "multimodal request scheduled before its embeddings arrived"
            pos = torch.cat([torch.arange(s.offset, s.offset + s.length) for s in self.spans])  # [R]
            self._flat = (pos, torch.cat(self.embeds))  # type: ignore[arg-type]
        return self._flat
