"""Bootstrap server (one per prefill instance, beside its dp rank 0 engine) and its client. SGLang's protocol:

PUT /route  every prefill rank registers its control address and KV layout (JSON of RankInfo, schema-checked:
            attn_tp_size/rank, attn_dp_size/rank, pp_size, page_size, kv_cache_dtype, rank_ip/port, ...); with a
            deployment secret it needs `Authorization: Bearer <secret>` (401 otherwise), so nobody without it can
            point decode servers at another address (SGLang issue 39400). The table is [dp rank][tp rank].
GET /route?prefill_dp_rank=-1&target_tp_rank=-1&target_pp_rank=-1  the instance's layout (PrefillLayout), 503
            until all tp * dp ranks registered; with concrete ranks, that rank's RankInfo (404 if unknown);
            `?engine_rank=N` (older SGLang) is dp rank 0, tp rank N. Decodes' heartbeats read routes too and
            notice a restart by a new server_id. GET /health answers health checks. Reads stay open.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import msgspec

from pdserve.disagg.messages import PrefillLayout, RankInfo

logger = logging.getLogger(__name__)


MAX_BODY_BYTES = 64 * 1024


class RouteTable:
    """Registered ranks of one prefill instance, [dp rank][tp rank] -> RankInfo. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ranks: dict[tuple[int, int], RankInfo] = {}

    def register(self, info: RankInfo) -> str | None:
        """Add or replace a rank; an error text when it contradicts the layout already registered."""
        with self._lock:
            first = next(iter(self._ranks.values()), None)
            if first is not None and _layout_of(first) != _layout_of(info) and info.server_id == first.server_id:
                return f"rank layout {_layout_of(info)} contradicts the registered {_layout_of(first)}"
            if first is not None and info.server_id != first.server_id:  # a restarted instance: a new table
                self._ranks = {k: v for k, v in self._ranks.items() if v.server_id == info.server_id}
            if info.attn_tp_rank >= info.attn_tp_size or info.attn_dp_rank >= info.attn_dp_size:
                return "attn_tp_rank / attn_dp_rank out of range"
            self._ranks[(info.attn_dp_rank, info.attn_tp_rank)] = info
        return None

    def layout(self) -> PrefillLayout | None:
        """None until every rank of the layout registered."""
        with self._lock:
            first = next(iter(self._ranks.values()), None)
            if first is None or len(self._ranks) < first.attn_tp_size * first.attn_dp_size:
                return None
            return PrefillLayout(first.attn_tp_size, first.attn_dp_size, first.pp_size, first.page_size,
                                 first.kv_cache_dtype)

    def get(self, dp_rank: int, tp_rank: int) -> RankInfo | None:
        with self._lock:
            return self._ranks.get((dp_rank, tp_rank))


def _layout_of(info: RankInfo) -> tuple:
    return (info.attn_tp_size, info.attn_dp_size, info.pp_size, info.page_size, info.kv_cache_dtype)


