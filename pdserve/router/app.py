"""HTTP routes of the router (aiohttp; thin: parse, delegate, answer)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from pdserve import __version__
from pdserve.router import payload
from pdserve.router.config import DEFAULT_BOOTSTRAP_PORT, WorkerSpec
from pdserve.router.metrics import CONTENT_TYPE
from pdserve.router.proxy import Endpoint
from pdserve.router.state import RouterState
from pdserve.server.errors import error_body

logger = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/health"})
PROFILE_TIMEOUT_S = 300.0  # a worker's /stop_profile writes its trace first
MODEL_INFO_TTL_S = 5.0  # /v1/models and /get_model_info answers are reused this long (cleared by /workers changes)
STATE = web.AppKey("state", RouterState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def error_response(message: str, status: int) -> web.Response:
    return json_response(error_body(message, status), status)


def _middlewares(api_key: str | None) -> list:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:  # aiohttp's own 404/405/413: the same JSON shape as everything else
            if e.status < 400:
                raise
            return error_response(e.reason if e.status != 413 else e.text or e.reason, e.status)
        except ConnectionError:
            raise  # the client went away: nobody to answer
        except Exception as e:  # noqa: BLE001 - a bug: answer in the usual shape, log it
            logger.exception("unhandled error on %s", request.path)
            return error_response(f"internal error: {type(e).__name__}: {e}", 500)

    if not api_key:
        return [errors]
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if request.path in OPEN_PATHS or secrets.compare_digest(got, expected):
            return await handler(request)
        return error_response("invalid or missing API key (expected 'Authorization: Bearer <key>')", 401)

    return [errors, auth]


def _spec_from(request: web.Request, body: dict, pd: bool) -> WorkerSpec:
    """A worker from a JSON body ({"url", "role", "bootstrap_port"}) or query parameters."""
    q = request.query
    url = body.get("url", q.get("url"))
    role = body.get("role", q.get("role")) or (None if pd else "regular")
    if role is None:
        raise ValueError("role is required in PD mode: 'prefill' or 'decode'")
    port: object = DEFAULT_BOOTSTRAP_PORT if role == "prefill" else None
    if "bootstrap_port" in body:
        port = body["bootstrap_port"]
    elif "bootstrap_port" in q:
        port = None if q["bootstrap_port"].lower() == "none" else int(q["bootstrap_port"])
    return WorkerSpec(url, role, port)  # type: ignore[arg-type]


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()
    return payload.parse_object(raw) if raw.strip() else {}


def create_app(state: RouterState) -> web.Application:
    cfg, registry, proxy = state.config, state.registry, state.proxy
    app = web.Application(client_max_size=cfg.max_payload_size, middlewares=_middlewares(cfg.api_key))
    app[STATE] = state
    r = app.router

    # ---- generation ------------------------------------------------------------------------------------
    def forwarder(kind: str, path: str) -> Handler:
        ep = Endpoint(kind, path)
        return lambda request: proxy.forward(request, ep)

    r.add_post("/generate", forwarder(payload.GENERATE, "/generate"))
    r.add_post("/v1/completions", forwarder(payload.COMPLETIONS, "/v1/completions"))
    r.add_post("/v1/chat/completions", forwarder(payload.CHAT, "/v1/chat/completions"))

    cached: dict[str, tuple[float, bytes, str]] = {}  # path -> (time, body, content type) of a 200
    generation = [0]  # bumped when /workers changes: an answer fetched before that is not stored

    def forget_cached() -> None:
        cached.clear()
        generation[0] += 1

    async def first_answer(path: str) -> web.Response:
        """The first healthy worker's answer (decode first in PD mode); a 200 is reused for MODEL_INFO_TTL_S, as
        SGLang's router answers model queries from what it knows instead of asking a worker each time."""
        hit = cached.get(path)
        if hit is not None and time.monotonic() - hit[0] < MODEL_INFO_TTL_S:
            return web.Response(body=hit[1], headers={"Content-Type": hit[2]})
        gen = generation[0]
        for role in ("decode", "prefill", "regular"):
            for w in registry.candidates(role):
                status, body, ctype = await proxy.call(w, "GET", path)
                if status == 200 and gen == generation[0]:
                    cached[path] = (time.monotonic(), body, ctype)
                if status < 500:
                    return web.Response(body=body, status=status, headers={"Content-Type": ctype})
        return error_response("no healthy worker available", 503)

    async def models(_: web.Request) -> web.Response:
        return await first_answer("/v1/models")

    async def model_info(_: web.Request) -> web.Response:
        return await first_answer("/get_model_info")

    r.add_get("/v1/models", models)
    r.add_get("/get_model_info", model_info)
    r.add_get("/model_info", model_info)

    # ---- health and info -------------------------------------------------------------------------------
    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def readiness(_: web.Request) -> web.Response:
        counts = {role: sum(w.healthy for w in registry.of_role(role)) for role in ("prefill", "decode", "regular")}
        if proxy.draining:
            return json_response({**error_body("draining", 503), "healthy_workers": counts}, 503)
        if registry.ready():
            return json_response({"status": "ready", "healthy_workers": counts})
        what = "a healthy prefill and a healthy decode worker" if cfg.pd_disaggregation else "a healthy worker"
        return json_response({**error_body(f"not ready: need {what}", 503), "healthy_workers": counts}, 503)

    async def server_info(_: web.Request) -> web.Response:
        workers = registry.all()
        answers = await asyncio.gather(*(proxy.call(w, "GET", "/get_server_info") for w in workers))
        infos: dict[str, list] = {"prefill": [], "decode": [], "regular": []}
        for w, (status, body, _) in zip(workers, answers):
            try:
                info = orjson.loads(body) if status == 200 else {"error": orjson.loads(body)}
            except orjson.JSONDecodeError:
                info = {"error": body.decode(errors="replace")[:500]}
            infos[w.role].append({"url": w.url, **info} if isinstance(info, dict) else {"url": w.url, "info": info})
        router = {"version": __version__, "pd_disaggregation": cfg.pd_disaggregation, "policy": cfg.policy,
                  "prefill_policy": cfg.effective_prefill_policy, "decode_policy": cfg.effective_decode_policy,
                  "ready": registry.ready()}
        # SGLang's shape: the decode servers' internal_states (one per dp rank) collected at the top level,
        # as its mini_lb does (bench_serving reads them there)
        states = [s for info in infos["decode"] + infos["regular"] for s in info.get("internal_states") or []]
        if cfg.pd_disaggregation:
            return json_response({"prefill": infos["prefill"], "decode": infos["decode"], "internal_states": states,
                                  "router": router})
        return json_response({"workers": infos["regular"], "internal_states": states, "router": router})

    async def version(_: web.Request) -> web.Response:
        return json_response({"version": __version__})

    async def loads(_: web.Request) -> web.Response:
        return json_response({"workers": [{"url": w.url, "role": w.role, "load": w.load(), "inflight": w.inflight,
                                           "polled_load": w.polled_load} for w in registry.all()]})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    r.add_get("/health", health)
    r.add_get("/readiness", readiness)
    r.add_get("/health_generate", readiness)
    r.add_get("/get_server_info", server_info)
    r.add_get("/server_info", server_info)
    r.add_get("/version", version)
    r.add_get("/get_loads", loads)
    r.add_get("/metrics", metrics)

    # ---- control ---------------------------------------------------------------------------------------
    async def fan_out(path: str, data: bytes | None, timeout_s: float = 30.0,
                      only_url: str | None = None) -> web.Response:
        workers = [w for w in registry.all() if only_url is None or w.url == only_url.rstrip("/")]
        if not workers:
            return error_response(f"no worker {only_url}" if only_url else "no workers", 404)
        answers = await asyncio.gather(*(proxy.call(w, "POST", path, data, timeout_s) for w in workers))
        results = [{"url": w.url, "role": w.role, "status": s, "body": b.decode(errors="replace")[:500]}
                   for w, (s, b, _) in zip(workers, answers)]
        failed = [x["url"] for x in results if x["status"] != 200]
        if failed:
            return json_response({**error_body(f"{path} failed on {', '.join(failed)}", 500), "results": results},
                                 500)
        return json_response({"success": True, "results": results})

    async def flush_cache(_: web.Request) -> web.Response:
        return await fan_out("/flush_cache", None)

    async def abort_request(request: web.Request) -> web.Response:
        return await fan_out("/abort_request", await request.read())

    async def profile(request: web.Request, path: str) -> web.Response:
        """SMG's gateway profile routes: every worker (or the one named by "url") records, as bench_serving asks."""
        try:
            body = await _json_body(request)
        except payload.BadRequest as e:
            return error_response(str(e), 400)
        only_url = body.pop("url", None)
        if only_url is not None and not isinstance(only_url, str):
            return error_response("url must be a string", 400)
        data = orjson.dumps(body) if path == "/start_profile" else None
        return await fan_out(path, data, PROFILE_TIMEOUT_S, only_url)

    for path in ("/start_profile", "/stop_profile"):
        r.add_post(path, lambda request, p=path: profile(request, p))
        r.add_get(path, lambda request, p=path: profile(request, p))
    r.add_post("/flush_cache", flush_cache)
    r.add_get("/flush_cache", flush_cache)
    r.add_post("/abort_request", abort_request)

    async def drain(_: web.Request) -> web.Response:
        """Graceful drain, as SIGTERM: readiness 503, new requests 503, the open ones finish, then the router exits."""
        state.begin_drain("POST /drain")
        return json_response({"success": True, "draining": True, "num_inflight": proxy.num_inflight})

    r.add_post("/drain", drain)

    async def list_workers(_: web.Request) -> web.Response:
        return json_response({"workers": [w.to_json() for w in registry.all()]})

    async def add_worker(request: web.Request) -> web.Response:
        try:
            spec = _spec_from(request, await _json_body(request), cfg.pd_disaggregation)
            w = registry.add(spec)
        except (ValueError, TypeError, payload.BadRequest) as e:
            return error_response(str(e), 400)
        forget_cached()
        if cfg.health.enabled:
            await registry.probe(w)
        return json_response({"success": True, "worker": w.to_json()})

    async def remove_worker(request: web.Request) -> web.Response:
        try:
            body = await _json_body(request)
        except payload.BadRequest as e:
            return error_response(str(e), 400)
        url = body.get("url", request.query.get("url"))
        if not isinstance(url, str) or not url:
            return error_response("url is required", 400)
        w = registry.remove(url)
        if w is None:
            return error_response(f"no worker {url}", 404)
        forget_cached()
        return json_response({"success": True, "worker": w.to_json()})

    r.add_get("/workers", list_workers)
    r.add_post("/workers", add_worker)
    r.add_delete("/workers", remove_worker)
    r.add_get("/list_workers", list_workers)
    r.add_post("/add_worker", add_worker)
    r.add_post("/remove_worker", remove_worker)
    return app
