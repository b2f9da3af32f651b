"""Which heads a tensor-parallel rank holds (no torch: the PD transfer planner uses it too).

A model with H KV heads on tp ranks: rank r holds max(1, H // tp) of them; when tp > H each head is
replicated on tp // H ranks (rank r holds head r // (tp // H)), as SGLang does. Query heads split evenly.
"""

from __future__ import annotations


def _check_kv_tp(num_kv_heads: int, tp: int) -> None:
    if tp < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp}")
    if num_kv_heads < 1:
        raise ValueError(f"number of KV heads must be >= 1, got {num_kv_heads}")
    if num_kv_heads >= tp and num_kv_heads % tp != 0:
        raise ValueError(f"{num_kv_heads} KV heads cannot be split over tp={tp} ranks (needs KV heads % tp == 0)")
    if num_kv_heads < tp and tp % num_kv_heads != 0:
        raise ValueError(f"{num_kv_heads} KV heads cannot be replicated over tp={tp} ranks "
                         f"(needs tp % KV heads == 0 when tp > KV heads)")


def check_tp(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """Raise ValueError unless a model with these query / KV head counts can run with TP size tp."""
    _check_kv_tp(num_kv_heads, tp)
    if num_heads < 1 or num_heads % tp != 0:
        raise ValueError(f"{num_heads} query heads cannot be split over tp={tp} ranks (needs heads % tp == 0)")


def num_local_kv_heads(num_kv_heads: int, tp: int) -> int:
    """KV heads held by one TP rank (at least 1: heads are replicated when tp > num_kv_heads)."""
    _check_kv_tp(num_kv_heads, tp)
    return max(1, num_kv_heads // tp)


def kv_heads_of_rank(num_kv_heads: int, tp: int, rank: int) -> range:
    """Global ids of the KV heads TP rank `rank` holds, in the order of its local heads."""
    _check_kv_tp(num_kv_heads, tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} out of range for tp={tp}")
    if tp > num_kv_heads:
        head = rank // (tp // num_kv_heads)
        return range(head, head + 1)
    num_local = num_kv_heads // tp
    return range(rank * num_local, (rank + 1) * num_local)
