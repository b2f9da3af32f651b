"""The engine process: receives typed messages from the front, steps the engine, sends outputs back."""

from __future__ import annotations

import logging
import os
import signal
import time
from multiprocessing.connection import Connection

from pdserve.config import EngineConfig
from pdserve.engine.messages import (
    AbortRequest,
    EngineFailed,
    EngineReady,
    FlushCacheRequest,
    FlushCacheResult,
    GenerateRequest,
    LoadRequest,
    ProfileRequest,
    RequestOutput,
    ShutdownRequest,
)
from pdserve.engine.profiler import StepProfiler
from pdserve.engine.tp_worker import KEEPALIVE_S
from pdserve.envs import ENVS
from pdserve.model.loader import ResolvedModel

logger = logging.getLogger(__name__)


def run_engine_process(config: EngineConfig, resolved: ResolvedModel, conn: Connection, log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(), format=f"[engine {os.getpid()}] %(levelname)s %(name)s: %(message)s")
    # SIGTERM/SIGINT to the server's process group start the front's graceful drain: the engine keeps serving what
    # is in flight and exits on the front's ShutdownRequest, or when the front is gone (its pipe closes).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if config.engine_cpus:  # before torch starts its thread pool
            _pin(config.engine_cpus)
        engine = create_engine(config, resolved)
        step_log = _StepLog(engine) if ENVS.step_log else None
    except Exception as e:
        logger.exception("engine failed to start")
        conn.send(EngineFailed(f"{type(e).__name__}: {e}"))
        return
    conn.send(EngineReady(engine.max_total_tokens, engine.context_len, resolved.source_path,
                          resolved.model_type, (resolved.architecture,), engine.kernel_plan))
    try:
        _loop(engine, conn, step_log)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the front went away
    finally:
        core = getattr(engine, "engine", engine)  # PD sides wrap an Engine
        if hasattr(core, "close"):
            core.close()  # TP: stops the other ranks


def _pin(cpus: tuple[int, ...]) -> None:
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as e:
        raise ValueError(f"--engine-cpus {','.join(map(str, cpus))}: cannot pin the engine there ({e.strerror}; "
                         f"this machine has {os.cpu_count()} cores)") from None


def create_engine(config: EngineConfig, resolved: ResolvedModel):
    """Unified Engine, or a PD side composed around one (same interface: add_request/abort/step/...)."""
    if config.language_only:  # EPD: text mode, or a prefill that takes image embeddings from encoders
        from pdserve.epd.language import LanguageEngine

        return LanguageEngine(config, resolved)
    if config.disaggregation_mode == "encode":
        raise ValueError("an encode server runs no language engine (pdserve/epd/encode_server.py)")
    if config.disaggregation_mode == "prefill":
        from pdserve.disagg.prefill import PrefillEngine

        return PrefillEngine(config, resolved)
    if config.disaggregation_mode == "decode":
        from pdserve.disagg.decode import DecodeEngine

        return DecodeEngine(config, resolved)
    from pdserve.engine.engine import Engine

    return Engine(config, resolved)


def _loop(engine, conn: Connection, step_log: _StepLog | None = None) -> None:
    # PD engines also wait on their control socket and wake up for deadlines and in-flight transfers.
    poller = None
    sockets = getattr(engine, "control_sockets", None)
    if sockets is None and hasattr(engine, "control_socket"):
        sockets = [engine.control_socket]
    if sockets:
        import zmq

        poller = zmq.Poller()
        poller.register(conn.fileno(), zmq.POLLIN)
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
    core = getattr(engine, "engine", engine)  # PD sides wrap an Engine
    idle = getattr(core, "idle", None)
    # TP: an idle rank 0 wakes up to keep the other ranks' deadline (tp_worker.KEEPALIVE_S).
    max_idle_s = KEEPALIVE_S if getattr(core, "config", None) is not None and core.config.tp_size > 1 else None
    profiler = StepProfiler()
    while True:
        if not engine.has_work:
            if poller is None:
                conn.poll(max_idle_s)
            else:
                poller.poll(engine.idle_wait_s * 1000)
            if idle is not None:
                idle()
        while conn.poll(0):
            msg = conn.recv()
            if isinstance(msg, ShutdownRequest):
                return
            reply = profiler.handle(msg) if isinstance(msg, ProfileRequest) else _handle(engine, msg)
            if reply is not None:
                conn.send(reply)
        outs = profiler.run_step(lambda: engine.step() if step_log is None else step_log.step(engine),
                                 lambda: getattr(core, "last_forward", None))
        if getattr(core, "kv_events", None) is not None:
            core.kv_events.flush()  # the cache's changes of this pass, one batch
        if outs:
            conn.send(outs)


def _handle(engine, msg):
    if isinstance(msg, GenerateRequest):
        try:
            engine.add_request(msg)
        except ValueError as e:
            return [RequestOutput(msg.rid, [], finish_reason="abort", error=str(e), prompt_tokens=len(msg.input_ids),
                                  rejected=True)]
        return None
    if isinstance(msg, AbortRequest):
        out = engine.abort(msg.rid)
        return [out] if out is not None else None
    if isinstance(msg, LoadRequest):
        return engine.load()
    if isinstance(msg, FlushCacheRequest):
        ok = engine.flush_cache()
        return FlushCacheResult(ok, "" if ok else "some cached entries are in use by running requests")
    logger.error("unknown message %r", msg)
    return None


class _StepLog:
    """PDSERVE_STEP_LOG=PREFIX: one line per model step to PREFIX.<pid> (for studying step-time jitter):
    start (monotonic s), wall ms, this thread's CPU ms, sequences in the step, their context tokens after it.
    Loop passes that ran no model (idle polls, PD control work) are not logged."""

    def __init__(self, engine):
        self._engine = getattr(engine, "engine", engine)  # PD sides wrap an Engine
        try:
            self._f = open(f"{ENVS.step_log}.{os.getpid()}", "w", buffering=1)
        except OSError as e:
            raise ValueError(f"PDSERVE_STEP_LOG={ENVS.step_log}: cannot write the step log ({e.strerror})") from None

    def step(self, engine) -> list:
        before = getattr(self._engine, "last_forward", None)
        t0, c0 = time.monotonic(), time.thread_time()
        outs = engine.step()
        t1, c1 = time.monotonic(), time.thread_time()
        forward = getattr(self._engine, "last_forward", None)
        if forward is before:  # no model run (each run leaves a new SchedulerOutput)
            return outs
        seqs = forward.seqs
        ctx = sum(s.req.num_computed_tokens for s in seqs)
        self._f.write(f"{t0:.4f} {1e3 * (t1 - t0):.2f} {1e3 * (c1 - c0):.2f} {len(seqs)} {ctx}\n")
        return outs
