"""HTTP routes (thin: parse, delegate, answer). Built around a ready ServerState."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import Response

from pdserve import __version__
from pdserve.engine.client import EngineDiedError
from pdserve.engine.dp_client import loads_per_rank
from pdserve.engine.messages import LoadReport
from pdserve.server import protocol
from pdserve.server.auth import APIKeyMiddleware, RequestIdMiddleware
from pdserve.server.errors import error_response, install_error_handlers
from pdserve.server.loads import parse_include, worker_loads
from pdserve.server.metrics import CONTENT_TYPE
from pdserve.server.state import ServerState, health_generate, model_info, server_info
from pdserve.server.streaming import ClientDisconnected, json_response, read_json


CONTROL_TIMEOUT_S = 30.0  # an engine control round trip (load report, flush)
INFO_LOADS_TIMEOUT_S = 5.0  # /server_info answers with the last load report after this
PROFILE_TIMEOUT_S = 300.0  # a stop writes the trace first


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="pdserve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pd = state

    async def refresh_loads(timeout_s: float) -> list[LoadReport] | None:
        """Each dp rank's load report, also fed to /metrics; None when the engine did not answer in time."""
        try:
            loads = await asyncio.wait_for(loads_per_rank(state.client), timeout_s)
        except (asyncio.TimeoutError, EngineDiedError):
            return None
        state.metrics.update_loads(loads)
        return loads
    install_error_handlers(app)
    if state.config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=state.config.api_key)
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody is listening any more

    # ---- generation ------------------------------------------------------------------------------------
    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await state.native.generate(protocol.parse_generate(await read_json(request)), request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await state.openai.completions(protocol.parse_completion(await read_json(request)), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await state.openai.chat(protocol.parse_chat(await read_json(request)), request)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return json_response(state.openai.tokenize(protocol.require_object(await read_json(request))))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return json_response(state.openai.detokenize(protocol.require_object(await read_json(request))))

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response(state.openai.models())

    # ---- health and info -------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not state.client.is_alive():  # with --dp-size: any replica
            return error_response("the engine process is not running", 503)
        if state.drain.started:
            return error_response("draining: this server takes no new requests", 503)
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_gen() -> Response:
        problem = await health_generate(state)
        return error_response(f"unhealthy: {problem}", 503) if problem else Response(status_code=200)

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def get_server_info() -> Response:
        await refresh_loads(INFO_LOADS_TIMEOUT_S)  # fresh internal_states; the last ones if the engine is busy
        return json_response(server_info(state))

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def get_model_info() -> Response:
        return json_response(model_info(state))

    @app.get("/get_load")
    async def get_load() -> Response:
        loads = await refresh_loads(CONTROL_TIMEOUT_S)
        if loads is None:
            return error_response("the engine did not report its load in time", 503)
        return json_response([{
            "dp_rank": rank, "num_reqs": load.num_reqs, "num_waiting_reqs": load.num_waiting_reqs,
            "num_tokens": load.num_tokens, "max_total_tokens": load.max_total_tokens, **load.extra,
        } for rank, load in enumerate(loads)])

    @app.get("/v1/loads")
    @app.get("/get_loads")
    async def v1_loads(request: Request) -> Response:  # SMG's WorkerLoadResponse
        try:
            include = parse_include(request.query_params.get("include"))
        except ValueError as e:
            return error_response(str(e), 400, param="include")
        await refresh_loads(CONTROL_TIMEOUT_S)  # else the last report
        return json_response(worker_loads(state.metrics.engine, include, state.config.engine.disaggregation_mode,
                                          state.weight_bytes))

    @app.get("/metrics")
    async def metrics() -> Response:  # scheduler gauges per data parallel rank (label dp_rank)
        await refresh_loads(CONTROL_TIMEOUT_S)  # else the last report
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    # ---- control ---------------------------------------------------------------------------------------
    @app.post("/flush_cache")
    @app.get("/flush_cache")
    async def flush_cache() -> Response:
        result = await state.client.flush_cache()
        body = {"success": result.ok, "message": result.message or ("Cache flushed." if result.ok else "")}
        return json_response(body) if result.ok else error_response(body["message"] or "cannot flush the cache", 400)

    @app.get("/start_profile")
    @app.post("/start_profile")
    async def start_profile(request: Request) -> Response:
        body = await read_json(request) if await request.body() else None
        result = await asyncio.wait_for(state.client.profile(protocol.parse_profile(body, start=True)),
                                        PROFILE_TIMEOUT_S)
        return Response(result.message, media_type="text/plain") if result.ok else error_response(result.message, 400)

    @app.get("/stop_profile")
    @app.post("/stop_profile")
    async def stop_profile() -> Response:
        result = await asyncio.wait_for(state.client.profile(protocol.parse_profile(None, start=False)),
                                        PROFILE_TIMEOUT_S)
        return Response(result.message + "\n", media_type="text/plain") if result.ok else error_response(
            result.message, 400)

    @app.post("/drain")
    async def drain() -> Response:
        """Graceful drain, as SIGTERM: 503 to new requests, the open ones finish, then the server exits."""
        state.drain.begin("POST /drain")
        return json_response({"success": True, "draining": True, "num_inflight": len(state.gen.active)})

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        req = protocol.parse_abort(await read_json(request))
        if req.abort_all:
            rids = sorted(state.gen.active)
        else:  # an OpenAI request with n > 1 runs as rid-0, rid-1, ...
            rids = sorted(r for r in state.gen.active if r.startswith(f"{req.rid}-")) or [req.rid]
        for rid in rids:
            state.client.abort(rid)
        return json_response({"success": True, "aborted": rids})

    return app
