"""Paged KV pool (page_size > 1): page accounting, a page-granular radix cache, KVManager round trips, and an
engine that gives the same greedy tokens with pages of 16 as with single-slot pages."""

from __future__ import annotations

import random

import pytest

from pdserve.config import EngineConfig, ModelConfig
from pdserve.engine.kv_pool import KVSlotAllocator, PagedKVAllocator
from pdserve.engine.radix_cache import RadixCache
from pdserve.engine.request import Request
from pdserve.engine.scheduler import KVManager
from pdserve.sampling_params import SamplingParams

P = 4


def assert_whole_pages(slots: list[int], page_size: int = P) -> None:
    assert len(slots) % page_size == 0
    for i in range(0, len(slots), page_size):
        assert slots[i] % page_size == 0 and slots[i : i + page_size] == list(range(slots[i], slots[i] + page_size))


# ---- allocator -------------------------------------------------------------------------------------------
def test_page_allocator_accounts_in_tokens_and_hands_out_whole_pages():
    a = PagedKVAllocator(42, P)  # rounded down to 10 pages
    assert (a.num_pages, a.size, a.num_free, a.num_free_pages) == (10, 40, 40, 10)
    assert a.free_runs() == [(P, 44)]  # page 0 (slot 0, the decode padding) is reserved
    got = a.alloc(5)
    assert got == list(range(4, 12)) and a.num_free == 32  # 5 tokens -> 2 pages
    assert a.alloc(0) == [] and a.alloc(33) is None
    rest = a.alloc(32)
    assert_whole_pages(rest) and a.num_free == 0
    a.free(list(reversed(got)))  # any order, as long as the pages are whole
    assert a.num_free == 8 and a.free_runs() == [(4, 12)]
    a.free(rest)
    assert a.num_free == a.size and a.free_runs() == [(P, a.size + P)]


def test_page_allocator_refuses_partial_or_bad_pages_whole():
    a = PagedKVAllocator(40, P)
    got = a.alloc(12)  # pages 1..3
    a.free(got[4:8])
    for bad in (got[:3], got[1:5], [0, 1, 2, 3], list(range(44, 48)), got[4:8], got[:4] + got[:4],
                got[:2] + got[2:4] + [got[4]] * 4):
        with pytest.raises(ValueError):  # partial page, misaligned, padding page, out of range, free, twice
            a.free(bad)
    assert a.num_free == 32 and a.free_runs() == [(8, 12), (16, 44)]  # nothing half-applied


def test_page_size_one_is_the_slot_allocator():
    a, b = PagedKVAllocator(100), KVSlotAllocator(100)
    rng = random.Random(1)
    held = []
    for _ in range(300):
        if held and rng.random() < 0.4:
            s = held.pop(rng.randrange(len(held)))
            a.free(s)
            b.free(s)
        else:
            n = rng.choice([1, 3, 17])
            got = a.alloc(n)
            assert got == b.alloc(n)
            if got is not None:
                held.append(got)
        assert a.num_free == b.num_free and a.free_runs() == b.free_runs()


# ---- radix cache -----------------------------------------------------------------------------------------
def assert_tree_in_pages(tree: RadixCache) -> None:
    for node in tree.nodes():
        assert len(node.key) == len(node.slots) and len(node.key) % P == 0 and node.key
        assert_whole_pages(node.slots)
        assert node.parent.children[tuple(node.key[:P])] is node


def test_radix_shares_only_whole_pages():
    alloc = PagedKVAllocator(64, P)
    tree = RadixCache(alloc.free, P)
    toks = list(range(100, 110))  # 10 tokens: 2 whole pages + 2
    slots = alloc.alloc(len(toks))
    assert tree.insert(toks, slots[: len(toks)]) == 0
    assert tree.num_cached_tokens == 8  # only the aligned prefix is cached; the caller keeps the rest
    alloc.free(slots[8:])
    got, node = tree.match_prefix(toks)
    assert got == slots[:8] and node.key == tuple(toks[:8])
    got, node = tree.match_prefix(toks[:7])  # 7 tokens: only the first whole page
    assert got == slots[:4]
    assert tree.match_prefix(toks[:3])[0] == [] and tree.match_prefix([1, 2, 3, 4, 5])[0] == []
    assert_tree_in_pages(tree)
    tree.reset()
    assert tree.num_cached_tokens == 0 and alloc.num_free == alloc.size


def test_radix_divergence_inside_a_page_makes_separate_children():
    alloc = PagedKVAllocator(64, P)
    tree = RadixCache(alloc.free, P)
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    b = [1, 2, 3, 4, 5, 6, 9, 9]  # diverges at token 6, inside the second page
    sa, sb = alloc.alloc(8), alloc.alloc(8)
    assert tree.insert(a, sa) == 0
    assert tree.insert(b, sb) == 4  # only the first page is shared
    alloc.free(sb[:4])  # the duplicate page
    (top,) = tree.root.children.values()
    assert top.key == (1, 2, 3, 4) and set(top.children) == {(5, 6, 7, 8), (5, 6, 9, 9)}
    assert tree.match_prefix(b)[0] == sa[:4] + sb[4:]
    assert tree.match_prefix([1, 2, 3, 4, 5, 6, 7, 0])[0] == sa[:4]  # a partial page match is not shared
    assert tree.num_cached_tokens == 12
    assert_tree_in_pages(tree)


