"""The KV slot allocator: runs stay contiguous where they can; nothing is lost or handed out twice."""

import random

import pytest

from pdserve.engine.kv_pool import KVSlotAllocator


def test_prompt_gets_one_contiguous_run_past_decode_holes():
    a = KVSlotAllocator(100)
    first = a.alloc(10)
    assert first == list(range(1, 11))
    decodes = [a.alloc(1) for _ in range(6)]  # 11..16
    a.free(first)  # a hole [1, 11)
    a.free(decodes[1] + decodes[3])  # holes at 12 and 14
    assert a.alloc(20) == list(range(17, 37))  # first run that holds it whole
    assert a.alloc(1) == [1]  # decode growth fills the lowest hole
    assert a.num_free == 100 - 20 - 4 - 1


def test_falls_back_to_lowest_runs_when_none_fits():
    a = KVSlotAllocator(10)
    held = a.alloc(10)
    a.free(held[0:2] + held[4:6] + held[8:10])
    assert a.alloc(5) == [1, 2, 5, 6, 9]
    assert a.free_runs() == [(10, 11)]
    assert a.alloc(2) is None


def test_bad_frees_are_refused_whole():
    a = KVSlotAllocator(8)
    got = a.alloc(4)
    a.free(got[1:2])
    for bad in ([got[0], got[1]], [0], [9], [got[2], got[2]]):  # already free, padding slot, out of range, dup
        with pytest.raises(ValueError):
            a.free(bad)
    assert a.num_free == 5 and a.free_runs() == [(2, 3), (5, 9)]  # nothing half-applied


def test_random_alloc_free_against_a_set_model():
    rng = random.Random(0)
    size = 500
    a = KVSlotAllocator(size)
    held: list[list[int]] = []
    in_use: set[int] = set()
    for _ in range(3000):
        if held and rng.random() < 0.45:
            slots = held.pop(rng.randrange(len(held)))
            rng.shuffle(slots)
            a.free(slots)
            in_use -= set(slots)
        else:
            n = rng.choice([1, 1, 1, 2, 7, 40, 130])
            got = a.alloc(n)
            if got is None:
                assert n > size - len(in_use)
                continue
            assert len(got) == n and not (set(got) & in_use) and all(1 <= s <= size for s in got)
            in_use |= set(got)
            held.append(got)
        assert a.num_free == size - len(in_use)
        runs = a.free_runs()
        assert all(s < e for s, e in runs) and all(e1 < s2 for (_, e1), (s2, _) in zip(runs, runs[1:]))
    for slots in held:
        a.free(slots)
    assert a.free_runs() == [(1, size + 1)]
