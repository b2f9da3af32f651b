"""Token-slot allocator for the KV pool. Plain Python; the tensors live in the model runner."""

from __future__ import annotations


class KVSlotAllocator:
    """Slot 0 is reserved as padding for batched decode tables; slots 1..size are allocatable."""

    def __init__(self, size: int):
        self.size = size
        self._free: list[int] = list(range(size, 0, -1))  # pop() hands out low slots first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        if n == 0:
            return []
        out = self._free[-n:]
        del self._free[-n:]
        out.reverse()
        return out

    def free(self, slots: list[int]) -> None:
        self._free.extend(reversed(slots))