def test_radix_eviction_frees_whole_pages_lru_first():
    alloc = PagedKVAllocator(64, P)
    tree = RadixCache(alloc.free, P)
    seqs = [[1] * 4 + [k] * 8 for k in (2, 3, 4)]  # one shared page, then 2 own pages each
    for s in seqs:
        slots = alloc.alloc(len(s))
        alloc.free(slots[: tree.insert(s, slots)])
    assert tree.num_cached_tokens == 4 + 3 * 8 and alloc.num_free == 64 - 28
    _, node = tree.match_prefix(seqs[2])
    tree.lock(node)
    tree.match_prefix(seqs[1])  # seqs[0]'s leaf is now the least recently used
    assert tree.evict(1) == 8 and alloc.num_free == 64 - 20  # one whole leaf: 2 pages
    assert [n.key for n in tree.root.children.values()][0] == (1, 1, 1, 1)
    assert tree.evict(100) == 8  # seqs[1]'s leaf; the locked path stays
    assert tree.num_cached_tokens == 12 == tree.num_locked_tokens
    tree.unlock(node)
    assert tree.reset() == 12 and alloc.num_free == alloc.size and alloc.free_runs() == [(P, 68)]


# ---- KV manager --------------------------------------------------------------------------------------------
def _req(rid: str, ids: list[int]) -> Request:
    return Request(rid, list(ids), SamplingParams(max_new_tokens=8))


def _compute(kv_store: dict, req: Request, n: int) -> None:
    """Stand-in for the runner: slot s of position i holds (i, the ids up to i)."""
    for i in range(req.num_computed_tokens, req.num_computed_tokens + n):
        kv_store[req.slots[i]] = (i, tuple(req.all_ids[: i + 1]))
    req.num_computed_tokens += n


def test_kv_manager_round_trip_shares_pages():
    km = KVManager(64, enable_radix=True, page_size=P)
    store: dict = {}
    r1 = _req("a", list(range(1, 11)))
    km.match_prefix(r1)
    assert r1.slots == [] and r1.num_computed_tokens == 0
    assert km.grow(r1, 10) and len(r1.slots) == 12 and km.allocator.num_free == 52
    _compute(store, r1, 10)
    r1.output_ids.append(50)
    assert km.grow(r1, 1) and len(r1.slots) == 12  # the 11th token still fits the last page
    _compute(store, r1, 1)
    r1.output_ids.append(51)
    assert km.grow(r1, 1) and len(r1.slots) == 12
    _compute(store, r1, 1)  # 12 computed: 3 whole pages
    r1.output_ids.append(52)
    assert km.grow(r1, 1) and len(r1.slots) == 16  # a new page
    km.release(r1)
    assert km.num_cached_tokens == 12 and km.allocator.num_free == 52 and r1.slots == []

    r2 = _req("b", list(range(1, 10)) + [99, 98])  # shares 9 tokens: 2 whole pages
    km.match_prefix(r2)
    assert r2.num_computed_tokens == 8 == r2.num_tree_slots and len(r2.slots) == 8
    assert all(store[s] == (i, tuple(r2.all_ids[: i + 1])) for i, s in enumerate(r2.slots))
    assert km.grow(r2, 3) and len(r2.slots) == 12
    _compute(store, r2, 3)
    km.release(r2)  # 11 computed: 2 pages already cached, the third page partial -> freed
    assert km.num_cached_tokens == 12 and km.allocator.num_free == 52
    assert km.flush() and km.allocator.num_free == 64 and km.allocator.free_runs() == [(P, 68)]


