"""Data parallelism (`--dp-size N`): N engine replicas (engine processes) behind one HTTP front.

`DataParallelClient` has the interface of `EngineClient` (the front needs no other change) and sends each
request to one replica, by SGLang's rules (`pick_dp_rank`):

1. the rank the request names: `routed_dp_rank` (SMG injects it) or SGLang's `data_parallel_rank`;
2. a PD request (with a bootstrap room): `bootstrap_room % dp_size` (SGLang's follow_bootstrap_room), so that
   the prefill and the decode of one room pick the same rank on both sides;
3. else the least loaded replica: the fewest requests in flight that this client routed to it (ties: the
   lowest rank).

The model is resolved and its tokenizer loaded once, in the front; each replica gets
`dataclasses.replace(config, dp_rank=i)` and, with `--engine-cpus`, its own share of those cores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from pdserve.config import EngineConfig
from pdserve.engine.client import EngineClient, load_model_files
from pdserve.engine.messages import (
    EngineReady, FlushCacheResult, GenerateRequest, LoadReport, ProfileRequest, ProfileResult, RequestOutput,
)
from pdserve.model.loader import ResolvedModel

logger = logging.getLogger(__name__)


def pick_dp_rank(req: GenerateRequest, dp_size: int, inflight: Sequence[int]) -> int:
    """The replica that runs `req` (see the module docstring). Raises ValueError for a rank out of range."""
    if req.routed_dp_rank is not None:
        if not 0 <= req.routed_dp_rank < dp_size:
            raise ValueError(f"routed_dp_rank {req.routed_dp_rank} is out of range: this server has dp_size "
                             f"{dp_size} (ranks 0..{dp_size - 1})")
        return req.routed_dp_rank
    if req.bootstrap is not None and req.bootstrap.room is not None:
        return req.bootstrap.room % dp_size
    return min(range(dp_size), key=lambda rank: (inflight[rank], rank))


def split_engine_cpus(cpus: Sequence[int], dp_size: int) -> list[tuple[int, ...]]:
    """Each replica's share of `--engine-cpus`, in order and as even as can be (the first ones get one more
    core when the count does not divide); () for every replica when no cores are given."""
    if not cpus:
        return [()] * dp_size
    if len(cpus) < dp_size:
        raise ValueError(f"--engine-cpus lists {len(cpus)} cores for {dp_size} data parallel replicas: "
                         "each replica needs at least one")
    per_replica, extra = divmod(len(cpus), dp_size)
    shares, start = [], 0
    for rank in range(dp_size):
        end = start + per_replica + (1 if rank < extra else 0)
        shares.append(tuple(cpus[start:end]))
        start = end
    return shares


def replica_configs(config: EngineConfig) -> list[EngineConfig]:
    """One engine config per dp rank."""
    shares = split_engine_cpus(config.engine_cpus, config.dp_size)
    instance = config.instance_id or uuid.uuid4().hex[:16]  # one server: its PD ranks share a server id
    return [dataclasses.replace(config, dp_rank=rank, engine_cpus=shares[rank], instance_id=instance,
                                dist_init_addr=_offset_port(config.dist_init_addr, rank),
                                model=_replica_device(config, rank))
            for rank in range(config.dp_size)]


def _offset_port(addr: str | None, dp_rank: int) -> str | None:
    """Each replica's TP group has its own rendezvous: --dist-init-addr's port + dp rank."""
    if addr is None or dp_rank == 0:
        return addr
    host, _, port = addr.rpartition(":")
    return f"{host}:{int(port) + dp_rank}"


def _replica_device(config: EngineConfig, dp_rank: int):
    """On CUDA, replica r's TP ranks take GPUs r * tp .. r * tp + tp - 1 (a CPU replica shares the host)."""
    model = config.model
    if config.dp_size == 1 or model.device not in ("auto", "cuda"):
        return model
    import torch

    if not torch.cuda.is_available():
        return model
    return dataclasses.replace(model, device=f"cuda:{dp_rank * config.tp_size}")


