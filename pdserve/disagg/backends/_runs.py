"""Helpers shared by the real backends: turn WriteRuns into absolute (src, dst, len) address arrays.

Everything is vectorised with numpy: a scattered 4096-token write of a 30-layer model is ~250k runs, so a
Python loop per run would cost more than the transfer itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pdserve.disagg.transfer import MemRegion, WriteRun


def run_addresses(local: Sequence[MemRegion], remote: Sequence[MemRegion],
                  runs: Sequence[WriteRun]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Absolute source / destination addresses and lengths (uint64 arrays) of `runs`, bounds-checked
    against both sides' regions. Raises ValueError for a run that leaves its region."""
    n = len(runs)
    if n == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty.copy(), empty.copy()
    rows = np.array([(r.region, r.src_offset, r.dst_offset, r.nbytes) for r in runs], dtype=np.int64)
    reg, src_off, dst_off, nbytes = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    if reg.min() < 0 or reg.max() >= min(len(local), len(remote)):
        raise ValueError(f"write run region index out of range (local {len(local)}, remote {len(remote)} regions)")
    l_ptr = np.array([m.ptr for m in local], dtype=np.uint64)
    l_len = np.array([m.nbytes for m in local], dtype=np.int64)
    r_ptr = np.array([m.ptr for m in remote], dtype=np.uint64)
    r_len = np.array([m.nbytes for m in remote], dtype=np.int64)
    bad = (nbytes <= 0) | (src_off < 0) | (dst_off < 0) | (src_off + nbytes > l_len[reg]) | (dst_off + nbytes > r_len[reg])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"write run {runs[i]} is empty or out of bounds (local region {local[runs[i].region]}, "
                         f"remote region {remote[runs[i].region]})")
    src = l_ptr[reg] + src_off.astype(np.uint64)
    dst = r_ptr[reg] + dst_off.astype(np.uint64)
    return src, dst, nbytes.astype(np.uint64)


def merge_adjacent(src: np.ndarray, dst: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort by source address and merge runs that are contiguous on both sides (also across regions that
    happen to be adjacent in memory, e.g. per-layer views of one big pool tensor)."""
    if len(src) <= 1:
        return src, dst, lens
    order = np.argsort(src, kind="stable")
    src, dst, lens = src[order], dst[order], lens[order]
    brk = (src[1:] != src[:-1] + lens[:-1]) | (dst[1:] != dst[:-1] + lens[:-1])
    starts = np.flatnonzero(np.concatenate(([True], brk)))
    if len(starts) == len(src):
        return src, dst, lens
    return src[starts], dst[starts], np.add.reduceat(lens, starts).astype(np.uint64)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
