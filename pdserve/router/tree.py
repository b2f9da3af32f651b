"""Approximate radix tree of routed prompts (characters), shared by all workers ("tenants"), as in SGLang's
router: each node remembers which tenants sent text through it and when; a tenant's size is the number of
characters it owns; eviction drops each tenant's least recently used leaves until it fits the cap.

Invariant: a tenant on a node is on every ancestor of that node (insert walks the whole path; eviction
removes leaves only), so the deepest node holding an allowed tenant is the longest match for it."""

from __future__ import annotations

import heapq
import time
from collections.abc import Container


class _Node:
    __slots__ = ("text", "parent", "children", "tenants")

    def __init__(self, text: str, parent: _Node | None) -> None:
        self.text = text  # edge label from the parent
        self.parent = parent
        self.children: dict[str, _Node] = {}  # first character -> child
        self.tenants: dict[str, float] = {}  # tenant -> last access (monotonic seconds)


def _common_prefix(edge: str, text: str, pos: int) -> int:
    """Length of the common prefix of `edge` and text[pos:] (C-speed comparisons, binary search)."""
    if text.startswith(edge, pos):
        return len(edge)
    lo, hi = 0, min(len(edge), len(text) - pos)  # lo always matches; answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(edge[:mid], pos):
            lo = mid
        else:
            hi = mid - 1
    return lo


class ApproxTree:
    def __init__(self) -> None:
        self.root = _Node("", None)
        self.sizes: dict[str, int] = {}  # tenant -> characters owned

    def tenant_size(self, tenant: str) -> int:
        return self.sizes.get(tenant, 0)

    def insert(self, text: str, tenant: str) -> None:
        now = time.monotonic()
        node, pos, n = self.root, 0, len(text)
        node.tenants[tenant] = now
        added = 0
        while pos < n:
            child = node.children.get(text[pos])
            if child is None:
                leaf = _Node(text[pos:], node)
                leaf.tenants[tenant] = now
                node.children[text[pos]] = leaf
                added += n - pos
                break
            k = _common_prefix(child.text, text, pos)
            if k < len(child.text):  # split the edge: mid owns the shared part
                mid = _Node(child.text[:k], node)
                mid.tenants = dict(child.tenants)
                child.text = child.text[k:]
                child.parent = mid
                mid.children[child.text[0]] = child
                node.children[text[pos]] = mid
                child = mid
            if tenant not in child.tenants:
                added += len(child.text)
            child.tenants[tenant] = now
            node, pos = child, pos + k
        self.sizes[tenant] = self.sizes.get(tenant, 0) + added

    def match(self, text: str, allowed: Container[str]) -> tuple[str | None, int]:
        """(tenant, matched characters) for the longest prefix of `text` held by an allowed tenant; the most
        recently used tenant wins ties. (None, 0) when nothing matches."""
        node, pos, n = self.root, 0, len(text)
        best: _Node | None = None
        best_len = 0
        while pos < n:
            child = node.children.get(text[pos])
            if child is None or not any(t in allowed for t in child.tenants):
                break
            k = _common_prefix(child.text, text, pos)
            best, best_len = child, pos + k
            if k < len(child.text):
                break
            node, pos = child, pos + k
        if best is None:
            return None, 0
        tenant = max((t for t in best.tenants if t in allowed), key=best.tenants.__getitem__)
        return tenant, best_len

    def remove_tenant(self, tenant: str) -> None:
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.tenants.pop(tenant, None) is None and node is not self.root:
                continue  # by the invariant, nothing below holds the tenant either
            for child in list(node.children.values()):
                stack.append(child)
            if not node.tenants and node is not self.root:
                self._unlink(node)
        self.sizes.pop(tenant, None)

    def evict(self, max_size: int) -> int:
        """Drop least recently used leaves of every tenant above `max_size` characters; returns characters freed."""
        freed = 0
        for tenant, size in list(self.sizes.items()):
            if size > max_size:
                freed += self._evict_tenant(tenant, max_size)
        return freed

    def _evict_tenant(self, tenant: str, max_size: int) -> int:
        heap: list[tuple[float, int, _Node]] = []
        stack = [self.root]
        while stack:  # the tenant's leaves: nodes it holds where no child holds it
            node = stack.pop()
            held = [c for c in node.children.values() if tenant in c.tenants]
            if held:
                stack.extend(held)
            elif node is not self.root:
                heap.append((node.tenants[tenant], id(node), node))
        heapq.heapify(heap)
        freed = 0
        while heap and self.sizes[tenant] > max_size:
            _, _, node = heapq.heappop(heap)
            del node.tenants[tenant]
            self.sizes[tenant] -= len(node.text)
            freed += len(node.text)
            parent = node.parent
            if not node.tenants:
                self._unlink(node)
            if (parent is not None and parent is not self.root and tenant in parent.tenants
                    and not any(tenant in c.tenants for c in parent.children.values())):
                heapq.heappush(heap, (parent.tenants[tenant], id(parent), parent))
        return freed

    @staticmethod
    def _unlink(node: _Node) -> None:
        parent = node.parent
        if parent is not None and parent.children.get(node.text[0]) is node:
            del parent.children[node.text[0]]
