"""Front-process handle on the engine process: spawn it, send typed messages, stream outputs back."""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing as mp
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pdserve.config import EngineConfig
from pdserve.engine.engine import eos_token_ids_of, validate_request
from pdserve.engine.messages import (
    AbortRequest,
    EngineFailed,
    EngineReady,
    FlushCacheRequest,
    FlushCacheResult,
    GenerateRequest,
    LoadReport,
    LoadRequest,
    ProfileRequest,
    ProfileResult,
    RequestOutput,
    ShutdownRequest,
)
from pdserve.engine.process import run_engine_process
from pdserve.model.loader import ResolvedModel, load_tokenizer, resolve_model

logger = logging.getLogger(__name__)


class EngineDiedError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelFiles:
    """The model as the front sees it: resolved once, shared by every engine replica of a server."""

    resolved: ResolvedModel
    tokenizer: Any
    eos_token_ids: tuple[int, ...]


def load_model_files(model_path: str | None) -> ModelFiles:
    resolved = resolve_model(model_path)  # converts a GGUF once, before any engine is spawned
    tokenizer = load_tokenizer(resolved.hf_dir)
    return ModelFiles(resolved, tokenizer, tuple(eos_token_ids_of(resolved.hf_dir, tokenizer)))


class EngineClient:
    def __init__(self, config: EngineConfig, log_level: str = "info", files: ModelFiles | None = None):
        self.config = config
        files = files or load_model_files(config.model.model_path)
        self.resolved = files.resolved
        self.tokenizer = files.tokenizer
        self.eos_token_ids = files.eos_token_ids
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=run_engine_process, args=(config, self.resolved, child, log_level),
                                 # TP: the engine starts the other ranks (a daemon cannot); it exits with the front's
                                 # pipe either way (EOF in its loop)
                                 daemon=config.tp_size == 1, name=_process_name(config))
        self._proc.start()
        child.close()
        self.ready: EngineReady | None = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._load_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._flush_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._profile_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: str | None = None
        self._closing = False

    @classmethod
    async def start(cls, config: EngineConfig, log_level: str = "info",
                    files: ModelFiles | None = None) -> "EngineClient":
        self = cls(config, log_level, files)
        self._loop = asyncio.get_running_loop()
        first = await self._loop.run_in_executor(None, self._recv_first)
        if isinstance(first, EngineFailed):
            self._proc.join(timeout=5)
            raise RuntimeError(f"engine failed to start: {first.message}")
        self.ready = first
        threading.Thread(target=self._reader, name="engine-reader", daemon=True).start()
        return self

    def _recv_first(self):
        try:
            return self._conn.recv()
        except EOFError:
            return EngineFailed(f"engine process exited with code {self._proc.exitcode}")

    # ---- reader thread --------------------------------------------------------------------------------
    def _reader(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                self._loop.call_soon_threadsafe(self._dispatch, msg)
        except (EOFError, OSError):
            self._loop.call_soon_threadsafe(self._on_death)

    def _dispatch(self, msg) -> None:
        if isinstance(msg, list):
            for out in msg:
                q = self._streams.get(out.rid)
                if q is not None:
                    q.put_nowait(out)
        elif isinstance(msg, LoadReport):
            _resolve(self._load_waiters, msg)
        elif isinstance(msg, FlushCacheResult):
            _resolve(self._flush_waiters, msg)
        elif isinstance(msg, ProfileResult):
            _resolve(self._profile_waiters, msg)

    def _on_death(self) -> None:
        self._dead = f"engine process exited (code {self._proc.exitcode})"
        if not self._closing:
            logger.error(self._dead)
        for rid, q in self._streams.items():
            q.put_nowait(RequestOutput(rid, [], finish_reason="abort", error=self._dead))
        for waiters in (self._load_waiters, self._flush_waiters, self._profile_waiters):
            while waiters:
                w = waiters.popleft()
                if not w.done():
                    w.set_exception(EngineDiedError(self._dead))

    # ---- API ------------------------------------------------------------------------------------------
    @property
    def context_len(self) -> int:
        return self.ready.context_len

    def is_alive(self) -> bool:
        return self._dead is None and self._proc.is_alive()

    def validate(self, req: GenerateRequest) -> GenerateRequest:
        """Raise ValueError for a request that can never run (checked before anything is queued)."""
        return validate_request(req, self.ready.context_len, self.ready.max_total_tokens,
                                self.config.disaggregation_mode)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        req = self.validate(req)
        if not self.is_alive():
            raise EngineDiedError(self._dead or "engine process is not running")
        if req.rid in self._streams:
            raise ValueError(f"duplicate request id {req.rid!r}")
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[req.rid] = q
        finished = False
        try:
            self._conn.send(req)
            while True:
                out = await q.get()
                finished = out.finish_reason is not None
                if out.rejected:
                    raise ValueError(out.error)
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(req.rid, None)
            if not finished:
                self.abort(req.rid)

    def abort(self, rid: str) -> None:
        if self.is_alive():
            try:
                self._conn.send(AbortRequest(rid))
            except OSError:
                pass

    async def _ask(self, msg, waiters: collections.deque):
        if not self.is_alive():
            raise EngineDiedError(self._dead or "engine process is not running")
        fut = self._loop.create_future()
        waiters.append(fut)
        self._conn.send(msg)
        return await fut

    async def get_load(self) -> LoadReport:
        return await self._ask(LoadRequest(), self._load_waiters)

    async def flush_cache(self) -> FlushCacheResult:
        return await self._ask(FlushCacheRequest(), self._flush_waiters)

    async def profile(self, req: ProfileRequest) -> ProfileResult:
        return await self._ask(req, self._profile_waiters)

    async def shutdown(self) -> None:
        self._closing = True
        if self._proc.is_alive():
            try:
                self._conn.send(ShutdownRequest())
            except OSError:
                pass
            await asyncio.get_running_loop().run_in_executor(None, self._proc.join, 10)
        if self._proc.is_alive():
            self._proc.kill()


def _process_name(config: EngineConfig) -> str:
    return "pdserve-engine" if config.dp_size == 1 else f"pdserve-engine-dp{config.dp_rank}"


def _resolve(waiters: collections.deque, value) -> None:
    """The engine answers each control request exactly once, in order: the reply is the oldest waiter's. A waiter
    that gave up (a caller's timeout) has its reply dropped, never handed to the next caller."""
    if waiters:
        w = waiters.popleft()
        if not w.done():
            w.set_result(value)
