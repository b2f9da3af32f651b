"""Metadata rows: what the prefill sends after the KV (first token, its logprobs, cached tokens, room).

Both sides keep a [num_rows, ROW_WORDS] int64 buffer registered as the last transfer region; a row is
written locally on the prefill and transferred to the row the decode reserved for the room.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TOP_LOGPROBS = 20
HEADER_WORDS = 7  # valid, room, first token, cached tokens, logprob, number of top entries, nonce
ROW_WORDS = HEADER_WORDS + 2 * MAX_TOP_LOGPROBS
VALID = 0x5044  # marks a written row


@dataclass
class MetaRow:
    room: int
    nonce: int  # the destination's (KVDestination.nonce)
    first_token: int
    cached_tokens: int
    logprob: float
    top: list[tuple[int, float]]


class MetadataBuffer:
    def __init__(self, num_rows: int):
        self.buf = np.zeros((num_rows, ROW_WORDS), dtype=np.int64)  # [rows, words]
        self.free_rows = list(range(num_rows - 1, -1, -1))

    @property
    def ptr(self) -> int:
        return self.buf.ctypes.data

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes

    @property
    def row_bytes(self) -> int:
        return ROW_WORDS * 8

    def alloc(self) -> int | None:
        return self.free_rows.pop() if self.free_rows else None

    def free(self, row: int) -> None:
        self.buf[row] = 0
        self.free_rows.append(row)

    def write(self, row: int, m: MetaRow) -> None:
        r = self.buf[row]
        r[:] = 0
        top = m.top[:MAX_TOP_LOGPROBS]
        r[0], r[1], r[2], r[3] = VALID, m.room, m.first_token, m.cached_tokens
        r[4] = np.array([m.logprob], dtype=np.float64).view(np.int64)[0]
        r[5], r[6] = len(top), m.nonce
        ids_at, lps_at = HEADER_WORDS, HEADER_WORDS + MAX_TOP_LOGPROBS
        if top:
            r[ids_at : ids_at + len(top)] = [t for t, _ in top]
            r[lps_at : lps_at + len(top)] = np.array([p for _, p in top], np.float64).view(np.int64)

    def read(self, row: int) -> MetaRow | None:
        r = self.buf[row]
        if r[0] != VALID:
            return None
        n = min(max(int(r[5]), 0), MAX_TOP_LOGPROBS)
        ids = r[HEADER_WORDS : HEADER_WORDS + n].tolist()
        lps = r[HEADER_WORDS + MAX_TOP_LOGPROBS : HEADER_WORDS + MAX_TOP_LOGPROBS + n].view(np.float64).tolist()
        return MetaRow(int(r[1]), int(r[6]), int(r[2]), int(r[3]), float(r[4:5].view(np.float64)[0]),
                       list(zip(ids, lps)))

    def row_view(self, row: int) -> bytes:
        return self.buf[row].tobytes()

    def set_row_bytes(self, row: int, data: bytes) -> None:
        if len(data) != self.row_bytes:
            raise ValueError(f"metadata row of {len(data)} bytes, expected {self.row_bytes}")
        self.buf[row] = np.frombuffer(data, dtype=np.int64)
