"""First-fit allocator of contiguous ranges (rows of an embedding buffer, bytes of a staging buffer)."""

from __future__ import annotations


class RangeAllocator:
    def __init__(self, size: int):
        self.size = size
        self.free_ranges: list[tuple[int, int]] = [(0, size)] if size > 0 else []  # sorted (start, length)
        self.used = 0

    def alloc(self, n: int) -> int | None:
        """Start of a free run of n units, or None."""
        if n <= 0:
            raise ValueError("allocation size must be positive")
        for i, (s, ln) in enumerate(self.free_ranges):
            if ln >= n:
                if ln == n:
                    del self.free_ranges[i]
                else:
                    self.free_ranges[i] = (s + n, ln - n)
                self.used += n
                return s
        return None

    def free(self, start: int, n: int) -> None:
        fr = self.free_ranges
        i = 0
        while i < len(fr) and fr[i][0] < start:
            i += 1
        assert (i == 0 or fr[i - 1][0] + fr[i - 1][1] <= start) and (i == len(fr) or start + n <= fr[i][0]), \
            f"double free of [{start}, {start + n})"
        fr.insert(i, (start, n))
        if i + 1 < len(fr) and start + n == fr[i + 1][0]:  # merge with the next
            fr[i] = (start, n + fr[i + 1][1])
            del fr[i + 1]
        if i > 0 and fr[i - 1][0] + fr[i - 1][1] == start:  # and the previous
            fr[i - 1] = (fr[i - 1][0], fr[i - 1][1] + fr[i][1])
            del fr[i]
        self.used -= n