def test_kv_manager_detach_and_no_radix_work_in_pages():
    for radix in (True, False):
        km = KVManager(32, enable_radix=radix, page_size=P)
        r = _req("a", list(range(1, 7)))
        km.match_prefix(r)
        assert km.grow(r, 6)
        held = km.detach(r)
        assert_whole_pages(sorted(held)) and len(held) == 8 and r.slots == []
        km.free_detached(held)
        r2 = _req("b", list(range(1, 7)))
        km.match_prefix(r2)
        assert km.grow(r2, 5)
        _compute({}, r2, 5)
        km.release(r2)
        assert km.flush() and km.allocator.num_free == 32 and km.allocator.free_runs() == [(P, 36)]


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_kv_manager_random_round_trips(page_size):
    rng = random.Random(page_size)
    km = KVManager(256, enable_radix=True, page_size=page_size)
    store: dict = {}
    active: list[Request] = []
    stems = [[rng.randrange(5) for _ in range(40)] for _ in range(3)]
    for step in range(600):
        if active and rng.random() < 0.3:
            km.release(active.pop(rng.randrange(len(active))))
        elif len(active) < 6 and rng.random() < 0.4:
            stem = rng.choice(stems)
            r = _req(f"r{step}", stem[: rng.randrange(1, 40)] + [rng.randrange(5) for _ in range(rng.randrange(1, 9))])
            km.match_prefix(r)
            assert r.num_computed_tokens % page_size == 0 and r.num_computed_tokens < r.num_tokens
            assert all(store[s] == (i, tuple(r.all_ids[: i + 1])) for i, s in enumerate(r.slots))  # right KV
            active.append(r)
        elif active:
            r = rng.choice(active)
            if not r.num_uncomputed_tokens:  # decoding: a sampled token to compute next
                r.output_ids.append(rng.randrange(5))
            n = min(r.num_uncomputed_tokens, rng.choice([1, 3, 50]))
            if km.grow(r, n):
                _compute(store, r, n)
        for r in active:
            assert len(r.slots) % page_size == 0 and len(r.slots) >= r.num_computed_tokens
        owned = sum(len(r.slots) - r.num_tree_slots for r in active)
        assert km.allocator.num_free + km.num_cached_tokens + owned == km.allocator.size
    for r in active:
        km.release(r)
    assert km.flush() and km.allocator.num_free == 256
    assert km.allocator.free_runs() == [(page_size, 256 + page_size)]


# ---- engine ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tests.engine_helpers import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("paged") / "llama"), "llama")


PROMPT_BASE = "You are a careful assistant. Answer briefly and precisely. " * 3
PROMPTS = [PROMPT_BASE + "What is two plus two?", PROMPT_BASE + "Name a fruit.", PROMPT_BASE + "Say hi.",
           "Once upon a time"]
GREEDY = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)


def _engine(path: str, page_size: int, **kw):
    from pdserve.engine.engine import Engine

    return Engine(EngineConfig(model=ModelConfig(model_path=path), page_size=page_size, **kw))


def _run_engine(path: str, page_size: int, **kw) -> tuple[list[list[int]], list[int], object]:
    eng = _engine(path, page_size, **kw)
    outs = eng.generate(PROMPTS[:1], GREEDY) + eng.generate(PROMPTS[1:], GREEDY)  # the first warms the prefix
    return [o.new_token_ids for o in outs], [o.cached_tokens for o in outs], eng


def assert_engine_pool_free(eng) -> None:
    assert not eng.scheduler.running and not eng.scheduler.waiting and eng.scheduler.num_used_by_reqs == 0
    assert eng.flush_cache()
    alloc = eng.scheduler.kv.allocator
    p = eng.config.page_size
    assert alloc.num_free == alloc.size == eng.max_total_tokens
    assert alloc.free_runs() == [(p, alloc.size + p)]


def test_engine_pages_of_16_give_the_same_tokens(tiny_llama):
    ref, ref_cached, eng1 = _run_engine(tiny_llama, 1, max_total_tokens=2048)
    got, cached, eng16 = _run_engine(tiny_llama, 16, max_total_tokens=2040)  # rounded down to 127 pages
    assert eng16.max_total_tokens == 2032 and eng16.runner.kv.num_slots == 2032 + 16
    assert got == ref
    assert ref_cached[1] > 32 and cached[0] == 0
    assert cached[1] > 16 and all(c % 16 == 0 and c <= r for c, r in zip(cached, ref_cached))
    assert_engine_pool_free(eng1)
    assert_engine_pool_free(eng16)


def test_engine_pages_with_small_chunks_and_preemption(tiny_llama):
    from pdserve.engine.messages import GenerateRequest

    ref, _, _ = _run_engine(tiny_llama, 1, max_total_tokens=2048)
    eng = _engine(tiny_llama, 16, max_total_tokens=80, chunked_prefill_size=20)  # 5 pages
    for i, p in enumerate(PROMPTS):
        eng.add_request(GenerateRequest(f"p{i}", tuple(eng.tokenizer.encode(p)), GREEDY))
    reqs = list(eng.requests.values())
    done = 0
    for _ in range(2000):
        done += sum(1 for o in eng.step() if o.finish_reason)
        if done == len(PROMPTS):
            break
    assert [r.output_ids for r in reqs] == ref
    assert sum(r.num_preemptions for r in reqs) > 0
    assert_engine_pool_free(eng)


def test_lend_run_gives_one_run_or_nothing():
    from pdserve.engine.scheduler import KVManager

    kv = KVManager(64, enable_radix=False, page_size=4)
    got = kv.lend_run(10)
    assert got is not None and got[:10] == list(range(got[0], got[0] + 10)) and len(got) == 12  # 3 whole pages
    holes = [kv.allocator.alloc(4) for _ in range(13)]  # the rest, in pages
    for hole in holes[::2]:
        kv.free_detached(hole)  # free pages, none adjacent
    assert kv.lend_run(8) is None and kv.allocator.num_free == 7 * 4  # refused, nothing kept
    kv.free_detached(got)
