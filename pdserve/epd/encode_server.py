"""The encode server (`--disaggregation-mode encode`, alias `--encoder-only`): image processor + vision tower +
projector, nothing else. It computes image embeddings and writes them into language servers' memory.

HTTP:
  POST /encode          {"room": int, "images": [{"index": i, "url": URL | path | data URI}, ...]}
                        -> {"room", "encoder": control address, "hidden", "dtype",
                            "images": [{"index", "rows", "digest", "encode_s", "nbytes"}]}
                        400 names a bad image (not an image, too large, unreachable URL); 500 an encoder failure.
  POST /encode/release  {"room": int}: drop what the room still holds (a balancer whose request failed).
  GET /encode/transfers[?room=R]  recent sends: bytes and write time per image.
  GET /health, /health_generate, /server_info, /model_info, /get_load, POST /flush_cache.

Embeddings are held (unregistered memory) under (room, image index) until a language server sends
EmbedDestination, or for PDSERVE_EPD_EMBEDDING_TTL. On EmbedDestination the rows are cast to the
receiver's dtype, copied into the registered staging buffer and written with the transfer engine
(--disaggregation-transfer-backend; fake sends them inline); EmbedDone reports the result. A control thread
owns the ZMQ socket and the writes; the vision tower runs on one worker thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response

from pdserve import __version__
from pdserve.config import ServerConfig
from pdserve.disagg.control import ControlChannel
from pdserve.disagg.transfer import MemRegion, TransferState, WriteRun, create_transfer_engine
from pdserve.envs import ENVS
from pdserve.epd.buffers import RangeAllocator
from pdserve.epd.images import ImageError, decode, fetch_bytes, preprocess
from pdserve.epd.messages import EPD_MAX_FRAME_BYTES, EPD_MESSAGES, EmbedAbort, EmbedDestination, EmbedDone
from pdserve.epd.vlm import VLMSpec

logger = logging.getLogger(__name__)

_POLL_MS = 5


@dataclass
class _Held:
    emb: torch.Tensor  # [rows, H] on CPU, in the encoder's dtype
    until: float
    digest: str


@dataclass
class _Write:
    dest: EmbedDestination
    handle: object
    start: int  # staging bytes
    nbytes: int
    t0: float


class EncoderCore:
    """Vision encoder + held embeddings + the sending side of the transfer (thread-safe)."""

    def __init__(self, config: ServerConfig):
        from pdserve.engine.model_runner import pick_device_dtype
        from pdserve.epd.vision import VisionEncoder
        from pdserve.model.loader import ModelLoadError, resolve_model

        eng = config.engine
        if eng.num_threads:
            torch.set_num_threads(eng.num_threads)
        self.resolved = resolve_model(eng.model.model_path)
        spec = VLMSpec.from_dir(self.resolved.hf_dir)
        if spec is None:
            raise ModelLoadError(f"{self.resolved.source_path} is not a vision-language model; an encode server "
                                 "needs one (try --model-path demo-vlm)")
        self.spec = spec
        self.device, self.dtype = pick_device_dtype(eng.model.device, eng.model.dtype)
        self.vision = VisionEncoder(spec, self.dtype, self.device)
        self.hidden = spec.text_hidden_size
        nbytes = ENVS.epd_buffer_tokens * self.hidden * 4
        self.staging = torch.zeros(nbytes, dtype=torch.uint8)  # registered; rows are cast into it per write
        self.staging_alloc = RangeAllocator(nbytes)
        self.agent_name = f"epd-enc-{uuid.uuid4().hex[:12]}"
        self.transfer = create_transfer_engine(eng.transfer_backend, self.agent_name, eng.host,
                                               [MemRegion(self.staging.data_ptr(), nbytes, 1)], eng.ib_device)
        self.moves_data = eng.transfer_backend != "fake"
        self.ctrl = ControlChannel(eng.host, EPD_MESSAGES, eng.auth_secret, EPD_MAX_FRAME_BYTES)
        self.lock = threading.Lock()
        self.held: dict[tuple[int, int], _Held] = {}
        self.waiting: list[tuple[EmbedDestination, float]] = []  # destinations waiting for staging space
        self.writes: list[_Write] = []
        self.counters = {"images_encoded": 0, "embeddings_sent": 0, "embeddings_failed": 0, "bytes_sent": 0}
        self.records: collections.deque[dict] = collections.deque(maxlen=4096)  # recent sends (GET /encode/transfers)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="vision")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._control_loop, name="epd-control", daemon=True)
        self._thread.start()
        logger.info("encode server %s: %s, %d rows x %d per image, backend %s, control %s", self.agent_name,
                    self.resolved.hf_dir, spec.tokens_per_image, self.hidden, eng.transfer_backend, self.ctrl.addr)

    # ---- encoding (worker thread) ----------------------------------------------------------------------
    def encode_bytes(self, data: bytes) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        px = preprocess(decode(data), self.spec.processor)  # ImageError for bad images
        emb = self.vision.encode(px)
        return emb, time.perf_counter() - t0

    def hold(self, room: int, index: int, emb: torch.Tensor, digest: str) -> None:
        with self.lock:
            self.held[(room, index)] = _Held(emb, time.monotonic() + ENVS.epd_embedding_ttl_s, digest)
            self.counters["images_encoded"] += 1

    def release(self, room: int) -> int:
        with self.lock:
            keys = [k for k in self.held if k[0] == room]
            for k in keys:
                del self.held[k]
            return len(keys)

    # ---- control thread --------------------------------------------------------------------------------
    def _control_loop(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self.ctrl.pull, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                poller.poll(_POLL_MS if (self.writes or self.waiting) else 50)
                for msg in self.ctrl.recv_all():
                    if isinstance(msg, EmbedDestination):
                        self._serve(msg, time.monotonic())
                    elif isinstance(msg, EmbedAbort):
                        n = self.release(msg.room)
                        logger.info("room %d aborted by the language server (%s): dropped %d", msg.room,
                                    msg.reason, n)
                self._poll_writes()
                self._retry_waiting()
                self._expire()
            except Exception:  # noqa: BLE001 - keep serving
                logger.exception("EPD control loop")

    def _serve(self, d: EmbedDestination, t_arrived: float) -> bool:
        """Start writing one image; False when it must wait for staging space."""
        with self.lock:
            h = self.held.get((d.room, d.index))
        if h is None:
            self._done(d, False, f"no embedding for room {d.room} image {d.index} on this encoder (never encoded, "
                                 "expired after PDSERVE_EPD_EMBEDDING_TTL, or the encoder restarted)")
            return True
        if d.receiver.backend != self.transfer.name:
            self._drop(d)
            self._done(d, False, f"the language server uses transfer backend {d.receiver.backend!r}, this encoder "
                                 f"{self.transfer.name!r} (--disaggregation-transfer-backend must match)")
            return True
        if tuple(h.emb.shape) != (d.rows, d.hidden):
            self._drop(d)
            self._done(d, False, f"embedding shape mismatch: this encoder made {tuple(h.emb.shape)}, the language "
                                 f"server expects ({d.rows}, {d.hidden}) (different models?)")
            return True
        try:
            dtype = getattr(torch, d.dtype)
            assert isinstance(dtype, torch.dtype)
        except (AttributeError, AssertionError):
            self._drop(d)
            self._done(d, False, f"unknown embedding dtype {d.dtype!r}")
            return True
        emb = h.emb.to(dtype).contiguous()
        raw = emb.view(-1).view(torch.uint8)  # [rows * H * elem]
        n = raw.numel()
        if not self.moves_data:
            self._drop(d)
            self._done(d, True, data=raw.numpy().tobytes(), nbytes=n)
            return True
        start = self.staging_alloc.alloc(n)
        if start is None:
            return False
        self.staging[start:start + n].copy_(raw)
        try:
            self.transfer.add_peer(d.receiver)
            handle = self.transfer.write(d.receiver.agent_name, [WriteRun(0, start, d.dst_offset, n)])
        except Exception as e:  # noqa: BLE001 - the backend refused: report it
            logger.exception("embedding write failed to start")
            self.staging_alloc.free(start, n)
            self._drop(d)
            self._done(d, False, f"embedding transfer failed to start: {type(e).__name__}: {e}")
            return True
        self._drop(d)
        self.writes.append(_Write(d, handle, start, n, time.perf_counter()))
        return True

    def _poll_writes(self) -> None:
        for w in list(self.writes):
            state = self.transfer.poll(w.handle)
            if state is TransferState.TRANSFERRING:
                continue
            self.transfer.release(w.handle)
            self.writes.remove(w)
            self.staging_alloc.free(w.start, w.nbytes)
            ok = state is TransferState.SUCCESS
            self._done(w.dest, ok, None if ok else "embedding transfer to the language server failed",
                       nbytes=w.nbytes, transfer_s=time.perf_counter() - w.t0)

    def _retry_waiting(self) -> None:
        now = time.monotonic()
        for d, t in list(self.waiting):
            if self._serve(d, t):
                self.waiting.remove((d, t))
            elif now - t > ENVS.epd_embedding_timeout_s:
                self.waiting.remove((d, t))
                self._drop(d)
                self._done(d, False, "no staging space on the encoder (PDSERVE_EPD_BUFFER_TOKENS)")

    def _expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            for k in [k for k, h in self.held.items() if now >= h.until]:
                logger.warning("room %d image %d: no language server asked for it within %.0f s; dropped", *k,
                               ENVS.epd_embedding_ttl_s)
                del self.held[k]

    def _drop(self, d: EmbedDestination) -> None:
        with self.lock:
            self.held.pop((d.room, d.index), None)

    def _done(self, d: EmbedDestination, ok: bool, error: str | None = None, data: bytes | None = None,
              nbytes: int = 0, transfer_s: float = 0.0) -> None:
        self.counters["embeddings_sent" if ok else "embeddings_failed"] += 1
        self.records.append({"room": d.room, "index": d.index, "ok": ok, "nbytes": nbytes, "transfer_s": transfer_s,
                             "error": error})
        if ok:
            self.counters["bytes_sent"] += nbytes
        else:
            logger.warning("room %d image %d: %s", d.room, d.index, error)
        self.ctrl.send(d.reply_to, EmbedDone(d.room, d.index, ok, error, data, nbytes, transfer_s))

    def stats(self) -> dict[str, int]:
        with self.lock:
            held = len(self.held)
        return {"epd_held_embeddings": held, "epd_inflight_writes": len(self.writes),
                "epd_staging_bytes_in_use": self.staging_alloc.used, **self.counters}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.ctrl.close()
        self.transfer.close()


# ---- HTTP ------------------------------------------------------------------------------------------------
def _parse_encode(body: object) -> tuple[int, list[tuple[int, str]]]:
    from pdserve.server.errors import BadRequestError

    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object")
    room = body.get("room")
    if not isinstance(room, int) or isinstance(room, bool) or not 0 <= room < (1 << 63):
        raise BadRequestError("room must be an integer in [0, 2^63-1]", param="room")
    raw = body.get("images")
    if not isinstance(raw, list) or not raw:
        raise BadRequestError("images must be a non-empty list of {index, url}", param="images")
    images = []
    for k, item in enumerate(raw):
        if isinstance(item, str):
            item = {"index": k, "url": item}
        idx, url = (item.get("index"), item.get("url")) if isinstance(item, dict) else (None, None)
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0 or not isinstance(url, str) or not url:
            raise BadRequestError(f"images[{k}] must be {{\"index\": int >= 0, \"url\": string}}", param="images")
        images.append((idx, url))
    if len({i for i, _ in images}) != len(images):
        raise BadRequestError("image indices must be distinct", param="images")
    return room, images


def create_encode_app(config: ServerConfig, core: EncoderCore) -> FastAPI:
    import httpx

    from pdserve.server.auth import APIKeyMiddleware
    from pdserve.server.errors import APIError, BadRequestError, install_error_handlers
    from pdserve.server.streaming import json_response, read_json

    app = FastAPI(title="pdserve-encode", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    http = httpx.AsyncClient(timeout=ENVS.epd_image_fetch_timeout_s, follow_redirects=True)
    loop_exec = core.executor

    async def one(room: int, index: int, url: str) -> dict:
        import hashlib

        try:
            data = await fetch_bytes(url, http)
            emb, dt = await asyncio.get_running_loop().run_in_executor(loop_exec, core.encode_bytes, data)
        except ImageError as e:
            raise BadRequestError(f"image {index}: {e}", param="images") from None
        except Exception as e:  # noqa: BLE001 - an encoder failure, not the client's
            logger.exception("encoding image %d of room %d failed", index, room)
            raise APIError(f"encoder failed on image {index}: {type(e).__name__}: {e}", status=500) from None
        digest = hashlib.sha256(data).hexdigest()
        core.hold(room, index, emb, digest)
        return {"index": index, "rows": int(emb.shape[0]), "digest": digest, "encode_s": dt,
                "nbytes": emb.numel() * emb.element_size()}

    @app.post("/encode")
    async def encode(request: Request) -> Response:
        room, images = _parse_encode(await read_json(request))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(room, i, u) for i, u in images), return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            core.release(room)  # all or nothing
            raise failure
        return json_response({"room": room, "encoder": core.ctrl.addr, "hidden": core.hidden,
                              "dtype": str(core.dtype).removeprefix("torch."), "images": results,
                              "total_s": time.perf_counter() - t0})

    @app.post("/encode/release")
    async def release(request: Request) -> Response:
        body = await read_json(request)
        room = body.get("room") if isinstance(body, dict) else None
        if not isinstance(room, int):
            raise BadRequestError("room must be an integer", param="room")
        return json_response({"released": core.release(room)})

    @app.get("/encode/transfers")
    async def transfers(room: int | None = None) -> Response:
        """Recent embedding sends (all, or one room's): bytes and write time per image (benchmarks)."""
        recs = [r for r in list(core.records) if room is None or r["room"] == room]
        return json_response(recs)

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info() -> Response:
        eng = config.engine
        return json_response({
            "model_path": core.resolved.source_path, "disaggregation_mode": "encode", "host": config.host,
            "port": config.port, "epd_control_addr": core.ctrl.addr, "tokens_per_image": core.spec.tokens_per_image,
            "hidden_size": core.hidden, "dtype": str(core.dtype).removeprefix("torch."),
            "disaggregation_transfer_backend": eng.transfer_backend, "num_threads": eng.num_threads,
            "is_generation": False, "version": __version__,
        })

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info() -> Response:
        return json_response({"model_path": core.resolved.source_path, "model_type": core.resolved.model_type,
                              "architectures": [core.resolved.architecture], "is_generation": False})

    @app.get("/get_load")
    async def get_load() -> Response:
        s = core.stats()
        return json_response([{"dp_rank": 0, "num_reqs": s["epd_held_embeddings"] + s["epd_inflight_writes"],
                               "num_waiting_reqs": 0, "num_tokens": 0, "max_total_tokens": 0, **s}])

    @app.post("/flush_cache")
    @app.get("/flush_cache")
    async def flush() -> Response:
        return json_response({"success": True, "message": "Cache flushed."})

    app.state.http = http
    return app


async def serve_encoder(config: ServerConfig) -> int:
    """Run an encode server until SIGINT/SIGTERM. Returns the exit code."""
    import uvicorn

    from pdserve.server.runner import _UvicornServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        core = await loop.run_in_executor(None, EncoderCore, config)
    except Exception as e:  # noqa: BLE001
        logger.error("encode server failed to start: %s: %s", type(e).__name__, e)
        return 1
    app = create_encode_app(config, core)
    server = _UvicornServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                           timeout_keep_alive=30, lifespan="off"))

    async def watch() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.ensure_future(watch())
    logger.info("encode server on http://%s:%d", config.host, config.port)
    try:
        await server.serve()
    finally:
        watcher.cancel()
        with contextlib.suppress(Exception):
            await app.state.http.aclose()
        core.close()
    return 0 if server.started else 1