class DataParallelClient:
    """N `EngineClient`s behind the interface of one."""

    def __init__(self, config: EngineConfig, replicas: Sequence[EngineClient]):
        if len(replicas) != config.dp_size:
            raise ValueError(f"{len(replicas)} replicas for dp_size {config.dp_size}")
        self.config = config
        self.replicas = list(replicas)
        first = self.replicas[0]
        self.resolved: ResolvedModel = first.resolved
        self.tokenizer = first.tokenizer
        self.eos_token_ids = first.eos_token_ids
        self.inflight = [0] * len(self.replicas)  # requests this client routed to each rank, still running
        self._owner: dict[str, int] = {}  # rid -> rank of the running request

    @classmethod
    async def start(cls, config: EngineConfig, log_level: str = "info") -> "DataParallelClient":
        """Start every replica at once; if one fails, shut the others down and raise its error."""
        files = await asyncio.get_running_loop().run_in_executor(None, load_model_files, config.model.model_path)
        # Cancelling this cancels every start (an engine process already spawned is a daemon of the front).
        results = await asyncio.gather(*(EngineClient.start(c, log_level, files) for c in replica_configs(config)),
                                       return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            await _shutdown_all([r for r in results if isinstance(r, EngineClient)])
            raise failure
        logger.info("%d data parallel engine replicas ready", len(results))
        return cls(config, results)

    # ---- what the front reads (every replica runs the same model with the same limits) --------------------
    @property
    def ready(self) -> EngineReady | None:
        return self.replicas[0].ready

    @property
    def context_len(self) -> int:
        return self.replicas[0].context_len

    def is_alive(self) -> bool:
        """False as soon as any replica died (the server then reports unhealthy and shuts down)."""
        return all(r.is_alive() for r in self.replicas)

    def validate(self, req: GenerateRequest) -> GenerateRequest:
        pick_dp_rank(req, len(self.replicas), self.inflight)  # the rank check
        return self.replicas[0].validate(req)

    # ---- requests -------------------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        rank = pick_dp_rank(req, len(self.replicas), self.inflight)
        if req.rid in self._owner:
            raise ValueError(f"duplicate request id {req.rid!r}")
        self._owner[req.rid] = rank
        self.inflight[rank] += 1
        try:
            async with aclosing(self.replicas[rank].generate(req)) as outputs:
                async for out in outputs:
                    yield out
        finally:
            self.inflight[rank] -= 1
            del self._owner[req.rid]

    def abort(self, rid: str) -> None:
        """To the replica running `rid`; a rid this client does not know goes to all (aborting an unknown rid
        is a no-op in an engine)."""
        rank = self._owner.get(rid)
        for replica in self.replicas if rank is None else [self.replicas[rank]]:
            replica.abort(rid)

    def rank_of(self, rid: str) -> int | None:
        """The replica running `rid`, if any."""
        return self._owner.get(rid)

    # ---- control --------------------------------------------------------------------------------------
    async def get_loads(self) -> list[LoadReport]:
        """One report per dp rank, in rank order."""
        return list(await asyncio.gather(*(r.get_load() for r in self.replicas)))

    async def get_load(self) -> LoadReport:
        """All replicas together."""
        return sum_loads(await self.get_loads())

    async def flush_cache(self) -> FlushCacheResult:
        results = await asyncio.gather(*(r.flush_cache() for r in self.replicas))
        failed = [f"dp rank {rank}: {res.message}" for rank, res in enumerate(results) if not res.ok]
        return FlushCacheResult(not failed, "; ".join(failed))

    async def profile(self, req: ProfileRequest) -> ProfileResult:
        results = await asyncio.gather(*(r.profile(req) for r in self.replicas))
        failed = [f"dp rank {rank}: {res.message}" for rank, res in enumerate(results) if not res.ok]
        files = tuple(f for res in results for f in res.trace_files)
        return ProfileResult(not failed, "; ".join(failed) or results[0].message, files)

    async def shutdown(self) -> None:
        await _shutdown_all(self.replicas)


async def start_engine_client(config: EngineConfig, log_level: str = "info") -> EngineClient | DataParallelClient:
    """The server's engine handle: one plain EngineClient, or a DataParallelClient for `dp_size > 1`."""
    if config.dp_size == 1:
        return await EngineClient.start(config, log_level)
    return await DataParallelClient.start(config, log_level)


async def loads_per_rank(client: object) -> list[LoadReport]:
    """One load report per dp rank, for any engine client (a plain one is rank 0)."""
    if isinstance(client, DataParallelClient):
        return await client.get_loads()
    return [await client.get_load()]  # type: ignore[attr-defined]


def sum_loads(loads: Sequence[LoadReport]) -> LoadReport:
    """Several replicas' loads as one (every counter summed, the mode-specific extras too)."""
    extra: dict[str, int] = {}
    for load in loads:
        for key, value in load.extra.items():
            extra[key] = extra.get(key, 0) + value
    return LoadReport(
        num_reqs=sum(x.num_reqs for x in loads),
        num_waiting_reqs=sum(x.num_waiting_reqs for x in loads),
        num_tokens=sum(x.num_tokens for x in loads),
        max_total_tokens=sum(x.max_total_tokens for x in loads),
        num_used_by_reqs=sum(x.num_used_by_reqs for x in loads),
        num_cached_tokens=sum(x.num_cached_tokens for x in loads),
        extra=extra,
    )


async def _shutdown_all(replicas: Sequence[EngineClient]) -> None:
    results = await asyncio.gather(*(r.shutdown() for r in replicas), return_exceptions=True)
    for rank, res in enumerate(results):
        if isinstance(res, BaseException):
            logger.warning("shutting down engine replica %d failed: %s", rank, res)

