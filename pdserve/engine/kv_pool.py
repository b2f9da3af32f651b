"""Token-slot and page allocators for the KV pool. Plain Python; the tensors live in the model runner."""

from __future__ import annotations

from bisect import bisect_left


class KVSlotAllocator:
    """Slot 0 is reserved as padding for batched decode tables; slots 1..size are allocatable.

    Free slots are kept as sorted, coalesced runs [start, end). An allocation takes the first run that holds
    it whole, so a prompt's KV lands in one contiguous run whenever the pool has one (transfers and attention
    read contiguous slots several times faster); single-slot decode growth fills the lowest holes first,
    which keeps the long runs at the top free for the next prompt. When no run fits, the lowest runs are used.
    """

    def __init__(self, size: int):
        self.size = size
        self._starts: list[int] = [1] if size > 0 else []
        self._ends: list[int] = [size + 1] if size > 0 else []
        self._num_free = size

    @property
    def num_free(self) -> int:
        return self._num_free

    def free_runs(self) -> list[tuple[int, int]]:
        """The free runs [start, end), lowest first (a fully free pool: [(1, size + 1)])."""
        return list(zip(self._starts, self._ends))

    def alloc(self, n: int) -> list[int] | None:
        if n > self._num_free:
            return None
        if n == 0:
            return []
        starts, ends = self._starts, self._ends
        for i in range(len(starts)):
            if ends[i] - starts[i] >= n:
                return self._take(i, n)
        out: list[int] = []
        while len(out) < n:  # no run fits: lowest runs first
            out += self._take(0, min(n - len(out), ends[0] - starts[0]))
        return out

    def _take(self, i: int, n: int) -> list[int]:
        s = self._starts[i]
        if self._ends[i] - s == n:
            del self._starts[i], self._ends[i]
        else:
            self._starts[i] = s + n
        self._num_free -= n
        return list(range(s, s + n))

    def free(self, slots: list[int]) -> None:
        """Return slots; all or nothing: a slot out of range or already free raises ValueError first."""
        if not slots:
            return
        ordered = sorted(slots)
        if ordered[0] < 1 or ordered[-1] > self.size:
            raise ValueError(f"KV slots outside 1..{self.size} freed")
        runs: list[tuple[int, int]] = []
        run_start = prev = ordered[0]
        for s in ordered[1:]:
            if s == prev:
                raise ValueError(f"KV slot {s} freed twice")
            if s != prev + 1:
                runs.append((run_start, prev + 1))
                run_start = s
            prev = s
        runs.append((run_start, prev + 1))
        starts, ends = self._starts, self._ends
        for a, b in runs:
            i = bisect_left(starts, a)
            if (i > 0 and ends[i - 1] > a) or (i < len(starts) and starts[i] < b):
                raise ValueError(f"KV slots [{a}, {b}) freed twice")
        for a, b in runs:
            self._free_run(a, b)

    def _free_run(self, a: int, b: int) -> None:
        """Return [a, b) (checked free of overlap) to the free runs, merging with its neighbours."""
        starts, ends = self._starts, self._ends
        i = bisect_left(starts, a)
        self._num_free += b - a
        joins_prev = i > 0 and ends[i - 1] == a
        joins_next = i < len(starts) and starts[i] == b
        if joins_prev and joins_next:
            ends[i - 1] = ends[i]
            del starts[i], ends[i]
        elif joins_prev:
            ends[i - 1] = b
        elif joins_next:
            starts[i] = a
        else:
            starts.insert(i, a)
            ends.insert(i, b)


class PagedKVAllocator:
    """Token slots handed out in whole pages of page_size slots: page p holds slots [p*P, (p+1)*P).

    Page 0 (it holds slot 0, the decode padding) is reserved; pages 1..num_pages come from a KVSlotAllocator
    over page ids. Counts (size, num_free) are in tokens. With page_size 1 this is the plain slot allocator.
    """

    def __init__(self, num_tokens: int, page_size: int = 1):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.num_pages = num_tokens // page_size
        self.size = self.num_pages * page_size  # in tokens
        self.pages = KVSlotAllocator(self.num_pages)

    @property
    def num_free(self) -> int:
        return self.pages.num_free * self.page_size

    @property
    def num_free_pages(self) -> int:
        return self.pages.num_free

    def free_runs(self) -> list[tuple[int, int]]:
        """The free slot runs [start, end), lowest first (a fully free pool: [(P, size + P)])."""
        p = self.page_size
        return [(s * p, e * p) for s, e in self.pages.free_runs()]

    def alloc(self, num_tokens: int) -> list[int] | None:
        """Slots of ceil(num_tokens / P) whole pages, in page order; None when too few pages are free."""
        p = self.page_size
        if p == 1:
            return self.pages.alloc(num_tokens)
        pages = self.pages.alloc(-(-num_tokens // p))
        if pages is None:
            return None
        return [s for page in pages for s in range(page * p, page * p + p)]

    def free(self, slots: list[int]) -> None:
        """Return whole pages' slots; all or nothing: a partial page, or a page out of range or already free,
        raises ValueError first."""
        p = self.page_size
        if p == 1:
            self.pages.free(slots)
            return
        if len(slots) % p:
            raise ValueError(f"{len(slots)} KV slots freed: not whole pages of {p}")
        ordered = sorted(slots)
        pages = []
        for i in range(0, len(ordered), p):
            first = ordered[i]
            if first % p or ordered[i : i + p] != list(range(first, first + p)):
                raise ValueError(f"KV slots {ordered[i : i + p]} freed: not one whole page of {p}")
            pages.append(first // p)
        self.pages.free(pages)
