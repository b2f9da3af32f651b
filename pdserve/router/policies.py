"""Load-balancing policies: one class each, one interface. `select` gets the non-empty list of candidate workers
(healthy, circuit closed) for one role, the request's routing text (None unless the policy needs it) and its
token ids (None unless the policy needs them: kv_aware)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from pdserve.router.config import CacheAwareConfig
from pdserve.router.kv_index import KVEventFeed
from pdserve.router.tree import ApproxTree
from pdserve.router.workers import Worker


class Policy:
    name = "base"
    needs_text = False  # wants the prompt text (cache_aware)
    needs_load = False  # wants /get_load polled (power_of_two)
    needs_tokens = False  # wants the request's token ids (kv_aware)

    def select(self, workers: Sequence[Worker], text: str | None, tokens: Sequence[int] | None = None) -> Worker:
        raise NotImplementedError

    def remove_worker(self, url: str) -> None:
        """Forget per-worker state (called when a worker leaves the registry)."""

    def evict(self) -> None:
        """Periodic housekeeping (cache_aware: trim the tree)."""


class RandomPolicy(Policy):
    name = "random"

    def select(self, workers: Sequence[Worker], text: str | None, tokens: Sequence[int] | None = None) -> Worker:
        return workers[random.randrange(len(workers))]


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def select(self, workers: Sequence[Worker], text: str | None, tokens: Sequence[int] | None = None) -> Worker:
        w = workers[self._next % len(workers)]
        self._next += 1
        return w


class PowerOfTwoPolicy(Policy):
    """The less loaded of two random workers (load: polled /get_load plus this router's traffic since)."""

    name = "power_of_two"
    needs_load = True

    def select(self, workers: Sequence[Worker], text: str | None, tokens: Sequence[int] | None = None) -> Worker:
        if len(workers) == 1:
            return workers[0]
        a, b = random.sample(workers, 2)
        la, lb = a.load(), b.load()
        if la == lb:
            return a if random.random() < 0.5 else b
        return a if la < lb else b


def _balanced(cfg: CacheAwareConfig, loads: Sequence[float]) -> bool:
    """Load balanced enough to follow the cache: not beyond both of SGLang's thresholds (cache_aware, kv_aware)."""
    lo, hi = min(loads), max(loads)
    return not (hi - lo > cfg.balance_abs_threshold and hi > lo * cfg.balance_rel_threshold)


class CacheAwarePolicy(Policy):
    """SGLang's cache-aware routing: while load is balanced, the worker holding the longest prefix of the prompt
    (if it covers more than `cache_threshold` of it), else the least loaded; when load is imbalanced beyond both
    thresholds, the least loaded. Every routed prompt is recorded under the chosen worker."""

    name = "cache_aware"
    needs_text = True

    def __init__(self, cfg: CacheAwareConfig) -> None:
        self.cfg = cfg
        self.tree = ApproxTree()

    def select(self, workers: Sequence[Worker], text: str | None, tokens: Sequence[int] | None = None) -> Worker:
        text = text or ""
        if len(workers) == 1:
            chosen = workers[0]
        else:
            loads = [w.load() for w in workers]
            chosen = None
            if text and _balanced(self.cfg, loads):
                urls = {w.url for w in workers}
                tenant, matched = self.tree.match(text, urls)
                if tenant is not None and matched / len(text) > self.cfg.cache_threshold:
                    chosen = next(w for w in workers if w.url == tenant)
            if chosen is None:  # least loaded; ties: the smallest share of the tree
                chosen = min(zip(loads, (self.tree.tenant_size(w.url) for w in workers), range(len(workers))))
                chosen = workers[chosen[2]]
        if text:
            self.tree.insert(text, chosen.url)
        return chosen

    def remove_worker(self, url: str) -> None:
        self.tree.remove_tenant(url)

    def evict(self) -> None:
        self.tree.evict(self.cfg.max_tree_size)


class KvAwarePolicy(Policy):
    """The worker whose prefix cache holds the most leading blocks of the prompt, exactly (from its KV events,
    pdserve/router/kv_index.py), while load is balanced (cache_aware's thresholds); else, or with no block held
    anywhere, the least loaded (ties at random)."""

    name = "kv_aware"
    needs_tokens = True

    def __init__(self, cfg: CacheAwareConfig, feed: KVEventFeed) -> None:
        self.cfg, self.feed = cfg, feed

    def select(self, workers: Sequence[Worker], text: str | None, tokens: Sequence[int] | None = None) -> Worker:
        for w in workers:
            self.feed.follow(w.url)
        if len(workers) == 1:
            return workers[0]
        loads = [w.load() for w in workers]
        pool = range(len(workers))
        cache: dict[int, list[int]] = {}
        if tokens and _balanced(self.cfg, loads):
            hits = [self.feed.matched_tokens(w.url, tokens, cache) for w in workers]
            best = max(hits)
            if best > 0:
                pool = [i for i in pool if hits[i] == best]
        least = min(loads[i] for i in pool)
        chosen = workers[random.choice([i for i in pool if loads[i] == least])]
        if tokens:
            self.feed.note_routed(chosen.url, tokens, cache)
        return chosen

    def remove_worker(self, url: str) -> None:
        self.feed.forget(url)


def make_policy(name: str, cache_cfg: CacheAwareConfig, feed: KVEventFeed | None = None) -> Policy:
    if name == "random":
        return RandomPolicy()
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "power_of_two":
        return PowerOfTwoPolicy()
    if name == "cache_aware":
        return CacheAwarePolicy(cache_cfg)
    if name == "kv_aware":
        return KvAwarePolicy(cache_cfg, feed or KVEventFeed())
    raise ValueError(f"unknown policy {name!r}")
