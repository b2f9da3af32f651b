"""Bootstrap server (runs beside a prefill engine) and its client.

PUT /route  registers a prefill rank's control address and KV layout (JSON of RankInfo, schema-checked);
            with a deployment secret it needs `Authorization: Bearer <secret>` (401 otherwise), so nobody
            without it can point decode servers at another address (SGLang issue 39400);
GET /route?engine_rank=N  returns it to decode servers (and their heartbeats, which notice a restart by its
            new server_id); GET /health answers health checks. Reads stay open.
"""

from __future__ import annotations

import hmac
import logging
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import msgspec

from pdserve.disagg.messages import RankInfo

logger = logging.getLogger(__name__)


MAX_BODY_BYTES = 64 * 1024


class BootstrapServer:
    def __init__(self, host: str, port: int, auth_token: str | None):
        self.ranks: dict[int, RankInfo] = {}
        expected = None if auth_token is None else f"Bearer {auth_token}".encode()
        lock = threading.Lock()
        ranks = self.ranks

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet
                logger.debug(fmt, *args)

            def _reply(self, code: int, body: dict | RankInfo) -> None:
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
                if url.path == "/route":
                    try:
                        rank = int(parse_qs(url.query).get("engine_rank", ["0"])[0])
                    except ValueError:
                        return self._reply(400, {"error": "engine_rank must be an integer"})
                    with lock:
                        info = ranks.get(rank)
                    if info is None:
                        return self._reply(404, {"error": f"engine rank {rank} not registered"})
                    return self._reply(200, info)
                self._reply(404, {"error": "not found"})

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
                with lock:
                    ranks[info.engine_rank] = info
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


def register_rank(host: str, port: int, info: RankInfo, auth_token: str | None, timeout: float = 5.0) -> None:
    headers = {"Content-Type": "application/json"}
    if auth_token is not None:
        headers["Authorization"] = f"Bearer {auth_token}"
    req = urllib.request.Request(_url(host, port, "/route"), data=msgspec.json.encode(info), method="PUT",
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()


def lookup_rank(host: str, port: int, engine_rank: int = 0, timeout: float = 5.0) -> RankInfo:
    with urllib.request.urlopen(_url(host, port, f"/route?engine_rank={engine_rank}"), timeout=timeout) as r:
        return msgspec.json.decode(r.read(), type=RankInfo)
