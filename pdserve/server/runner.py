"""Run the HTTP front: start the engine, serve until a signal or the engine's death, shut the engine down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn

from pdserve.config import ServerConfig
from pdserve.server.app import create_app
from pdserve.server.state import build_state

logger = logging.getLogger(__name__)

_ENGINE_POLL_S = 1.0


class _UvicornServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Signals are ours (see serve): uvicorn would re-raise SIGTERM after its shutdown and kill the
        # process before the engine is shut down.
        yield


def run_server(config: ServerConfig) -> int:
    """Blocking; returns the process exit code."""
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    return asyncio.run(serve(config))


async def serve(config: ServerConfig) -> int:
    if config.engine.disaggregation_mode == "encode":  # EPD encode server: a vision encoder, no engine process
        from pdserve.epd.encode_server import serve_encoder

        return await serve_encoder(config)
    if config.engine.node_rank > 0:  # another machine's tensor-parallel ranks: no HTTP, no scheduler
        from pdserve.engine.tp_worker import serve_node
        from pdserve.model.loader import resolve_model

        hf_dir = resolve_model(config.engine.model.model_path).hf_dir
        return await asyncio.get_running_loop().run_in_executor(None, serve_node, config.engine, hf_dir)
    from pdserve.engine.dp_client import start_engine_client

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    state = None

    def on_signal() -> None:  # the first one drains once serving; a second one (or one while starting) stops
        if state is not None and not state.drain.started:
            state.drain.begin("signal")
        else:
            stop.set()
            if state is not None:
                state.drain.requested.set()  # wakes the watch loop

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    # The HTTP port is ours before the engine starts: the engine's own sockets (ZMQ control, bootstrap,
    # transfer agents) bind random ports and could otherwise take it while the model loads.
    try:
        sock = _bind(config.host, config.port)
    except OSError as e:
        logger.error("cannot bind http://%s:%d: %s", config.host, config.port, e)
        return 1
    grpc_front = None
    if config.grpc_port is not None:  # SMG's gRPC worker protocol, bound now for the same reason
        from pdserve.server.grpc_service import GrpcFront

        try:
            grpc_front = GrpcFront(config.host, config.grpc_port)
        except RuntimeError as e:
            logger.error("cannot bind grpc://%s:%d: %s", config.host, config.grpc_port, e)
            sock.close()
            return 1
    starting = asyncio.ensure_future(start_engine_client(config.engine, config.log_level))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        logger.info("stopped while the engine was starting")
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        sock.close()
        if grpc_front is not None:
            await grpc_front.stop()
        return 1
    try:
        client = starting.result()  # a failed start raises here
    except BaseException:
        sock.close()
        if grpc_front is not None:
            await grpc_front.stop()
        raise
    exit_code = 0
    try:
        state = build_state(config, client)
        app = create_app(state)
        if grpc_front is not None:
            await grpc_front.start(state)
        server = _UvicornServer(uvicorn.Config(
            app, host=config.host, port=config.port, log_level=config.log_level, timeout_keep_alive=30,
            lifespan="off",
        ))

        async def watch() -> None:
            nonlocal exit_code
            drain = state.drain
            while registration is not None and not server.started and not stop.is_set():
                await asyncio.sleep(0.05)  # registered once it answers
            if registration is not None and not stop.is_set():
                registration.start()
            while not stop.is_set():
                if not client.is_alive():
                    logger.error("the engine process died; shutting down")
                    exit_code = 1
                    break
                if drain.requested.is_set() and not stop.is_set():
                    if registration is not None:
                        await registration.withdraw()  # routers stop sending before the requests in flight end
                    if await drain.wait_drained(lambda: client.is_alive() and not stop.is_set()):
                        logger.info("drained: no request in flight; stopping")
                    else:
                        logger.warning("stopping with %d requests still in flight", len(state.gen.active))
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(drain.requested.wait(), _ENGINE_POLL_S)
            server.should_exit = True

        registration = _registration(config, state.served_model_name)
        watcher = asyncio.ensure_future(watch())
        logger.info("serving on http://%s:%d", config.host, config.port)
        await server.serve(sockets=[sock])
        watcher.cancel()
        if registration is not None:
            await registration.withdraw()
        if not server.started:
            exit_code = 1
    finally:
        stopping.cancel()
        if grpc_front is not None:
            await grpc_front.stop()
        await client.shutdown()
    return exit_code


def _registration(config: ServerConfig, model: str):
    """The etcd record of this server (--discovery), not yet started; None without --discovery."""
    if config.discovery is None:
        return None
    from pdserve.discovery import DiscoveryConfig, Registration, WorkerRecord, advertised_url

    mode = config.engine.disaggregation_mode
    role = mode if mode in ("prefill", "decode") else "regular"
    record = WorkerRecord(advertised_url(config.host, config.port), role,
                          config.engine.bootstrap_port if role == "prefill" else None, model)
    return Registration(DiscoveryConfig.parse(config.discovery), record, config.discovery_ttl_s)


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening (uvicorn listens on it once the engine is up)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock

