"""Run the router: set up the upstream session and health checks, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from pdserve.router.app import create_app
from pdserve.router.config import RouterConfig
from pdserve.router.state import RouterState

logger = logging.getLogger(__name__)


def run_router(config: RouterConfig) -> int:
    """Blocking; returns the process exit code."""
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        import uvloop  # a faster event loop (requirements.txt); asyncio's own without it
    except ImportError:
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))


async def serve(config: RouterConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    state = RouterState(config)

    def on_signal() -> None:  # the first one drains, a second one stops at once
        if state.proxy.draining:
            stop.set()
        else:
            state.begin_drain("signal")

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    runner = web.AppRunner(create_app(state), access_log=None, handler_cancellation=True)
    try:
        await state.start()
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port, backlog=2048, reuse_address=True)
        await site.start()
        logger.info("router serving on http://%s:%d (%s mode)", config.host, config.port,
                    "PD" if config.pd_disaggregation else "regular")
        await state.drain_requested.wait()
        if not await state.wait_drained(config.request_timeout_s, stop):
            logger.warning("stopping with %d requests in flight", state.proxy.num_inflight)
        logger.info("shutting down")
    except OSError as e:
        logger.error("cannot serve on %s:%d: %s", config.host, config.port, e)
        return 1
    finally:
        await runner.cleanup()
        await state.close()
    return 0
