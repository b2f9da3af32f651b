"""Helpers shared by the real backends: turn WriteRuns into absolute (src, dst, len) address arrays.

Everything is vectorised with numpy: a scattered 4096-token write of a 30-layer model is ~250k runs, so a
Python loop per run would cost more than the transfer itself.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence

import numpy as np

from pdserve.disagg.transfer import MemRegion, WriteRun


_FIELDS = operator.attrgetter("region", "src_offset", "dst_offset", "nbytes")


def runs_array(runs: Sequence[WriteRun] | np.ndarray) -> np.ndarray:
    """(N, 4) int64 rows of (region, src_offset, dst_offset, nbytes). An (N, 4) integer array passes through."""
    if isinstance(runs, np.ndarray):
        if runs.ndim != 2 or runs.shape[1] != 4:
            raise ValueError(f"runs array must be (N, 4), got {runs.shape}")
        return runs.astype(np.int64, copy=False)
    n = len(runs)
    flat = np.fromiter(itertools.chain.from_iterable(map(_FIELDS, runs)), dtype=np.int64, count=4 * n)
    return flat.reshape(n, 4)


def run_addresses(local: Sequence[MemRegion], remote: Sequence[MemRegion],
                  runs: Sequence[WriteRun] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(src address, dst address, length, region) uint64/int64 arrays of `runs` (WriteRuns, or an (N, 4)
    array of them), bounds-checked against both sides' regions. Raises ValueError for a run that leaves
    its region."""
    rows = runs_array(runs)
    n = len(rows)
    if n == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty.copy(), empty.copy(), np.zeros(0, dtype=np.int64)
    reg, src_off, dst_off, nbytes = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    if reg.min() < 0 or reg.max() >= min(len(local), len(remote)):
        raise ValueError(f"write run region index out of range (local {len(local)}, remote {len(remote)} regions)")
    l_ptr = np.array([m.ptr for m in local], dtype=np.uint64)
    l_len = np.array([m.nbytes for m in local], dtype=np.int64)
    r_ptr = np.array([m.ptr for m in remote], dtype=np.uint64)
    r_len = np.array([m.nbytes for m in remote], dtype=np.int64)
    bad = (nbytes <= 0) | (src_off < 0) | (dst_off < 0)
    bad |= (src_off + nbytes > l_len[reg]) | (dst_off + nbytes > r_len[reg])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        r = int(reg[i])
        raise ValueError(f"write run {tuple(rows[i].tolist())} (region, src, dst, nbytes) is empty or out of "
                         f"bounds (local region {local[r]}, remote region {remote[r]})")
    src = l_ptr[reg] + src_off.astype(np.uint64)
    dst = r_ptr[reg] + dst_off.astype(np.uint64)
    return src, dst, nbytes.astype(np.uint64), reg


def merge_adjacent(src: np.ndarray, dst: np.ndarray, lens: np.ndarray,
                   region: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort by (region, source address) and merge runs of one region that are contiguous on both sides.
    Runs of different regions never merge, even when the regions are adjacent in memory: a descriptor
    must lie inside one registration (NIXL and Mooncake both check that)."""
    if len(src) <= 1:
        return src, dst, lens
    order = np.lexsort((src, region))
    src, dst, lens, region = src[order], dst[order], lens[order], region[order]
    brk = (src[1:] != src[:-1] + lens[:-1]) | (dst[1:] != dst[:-1] + lens[:-1]) | (region[1:] != region[:-1])
    starts = np.flatnonzero(np.concatenate(([True], brk)))
    if len(starts) == len(src):
        return src, dst, lens
    return src[starts], dst[starts], np.add.reduceat(lens, starts).astype(np.uint64)
