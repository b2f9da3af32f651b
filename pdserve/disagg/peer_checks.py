"""A prefill's checks of what decodes send it: a decode's registered memory against this model's KV layout,
and a destination against that memory. Every number here came from the network: the writes are planned from
them, so each is checked before any write starts."""

from __future__ import annotations

from pdserve.disagg.common import DisaggLink
from pdserve.disagg.kv_slicing import num_local_kv_heads
from pdserve.disagg.messages import KVDestination
from pdserve.disagg.rank_transfer import DecodeLayout, RankTransfer
from pdserve.disagg.transfer import AgentInfo


def layout_mismatch(link: DisaggLink, xfer: RankTransfer, name: str, layout: DecodeLayout,
                    agent: AgentInfo) -> str | None:
    """Why a decode's registered memory cannot take this prefill's KV (None: it can)."""
    if (layout.num_kv_heads, layout.head_bytes) != (link.num_kv_heads, link.head_bytes):
        return (f"decode {name} has a different KV layout ({layout.num_kv_heads} KV heads of {layout.head_bytes} "
                f"bytes) from this prefill ({link.num_kv_heads} of {link.head_bytes}): different models or dtypes?")
    if layout.agents[0] != agent:
        return f"decode {name}: its rank 0 agent differs from the one it registers"
    try:
        xfer.decode_ranks(layout)  # raises for TP sizes that cannot map
        item_bytes = num_local_kv_heads(link.num_kv_heads, len(layout.agents)) * link.head_bytes
    except ValueError as e:
        return f"decode {name}: {e}"
    num_slots = None
    for rank, a in enumerate(layout.agents):
        kv = a.regions[: link.num_kv_regions]
        if a.backend != link.transfer.name or len(a.regions) != link.num_kv_regions + (1 if rank == 0 else 0):
            return (f"decode {name} has a different KV layout (rank {rank}: {len(a.regions)} regions of backend "
                    f"{a.backend!r}; this prefill writes {link.num_kv_regions} KV regions with "
                    f"{link.transfer.name!r}): different models or dtypes?")
        if any(r.item_bytes != item_bytes or r.nbytes != kv[0].nbytes for r in kv) or kv[0].nbytes < item_bytes:
            return (f"decode {name} has a different KV layout (rank {rank}: KV regions are not {item_bytes}-byte "
                    "slots of one pool size)")
        num_slots = num_slots or kv[0].nbytes // item_bytes
        if kv[0].nbytes // item_bytes != num_slots:
            return f"decode {name}: its TP ranks have pools of different sizes"
    if agent.regions[link.meta_region].item_bytes != link.meta.row_bytes:
        return f"decode {name}: its metadata rows are not {link.meta.row_bytes} bytes (a different pdserve?)"
    return None


def destination_fits(link: DisaggLink, agent: AgentInfo, dest: KVDestination, slots: tuple[int, ...]) -> bool:
    """Every slot and the metadata row inside the regions the decode registered."""
    kv, meta = agent.regions[0], agent.regions[link.meta_region]
    num_slots = kv.nbytes // max(kv.item_bytes, 1)
    stage_end = 0 if dest.stage_start is None else dest.stage_start + dest.prompt_len
    return ((not slots or max(slots) < num_slots) and stage_end <= num_slots
            and dest.meta_row < meta.nbytes // max(meta.item_bytes, 1))
