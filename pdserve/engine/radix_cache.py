"""Radix-tree prefix cache over KV slots (SGLang-style, token or page granular).

Each edge holds a run of token ids and the pool slots holding their KV. Requests lock the path they use;
unlocked leaves are evicted least recently used first. With page_size P > 1 the tree works in whole pages:
only page-aligned prefixes are inserted and matched, edges split at page boundaries and children are keyed by
their first page's token ids, so every node owns whole pages. Plain Python, no tensors.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable

_tick = itertools.count()


class RadixNode:
    __slots__ = ("key", "slots", "children", "parent", "lock_ref", "last_access", "id")

    def __init__(self, key: tuple[int, ...] = (), slots: list[int] | None = None, parent: "RadixNode | None" = None):
        self.key = key
        self.slots = slots or []
        self.children: dict[int | tuple[int, ...], RadixNode] = {}  # by first token (P == 1) or first page
        self.parent = parent
        self.lock_ref = 0
        self.last_access = time.monotonic()
        self.id = next(_tick)


def _common_len(a: tuple[int, ...], b: list[int] | tuple[int, ...], start: int) -> int:
    n = min(len(a), len(b) - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i


class RadixCache:
    def __init__(self, free_slots: Callable[[list[int]], None], page_size: int = 1):
        self._free_slots = free_slots
        self.page_size = page_size
        self.root = RadixNode()
        self.root.lock_ref = 1
        self.num_cached_tokens = 0  # slots owned by the tree
        self.num_locked_tokens = 0  # of those, slots on a path some request holds
        # KV events (pdserve/kv_events.py BlockEvents): on_change(stored, tokens, start): tokens[start:] were just
        # cached (stored) or evicted, tokens being the whole path from the root.
        self.on_change: Callable[[bool, tuple[int, ...] | list[int], int], None] | None = None

    def match_prefix(self, tokens: list[int] | tuple[int, ...]) -> tuple[list[int], RadixNode]:
        """Longest cached prefix of tokens, in whole pages: (its slots, the deepest node covering it)."""
        node, pos, slots = self.root, 0, []
        now = time.monotonic()
        tokens = self._page_aligned(tokens)
        while pos < len(tokens):
            child = node.children.get(self._child_key(tokens, pos))
            if child is None:
                break
            n = self._common_pages_len(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            slots.extend(child.slots)
            pos += n
            node = child
        return slots, node

    def _child_key(self, tokens: list[int] | tuple[int, ...], pos: int) -> int | tuple[int, ...]:
        """The children key of an edge starting at tokens[pos]: its first token, or its first page."""
        return tokens[pos] if self.page_size == 1 else tuple(tokens[pos : pos + self.page_size])

    def _page_aligned(self, tokens: list[int] | tuple[int, ...]) -> list[int] | tuple[int, ...]:
        p = self.page_size
        return tokens if p == 1 else tokens[: len(tokens) // p * p]

    def _common_pages_len(self, a: tuple[int, ...], b: list[int] | tuple[int, ...], start: int) -> int:
        """Common prefix length of a and b[start:], rounded down to whole pages."""
        n = _common_len(a, b, start)
        return n if self.page_size == 1 else n // self.page_size * self.page_size

    def _split(self, node: RadixNode, n: int) -> RadixNode:
        """Split node's edge after n tokens (whole pages); returns the new upper node."""
        upper = RadixNode(node.key[:n], node.slots[:n], node.parent)
        upper.lock_ref = node.lock_ref
        upper.last_access = node.last_access
        assert node.parent is not None
        node.parent.children[self._child_key(node.key, 0)] = upper
        node.key, node.slots, node.parent = node.key[n:], node.slots[n:], upper
        upper.children[self._child_key(node.key, 0)] = node
        return upper

    def insert(self, tokens: list[int], slots: list[int]) -> int:
        """Cache the page-aligned prefix of tokens -> slots. Returns how many leading tokens were already
        cached (their slots in `slots` are duplicates the caller still owns and must free); the slots past the
        aligned prefix stay the caller's too."""
        node, pos = self.root, 0
        now = time.monotonic()
        tokens = self._page_aligned(tokens)
        while pos < len(tokens):
            key = self._child_key(tokens, pos)
            child = node.children.get(key)
            if child is None:
                new = RadixNode(tuple(tokens[pos:]), list(slots[pos : len(tokens)]), node)
                node.children[key] = new
                self.num_cached_tokens += len(new.slots)
                if self.on_change is not None:
                    self.on_change(True, tokens, pos)
                return pos
            n = self._common_pages_len(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            pos += n
            node = child
        return pos

    def lock(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.num_locked_tokens += len(node.slots)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: RadixNode) -> None:
        while node is not self.root:
            node.lock_ref -= 1
            assert node.lock_ref >= 0
            if node.lock_ref == 0:
                self.num_locked_tokens -= len(node.slots)
            node = node.parent  # type: ignore[assignment]

    @property
    def num_evictable_tokens(self) -> int:
        return self.num_cached_tokens - self.num_locked_tokens

    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens slots from unlocked leaves, LRU first. Returns slots freed."""
        leaves = [(n.last_access, n.id, n) for n in self.nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            _, _, leaf = heapq.heappop(leaves)
            if self.on_change is not None:
                path = self._path(leaf)
                self.on_change(False, path, len(path) - len(leaf.key))
            self._free_slots(leaf.slots)
            freed += len(leaf.slots)
            self.num_cached_tokens -= len(leaf.slots)
            parent = leaf.parent
            assert parent is not None
            del parent.children[self._child_key(leaf.key, 0)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, (parent.last_access, parent.id, parent))
        return freed

    def _path(self, node: RadixNode) -> tuple[int, ...]:
        """The token ids from the root to the end of node's edge."""
        keys = []
        while node is not self.root:
            keys.append(node.key)
            node = node.parent  # type: ignore[assignment]
        return tuple(t for key in reversed(keys) for t in key)

    def reset(self) -> int:
        """Drop every unlocked entry (flush_cache). Returns slots freed."""
        return self.evict(self.num_cached_tokens)

    def nodes(self):
        """Every node but the root."""
        stack = [self.root]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n is not self.root:
                yield n
