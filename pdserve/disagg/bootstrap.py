"""Bootstrap server (runs beside a prefill engine) and its client.

PUT /route  registers a prefill rank's control address and KV layout (JSON of RankInfo);
GET /route?engine_rank=N  returns it to decode servers; GET /health answers heartbeats.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from pdserve.disagg.messages import RankInfo

logger = logging.getLogger(__name__)


class BootstrapServer:
    def __init__(self, host: str, port: int):
        self.ranks: dict[int, RankInfo] = {}
        lock = threading.Lock()
        ranks = self.ranks

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet
                logger.debug(fmt, *args)

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
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
                    rank = int(parse_qs(url.query).get("engine_rank", ["0"])[0])
                    with lock:
                        info = ranks.get(rank)
                    if info is None:
                        return self._reply(404, {"error": f"engine rank {rank} not registered"})
                    return self._reply(200, dataclasses.asdict(info))
                self._reply(404, {"error": "not found"})

            def do_PUT(self):
                if urlparse(self.path).path != "/route":
                    return self._reply(404, {"error": "not found"})
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    info = RankInfo(**body)
                except (ValueError, TypeError) as e:
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


def register_rank(host: str, port: int, info: RankInfo, timeout: float = 5.0) -> None:
    req = urllib.request.Request(_url(host, port, "/route"), data=json.dumps(dataclasses.asdict(info)).encode(),
                                 method="PUT", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()


def lookup_rank(host: str, port: int, engine_rank: int = 0, timeout: float = 5.0) -> RankInfo:
    with urllib.request.urlopen(_url(host, port, f"/route?engine_rank={engine_rank}"), timeout=timeout) as r:
        return RankInfo(**json.loads(r.read()))


def check_health(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(_url(host, port, "/health"), timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False
