"""Which KV heads move from which prefill TP rank to which decode TP rank, and the byte runs that move them.

Head layout. A model has H KV heads (the model config's value: never derive it as local_heads * tp, which is
wrong when heads are replicated, cf. SGLang PR 19086). A TP rank of a server with TP size tp holds
max(1, H // tp) "local" heads:
  - tp <= H (needs H % tp == 0): rank r holds global heads [r * H/tp, (r+1) * H/tp);
  - tp > H (needs tp % H == 0): heads are replicated, rank r holds the single head r // (tp/H).

Rank mapping (P prefill ranks, D decode ranks, the larger a multiple of the smaller; decode rank d):
  P == D: prefill rank d;  D > P: prefill rank d // (D/P);  D < P: prefill ranks d*(P/D) .. (d+1)*(P/D)-1.

Head slices. For each decode rank d, every one of its local heads is sent by exactly one prefill rank: the
LOWEST prefill rank mapped to d that holds that head. When P > H several prefill ranks hold the same head;
the higher ones send no data to d (SGLang lets each of them write the same bytes). They may still have to
report completion to d; that is the control plane's business, not this module's.
Everything is derived from global head ids; SGLang's send_kvcache_slice formula
(`src_hpr = max(1, H//P)`, `dst_hpr = max(1, H//D)`, P > D: dst offset =
`((p // max(1, P//H)) * src_hpr) % dst_hpr`; P <= D: src offset = `((d // max(1, D//H)) * dst_hpr) % src_hpr`)
gives the same slices for the pairs kept here (tests check it; note the `%`, cf. SGLang issue 23746).

Example, H = 4, P = 1, D = 2: prefill rank 0 holds heads 0..3; decode rank 0 holds heads 0,1 and decode rank 1
heads 2,3, so head_slices gives HeadSlice(0, 0, src_head_offset=0, dst_head_offset=0, num_heads=2) and
HeadSlice(0, 1, src_head_offset=2, dst_head_offset=0, num_heads=2). With P = 2, D = 1 it is the reverse:
HeadSlice(0, 0, 0, 0, 2) and HeadSlice(1, 0, 0, 2, 2).
Example with replication, H = 2, P = 4, D = 1: prefill ranks 0,1 hold head 0 and ranks 2,3 head 1, so only
ranks 0 and 2 send: HeadSlice(0, 0, 0, 0, 1) and HeadSlice(2, 0, 0, 1, 1).

Byte layout. A rank's KV pool is, per layer, a K region then a V region, each [num_slots, local_heads, head_dim]
contiguous with element size E: slot s, local head h starts at s * item_bytes + h * head_bytes, where
head_bytes = head_dim * E and item_bytes = local_heads * head_bytes. slice_write_runs turns a HeadSlice and the
paired slot lists into (region, src_offset, dst_offset, nbytes) runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.disagg.transfer import slot_runs
from pdserve.model.tp_layout import check_tp, kv_heads_of_rank, num_local_kv_heads

__all__ = ["HeadSlice", "check_tp", "decode_ranks_for_prefill", "head_slices", "kv_heads_of_rank",
           "num_local_kv_heads", "prefill_ranks_for_decode", "slice_write_runs"]


def _check_sizes(num_prefill_ranks: int, num_decode_ranks: int) -> None:
    if num_prefill_ranks < 1 or num_decode_ranks < 1:
        raise ValueError(f"TP sizes must be >= 1, got prefill {num_prefill_ranks}, decode {num_decode_ranks}")
    big, small = max(num_prefill_ranks, num_decode_ranks), min(num_prefill_ranks, num_decode_ranks)
    if big % small != 0:
        raise ValueError(f"prefill TP {num_prefill_ranks} and decode TP {num_decode_ranks}: "
                         f"the larger must be a multiple of the smaller")


def prefill_ranks_for_decode(num_prefill_ranks: int, num_decode_ranks: int, decode_rank: int) -> list[int]:
    """Prefill ranks decode rank `decode_rank` receives from (several when prefill TP > decode TP)."""
    _check_sizes(num_prefill_ranks, num_decode_ranks)
    return _peer_ranks(num_decode_ranks, num_prefill_ranks, decode_rank, "decode")


def decode_ranks_for_prefill(num_prefill_ranks: int, num_decode_ranks: int, prefill_rank: int) -> list[int]:
    """Decode ranks prefill rank `prefill_rank` is mapped to (several when decode TP > prefill TP)."""
    _check_sizes(num_prefill_ranks, num_decode_ranks)
    return _peer_ranks(num_prefill_ranks, num_decode_ranks, prefill_rank, "prefill")


def _peer_ranks(num_own_ranks: int, num_peer_ranks: int, rank: int, side: str) -> list[int]:
    """The peer side's ranks mapped to `rank` of this side: one when this side has as many or more ranks,
    else the block of num_peer / num_own ranks it covers (the rule is symmetric). Sizes checked by the caller."""
    if not 0 <= rank < num_own_ranks:
        raise ValueError(f"{side} rank {rank} out of range for {side} TP {num_own_ranks}")
    if num_own_ranks >= num_peer_ranks:
        return [rank // (num_own_ranks // num_peer_ranks)]
    ratio = num_peer_ranks // num_own_ranks
    return list(range(rank * ratio, (rank + 1) * ratio))


@dataclass(frozen=True)
class HeadSlice:
    """Local heads [src_head_offset, +num_heads) of prefill_rank go to local heads [dst_head_offset, +num_heads)
    of decode_rank."""

    prefill_rank: int
    decode_rank: int
    src_head_offset: int
    dst_head_offset: int
    num_heads: int


def head_slices(num_kv_heads: int, num_prefill_ranks: int, num_decode_ranks: int) -> list[HeadSlice]:
    """Every data-carrying (prefill rank, decode rank) pair, ordered by decode rank then prefill rank; each
    decode rank receives each of its local heads exactly once (from the lowest mapped prefill rank holding it)."""
    _check_sizes(num_prefill_ranks, num_decode_ranks)
    num_local_kv_heads(num_kv_heads, num_prefill_ranks)  # checks the layout
    num_local_kv_heads(num_kv_heads, num_decode_ranks)
    slices: list[HeadSlice] = []
    for d in range(num_decode_ranks):
        dst_heads = kv_heads_of_rank(num_kv_heads, num_decode_ranks, d)
        sources = [(p, kv_heads_of_rank(num_kv_heads, num_prefill_ranks, p))
                   for p in prefill_ranks_for_decode(num_prefill_ranks, num_decode_ranks, d)]
        runs: list[list[int]] = []  # [prefill_rank, src_offset, dst_offset, num_heads], extended while contiguous
        for dst_offset, head in enumerate(dst_heads):
            owner = next(((p, held) for p, held in sources if head in held), None)
            if owner is None:
                raise AssertionError(f"no prefill rank mapped to decode rank {d} holds KV head {head}")
            p, held = owner
            src_offset = head - held.start
            last = runs[-1] if runs else None
            if last and last[0] == p and last[1] + last[3] == src_offset and last[2] + last[3] == dst_offset:
                last[3] += 1
            else:
                runs.append([p, src_offset, dst_offset, 1])
        slices.extend(HeadSlice(p, d, src, dst, n) for p, src, dst, n in sorted(runs))
    return slices


def slice_write_runs(head_slice: HeadSlice, src_item_bytes: int, dst_item_bytes: int, head_bytes: int,
                     num_regions: int, src_slots: list[int], dst_slots: list[int]) -> list[tuple[int, int, int, int]]:
    """(region, src_offset, dst_offset, nbytes) runs copying head_slice's heads of src_slots[i] into dst_slots[i],
    in every one of num_regions regions (region-major). When the slice is whole items on both sides, slots
    contiguous on both sides merge into one run; otherwise there is one run per slot per region."""
    if len(src_slots) != len(dst_slots):
        raise ValueError(f"{len(src_slots)} source slots but {len(dst_slots)} destination slots")
    nbytes = head_slice.num_heads * head_bytes
    src_start = head_slice.src_head_offset * head_bytes
    dst_start = head_slice.dst_head_offset * head_bytes
    if head_bytes <= 0 or head_slice.num_heads < 1 or src_start < 0 or dst_start < 0:
        raise ValueError(f"bad head slice {head_slice} / head_bytes {head_bytes}")
    if src_start + nbytes > src_item_bytes or dst_start + nbytes > dst_item_bytes:
        raise ValueError(f"{head_slice} does not fit items of {src_item_bytes} (src) / {dst_item_bytes} (dst) bytes "
                         f"with {head_bytes}-byte heads")
    if src_start == 0 and dst_start == 0 and nbytes == src_item_bytes == dst_item_bytes:
        merged = slot_runs(list(src_slots), list(dst_slots))
        per_region = [(s * nbytes, d * nbytes, n * nbytes) for s, d, n in merged]
    else:
        per_region = [(s * src_item_bytes + src_start, d * dst_item_bytes + dst_start, nbytes)
                      for s, d in zip(src_slots, dst_slots)]
    return [(region, s, d, n) for region in range(num_regions) for s, d, n in per_region]
