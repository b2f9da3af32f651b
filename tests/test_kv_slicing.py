"""KV head slicing between prefill TP P and decode TP D: mappings, head slices, byte runs (simulated with numpy)."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from pdserve.disagg.kv_slicing import (
    HeadSlice,
    check_tp,
    decode_ranks_for_prefill,
    head_slices,
    kv_heads_of_rank,
    num_local_kv_heads,
    prefill_ranks_for_decode,
    slice_write_runs,
)

TP_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)


def _valid_pairs(num_kv_heads: int):
    for p, d in itertools.product(TP_SIZES, TP_SIZES):
        if max(p, d) % min(p, d):
            continue
        if all((num_kv_heads % t == 0) if num_kv_heads >= t else (t % num_kv_heads == 0) for t in (p, d)):
            yield p, d


# ---------------------------------------------------------------- check_tp / local heads


@pytest.mark.parametrize("num_heads,num_kv_heads,tp", [
    (8, 4, 1), (8, 4, 2), (8, 4, 4), (8, 4, 8), (9, 3, 3), (9, 3, 1), (8, 2, 4), (8, 1, 8), (32, 8, 16)])
def test_check_tp_accepts(num_heads, num_kv_heads, tp):
    check_tp(num_heads, num_kv_heads, tp)


@pytest.mark.parametrize("num_heads,num_kv_heads,tp,match", [
    (9, 3, 2, "KV heads"),  # 3 % 2 != 0
    (8, 3, 2, "KV heads"),
    (12, 4, 6, "replicated"),  # 6 % 4 != 0
    (10, 2, 4, "query heads"),  # kv ok (4 % 2 == 0), 10 % 4 != 0
    (8, 4, 0, "tensor-parallel size"),
    (8, 0, 2, "number of KV heads"),
])
def test_check_tp_rejects(num_heads, num_kv_heads, tp, match):
    with pytest.raises(ValueError, match=match):
        check_tp(num_heads, num_kv_heads, tp)


def test_kv_heads_of_rank_split_and_replicated():
    assert [list(kv_heads_of_rank(4, 2, r)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [list(kv_heads_of_rank(4, 1, 0))] == [[0, 1, 2, 3]]
    assert [kv_heads_of_rank(4, 8, r).start for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [kv_heads_of_rank(2, 4, r).start for r in range(4)] == [0, 0, 1, 1]
    assert [list(kv_heads_of_rank(3, 3, r)) for r in range(3)] == [[0], [1], [2]]
    assert num_local_kv_heads(4, 8) == 1 and num_local_kv_heads(4, 2) == 2 and num_local_kv_heads(3, 1) == 3
    for num_kv_heads in (1, 2, 3, 4, 8):
        for tp in TP_SIZES:
            try:
                check_tp(num_kv_heads * 48, num_kv_heads, tp)
            except ValueError:
                continue
            ranks = [kv_heads_of_rank(num_kv_heads, tp, r) for r in range(tp)]
            assert all(len(h) == num_local_kv_heads(num_kv_heads, tp) for h in ranks)
            assert {h for heads in ranks for h in heads} == set(range(num_kv_heads))
    with pytest.raises(ValueError, match="out of range"):
        kv_heads_of_rank(4, 2, 2)
    with pytest.raises(ValueError):
        kv_heads_of_rank(4, 3, 0)


# ---------------------------------------------------------------- rank mapping


def test_rank_mapping_examples():
    assert prefill_ranks_for_decode(2, 2, 1) == [1]
    assert [prefill_ranks_for_decode(2, 4, d) for d in range(4)] == [[0], [0], [1], [1]]
    assert [prefill_ranks_for_decode(4, 2, d) for d in range(2)] == [[0, 1], [2, 3]]
    assert [decode_ranks_for_prefill(2, 4, p) for p in range(2)] == [[0, 1], [2, 3]]
    assert [decode_ranks_for_prefill(4, 2, p) for p in range(4)] == [[0], [0], [1], [1]]
    assert prefill_ranks_for_decode(3, 1, 0) == [0, 1, 2]


def test_rank_mapping_is_consistent_inverse():
    for num_p, num_d in itertools.product(TP_SIZES, TP_SIZES):
        if max(num_p, num_d) % min(num_p, num_d):
            continue
        pairs_from_d = {(p, d) for d in range(num_d) for p in prefill_ranks_for_decode(num_p, num_d, d)}
        pairs_from_p = {(p, d) for p in range(num_p) for d in decode_ranks_for_prefill(num_p, num_d, p)}
        assert pairs_from_d == pairs_from_p
        assert {p for p, _ in pairs_from_d} == set(range(num_p))  # every rank has a partner
        assert {d for _, d in pairs_from_d} == set(range(num_d))
        # each side with the larger TP has exactly one partner
        if num_d >= num_p:
            assert all(len(prefill_ranks_for_decode(num_p, num_d, d)) == 1 for d in range(num_d))
        if num_p >= num_d:
            assert all(len(decode_ranks_for_prefill(num_p, num_d, p)) == 1 for p in range(num_p))
            assert all(len(prefill_ranks_for_decode(num_p, num_d, d)) == num_p // num_d for d in range(num_d))


@pytest.mark.parametrize("num_p,num_d", [(2, 3), (3, 2), (4, 6), (6, 4), (0, 1), (1, 0)])
def test_rank_mapping_rejects_non_multiples(num_p, num_d):
    with pytest.raises(ValueError, match="multiple|>= 1"):
        prefill_ranks_for_decode(num_p, num_d, 0)
    with pytest.raises(ValueError, match="multiple|>= 1"):
        decode_ranks_for_prefill(num_p, num_d, 0)
    with pytest.raises(ValueError):
        head_slices(12, num_p, num_d)


def test_rank_mapping_rejects_bad_rank():
    with pytest.raises(ValueError, match="out of range"):
        prefill_ranks_for_decode(2, 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        decode_ranks_for_prefill(2, 4, 2)


# ---------------------------------------------------------------- head slices


def test_head_slices_docstring_examples():
    assert head_slices(4, 1, 2) == [HeadSlice(0, 0, 0, 0, 2), HeadSlice(0, 1, 2, 0, 2)]
    assert head_slices(4, 2, 1) == [HeadSlice(0, 0, 0, 0, 2), HeadSlice(1, 0, 0, 2, 2)]
    assert head_slices(2, 4, 1) == [HeadSlice(0, 0, 0, 0, 1), HeadSlice(2, 0, 0, 1, 1)]
    assert head_slices(4, 2, 2) == [HeadSlice(0, 0, 0, 0, 2), HeadSlice(1, 1, 0, 0, 2)]
    # 4 KV heads on tp 8: prefill ranks 2k, 2k+1 both hold head k; decode rank 1 (heads 2,3) gets them from 4 and 6
    assert head_slices(4, 8, 2) == [HeadSlice(0, 0, 0, 0, 1), HeadSlice(2, 0, 0, 1, 1),
                                    HeadSlice(4, 1, 0, 0, 1), HeadSlice(6, 1, 0, 1, 1)]
    assert head_slices(4, 8, 8) == [HeadSlice(r, r, 0, 0, 1) for r in range(8)]


def _sglang_slice(num_kv_heads, num_p, num_d, p, d):
    """SGLang's send_kvcache_slice formula, (src_head_offset, dst_head_offset, num_heads)."""
    src_hpr, dst_hpr = max(1, num_kv_heads // num_p), max(1, num_kv_heads // num_d)
    if num_p > num_d:
        return 0, ((p // max(1, num_p // num_kv_heads)) * src_hpr) % dst_hpr, src_hpr
    return ((d // max(1, num_d // num_kv_heads)) * dst_hpr) % src_hpr, 0, dst_hpr


@pytest.mark.parametrize("num_kv_heads", [1, 2, 3, 4, 6, 8, 16])
def test_head_slices_cover_each_decode_head_once_and_match_sglang(num_kv_heads):
    for num_p, num_d in _valid_pairs(num_kv_heads):
        slices = head_slices(num_kv_heads, num_p, num_d)
        mapped = {(p, d) for d in range(num_d) for p in prefill_ranks_for_decode(num_p, num_d, d)}
        ours = {(s.prefill_rank, s.decode_rank): s for s in slices}
        assert len(ours) == len(slices)  # one slice per exchanging pair
        assert set(ours) <= mapped
        received: dict[int, list[int]] = {d: [] for d in range(num_d)}
        for s in slices:
            src_heads = kv_heads_of_rank(num_kv_heads, num_p, s.prefill_rank)
            dst_heads = kv_heads_of_rank(num_kv_heads, num_d, s.decode_rank)
            got = list(src_heads[s.src_head_offset:s.src_head_offset + s.num_heads])
            assert got == list(dst_heads[s.dst_head_offset:s.dst_head_offset + s.num_heads])
            assert len(got) == s.num_heads
            received[s.decode_rank].extend(range(s.dst_head_offset, s.dst_head_offset + s.num_heads))
            # the sender is the lowest mapped prefill rank holding those heads
            for head in got:
                holders = [p for p in prefill_ranks_for_decode(num_p, num_d, s.decode_rank)
                           if head in kv_heads_of_rank(num_kv_heads, num_p, p)]
                assert holders[0] == s.prefill_rank
            assert _sglang_slice(num_kv_heads, num_p, num_d, s.prefill_rank, s.decode_rank) == (
                s.src_head_offset, s.dst_head_offset, s.num_heads)
        for d, local in received.items():
            assert sorted(local) == list(range(num_local_kv_heads(num_kv_heads, num_d))), (num_p, num_d, d)
        # pairs we skip are only replicated duplicates: SGLang would write heads already delivered
        skipped = mapped - set(ours)
        if num_p <= num_kv_heads or num_p <= num_d:
            assert not skipped
        for p, d in skipped:
            src_off, dst_off, n = _sglang_slice(num_kv_heads, num_p, num_d, p, d)
            heads = list(kv_heads_of_rank(num_kv_heads, num_p, p))[src_off:src_off + n]
            assert heads == list(kv_heads_of_rank(num_kv_heads, num_d, d))[dst_off:dst_off + n]


def test_head_slices_reject_bad_head_counts():
    with pytest.raises(ValueError, match="KV heads"):
        head_slices(3, 2, 1)
    with pytest.raises(ValueError, match="replicated"):
        head_slices(4, 1, 6)


# ---------------------------------------------------------------- byte runs


def test_slice_write_runs_merges_whole_items():
    whole = HeadSlice(0, 0, 0, 0, 2)
    runs = slice_write_runs(whole, 16, 16, 8, 2, [0, 1, 2, 5, 6, 9], [7, 8, 9, 3, 4, 0])
    assert runs == [(0, 0, 112, 48), (0, 80, 48, 32), (0, 144, 0, 16),
                    (1, 0, 112, 48), (1, 80, 48, 32), (1, 144, 0, 16)]
    assert slice_write_runs(whole, 16, 16, 8, 1, [], []) == []


def test_slice_write_runs_partial_items_one_run_per_slot():
    part = HeadSlice(1, 0, 0, 1, 1)  # src items 1 head (8 B), dst items 2 heads (16 B), into dst head 1
    runs = slice_write_runs(part, 8, 16, 8, 2, [0, 1], [4, 5])
    assert runs == [(0, 0, 72, 8), (0, 8, 88, 8), (1, 0, 72, 8), (1, 8, 88, 8)]
    src_part = HeadSlice(0, 1, 2, 0, 2)  # heads 2,3 of 4 on the source
    assert slice_write_runs(src_part, 32, 16, 8, 1, [3], [1]) == [(0, 3 * 32 + 16, 16, 16)]


def test_slice_write_runs_rejects_bad_input():
    with pytest.raises(ValueError, match="slots"):
        slice_write_runs(HeadSlice(0, 0, 0, 0, 1), 8, 8, 8, 1, [0, 1], [0])
    with pytest.raises(ValueError, match="does not fit"):
        slice_write_runs(HeadSlice(0, 0, 1, 0, 2), 16, 16, 8, 1, [0], [0])


def test_slice_write_runs_10k_slots_is_fast():
    n = 10_000
    src, dst = list(range(n)), list(range(5, 5 + n))
    t0 = time.perf_counter()
    assert len(slice_write_runs(HeadSlice(0, 0, 0, 0, 4), 512, 512, 128, 64, src, dst)) == 64
    partial = slice_write_runs(HeadSlice(0, 1, 2, 0, 2), 512, 256, 128, 64, src, dst)
    elapsed = time.perf_counter() - t0
    assert len(partial) == 64 * n
    assert partial[n + 1] == (1, 512 + 256, 6 * 256, 256)
    assert elapsed < 10  # generous: about 0.3 s on an idle core


# ---------------------------------------------------------------- end-to-end byte simulation

HEAD_DIM = 4
NUM_LAYERS = 2
NUM_REGIONS = 2 * NUM_LAYERS  # K and V per layer
NUM_PREFILL_SLOTS = 24
NUM_DECODE_SLOTS = 32
# a request's 10 tokens: prefill slots and decode slots differ, with contiguous and non-contiguous parts
SRC_SLOTS = [3, 4, 5, 6, 10, 11, 20, 21, 22, 0]
DST_SLOTS = [7, 8, 9, 10, 2, 3, 30, 29, 28, 15]


def _simulate(num_heads: int, num_kv_heads: int, num_p: int, num_d: int, dtype=np.int32):
    check_tp(num_heads, num_kv_heads, num_p)
    check_tp(num_heads, num_kv_heads, num_d)
    elem_bytes = np.dtype(dtype).itemsize
    head_bytes = HEAD_DIM * elem_bytes
    size = NUM_REGIONS * NUM_PREFILL_SLOTS * num_kv_heads * HEAD_DIM
    full = (np.arange(size, dtype=np.int64) + 1).astype(dtype)  # distinct, none zero
    full = full.reshape(NUM_REGIONS, NUM_PREFILL_SLOTS, num_kv_heads, HEAD_DIM)
    prefill = [np.ascontiguousarray(full[:, :, list(kv_heads_of_rank(num_kv_heads, num_p, p)), :])
               for p in range(num_p)]
    num_dst_local = num_local_kv_heads(num_kv_heads, num_d)
    decode = [np.zeros((NUM_REGIONS, NUM_DECODE_SLOTS, num_dst_local, HEAD_DIM), dtype) for _ in range(num_d)]
    writes = [np.zeros((NUM_REGIONS, decode[0][0].nbytes), np.int32) for _ in range(num_d)]
    src_item_bytes = num_local_kv_heads(num_kv_heads, num_p) * head_bytes
    dst_item_bytes = num_dst_local * head_bytes
    for s in head_slices(num_kv_heads, num_p, num_d):
        assert s.decode_rank in decode_ranks_for_prefill(num_p, num_d, s.prefill_rank)
        runs = slice_write_runs(s, src_item_bytes, dst_item_bytes, head_bytes, NUM_REGIONS, SRC_SLOTS, DST_SLOTS)
        for region, src_off, dst_off, nbytes in runs:
            src = prefill[s.prefill_rank][region].reshape(-1).view(np.uint8)
            dst = decode[s.decode_rank][region].reshape(-1).view(np.uint8)  # views: writes land in decode
            dst[dst_off:dst_off + nbytes] = src[src_off:src_off + nbytes]
            writes[s.decode_rank][region, dst_off:dst_off + nbytes] += 1
    for d in range(num_d):
        expected = np.zeros_like(decode[d])
        expected[:, DST_SLOTS] = full[:, SRC_SLOTS][:, :, list(kv_heads_of_rank(num_kv_heads, num_d, d)), :]
        assert decode[d].tobytes() == expected.tobytes(), (num_p, num_d, d)
        written = np.zeros((NUM_REGIONS, NUM_DECODE_SLOTS), bool)
        written[:, DST_SLOTS] = True
        expected_writes = np.repeat(written.astype(np.int32), dst_item_bytes, axis=1)
        assert np.array_equal(writes[d], expected_writes), (num_p, num_d, d)  # every byte exactly once


@pytest.mark.parametrize("num_p,num_d", list(itertools.product((1, 2, 4), repeat=2)))
def test_simulate_8q_4kv(num_p, num_d):
    _simulate(8, 4, num_p, num_d)


@pytest.mark.parametrize("num_p,num_d", list(itertools.product((1, 3), repeat=2)))
def test_simulate_smollm2_9q_3kv(num_p, num_d):
    _simulate(9, 3, num_p, num_d, dtype=np.float16 if num_p == num_d else np.int32)


@pytest.mark.parametrize("num_p,num_d", list(itertools.product((1, 2, 4), repeat=2)))
def test_simulate_replicated_8q_2kv(num_p, num_d):
    _simulate(8, 2, num_p, num_d)


@pytest.mark.parametrize("num_p,num_d", [(8, 1), (8, 2), (8, 4), (8, 8), (1, 8), (2, 8), (4, 8)])
def test_simulate_replicated_4kv_tp8(num_p, num_d):
    _simulate(8, 4, num_p, num_d)


@pytest.mark.parametrize("num_p,num_d", [(4, 1), (1, 4), (4, 2), (2, 4), (4, 4)])
def test_simulate_mqa_1kv(num_p, num_d):
    _simulate(8, 1, num_p, num_d, dtype=np.uint16)