class BootstrapServer:
    def __init__(self, host: str, port: int, auth_token: str | None):
        self.table = table = RouteTable()
        expected = None if auth_token is None else f"Bearer {auth_token}".encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet
                logger.debug(fmt, *args)

            def _reply(self, code: int, body: dict | RankInfo | PrefillLayout) -> None:
                data = msgspec.json.encode(body)
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urlparse(self.path)
                if url.path == "/health":
                    return self._reply(200, {"status": "ok"})
                if url.path != "/route":
                    return self._reply(404, {"error": "not found"})
                q = parse_qs(url.query)
                try:
                    if "engine_rank" in q:  # older SGLang decodes
                        dp_rank, tp_rank = 0, int(q["engine_rank"][0])
                    else:
                        dp_rank = int(q.get("prefill_dp_rank", ["-1"])[0])
                        tp_rank = int(q.get("target_tp_rank", q.get("engine_rank", ["-1"]))[0])
                        pp_rank = int(q.get("target_pp_rank", ["-1"])[0])
                        if pp_rank > 0:
                            return self._reply(404, {"error": "no pipeline parallel ranks here (pp_size 1)"})
                except ValueError:
                    return self._reply(400, {"error": "rank parameters must be integers"})
                if tp_rank < 0 or dp_rank < 0:
                    layout = table.layout()
                    if layout is None:
                        return self._reply(503, {"error": "not every prefill rank has registered yet"})
                    return self._reply(200, layout)
                info = table.get(dp_rank, tp_rank)
                if info is None:
                    return self._reply(404, {"error": f"prefill rank (dp {dp_rank}, tp {tp_rank}) not registered"})
                return self._reply(200, info)

            def do_PUT(self):
                if urlparse(self.path).path != "/route":
                    return self._reply(404, {"error": "not found"})
                given = self.headers.get("Authorization", "").encode()
                if expected is not None and not hmac.compare_digest(given, expected):
                    self.close_connection = True
                    return self._reply(401, {"error": "bootstrap writes need the deployment's bearer token"})
                try:
                    length = int(self.headers.get("Content-Length", 0))
                    if not 0 < length <= MAX_BODY_BYTES:
                        return self._reply(400, {"error": f"body must be 1..{MAX_BODY_BYTES} bytes"})
                    info = msgspec.json.decode(self.rfile.read(length), type=RankInfo)
                except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as e:
                    return self._reply(400, {"error": f"bad rank info: {e}"})
                err = table.register(info)
                if err is not None:
                    return self._reply(400, {"error": err})
                self._reply(200, {"status": "registered"})

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="bootstrap", daemon=True)

    def start(self) -> "BootstrapServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _url(host: str, port: int, path: str) -> str:
    h = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{h}:{port}{path}"


def register_rank(host: str, port: int, info: RankInfo, auth_token: str | None, deadline_s: float = 60.0) -> None:
    """PUT /route, retried with backoff until deadline_s (the instance's bootstrap server may still be starting
    in its dp rank 0 engine). Raises the last error."""
    headers = {"Content-Type": "application/json"}
    if auth_token is not None:
        headers["Authorization"] = f"Bearer {auth_token}"
    body = msgspec.json.encode(info)
    end, wait = time.monotonic() + deadline_s, 0.05
    while True:
        req = urllib.request.Request(_url(host, port, "/route"), data=body, method="PUT", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5.0) as r:
                r.read()
            return
        except urllib.error.HTTPError:
            raise  # refused (401, 400): retrying will not help
        except OSError:
            if time.monotonic() + wait > end:
                raise
            time.sleep(wait)
            wait = min(wait * 2, 2.0)


def lookup_layout(host: str, port: int, timeout: float = 5.0) -> PrefillLayout | None:
    """The instance's layout; None while not every rank registered (503)."""
    url = _url(host, port, "/route?prefill_dp_rank=-1&prefill_cp_rank=-1&target_tp_rank=-1&target_pp_rank=-1")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return msgspec.json.decode(r.read(), type=PrefillLayout)
    except urllib.error.HTTPError as e:
        if e.code == 503:
            return None
        raise


def lookup_rank(host: str, port: int, dp_rank: int = 0, tp_rank: int = 0, timeout: float = 5.0) -> RankInfo:
    url = _url(host, port, f"/route?prefill_dp_rank={dp_rank}&target_tp_rank={tp_rank}&target_pp_rank=0")
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return msgspec.json.decode(r.read(), type=RankInfo)


def lookup_instance(host: str, port: int, deadline_s: float = 30.0) -> tuple[PrefillLayout, list[list[RankInfo]]]:
    """The layout and every rank ([dp][tp]) of a prefill instance, waiting (bounded) for all to register."""
    end = time.monotonic() + deadline_s
    while True:
        layout = lookup_layout(host, port)
        if layout is not None:
            break
        if time.monotonic() > end:
            raise TimeoutError(f"prefill at {host}:{port}: not every rank registered within {deadline_s:.0f} s")
        time.sleep(0.2)
    ranks = [[lookup_rank(host, port, dp, tp) for tp in range(layout.attn_tp_size)]
             for dp in range(layout.attn_dp_size)]
    return layout, ranks
