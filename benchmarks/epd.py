"""EPD benchmark: per-image encoder time, embedding bytes and transfer time, and TTFT of image requests in a
unified server vs encode + text vs encode + prefill + decode (the balancer is pdserve.epd.dispatch).

    .venv/bin/python benchmarks/epd.py [--model-path demo-vlm] [--backend nixl|mooncake|fake] [-n 10]
        [--images 1 2] [--threads 1]

Starts every server itself on 127.0.0.1 (free ports), serves the test images from a local HTTP server,
sends requests one at a time (greedy, streamed; TTFT = until the first token's chunk) and prints a table of
medians. Image requests carry a fresh random image each time (no cache effects anywhere).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.server
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import aiohttp
import numpy as np
import orjson

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pdserve.epd.dispatch import Target, dispatch  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, name: str, args: list[str], env: dict | None = None) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"epd-bench-{name}-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "pdserve.launch_server", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                  env={**os.environ, **(env or {})})

    def stop(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
            self.p.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def tail(self) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()[-3000:]


async def wait_ready(session: aiohttp.ClientSession, procs: list[Proc], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        while True:
            if p.p.poll() is not None:
                raise RuntimeError(f"{p.name} exited:\n{p.tail()}")
            try:
                async with session.get(p.url + "/health_generate", timeout=aiohttp.ClientTimeout(total=60)) as r:
                    if r.status == 200:
                        break
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{p.name} not ready:\n{p.tail()}")
            await asyncio.sleep(0.5)


def serve_images(n: int, seed: int = 0) -> tuple[str, list[str], threading.Thread]:
    from PIL import Image

    d = tempfile.mkdtemp(prefix="epd-bench-images-")
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        w, h = int(rng.integers(160, 640)), int(rng.integers(160, 640))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        name = f"img{i}.jpg"
        with open(os.path.join(d, name), "wb") as f:
            f.write(buf.getvalue())
        names.append(name)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=d))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    return base, [f"{base}/{n}" for n in names], t


def body_for(urls: list[str], max_new: int) -> dict:
    return {"text": "Describe the images." if urls else "Describe a sunny day.", "image_data": urls or None,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0}, "stream": True}


async def ttft_stream(chunks, t0: float) -> float:
    """Seconds from t0 to the first SSE chunk that carries a token (reads the stream to its end)."""
    first = None
    async for c in chunks:
        if first is None and b'"output_ids":[' in c and b'"output_ids":[]' not in c:
            first = time.perf_counter() - t0
    return first if first is not None else float("nan")


async def run_unified(s: aiohttp.ClientSession, url: str, images: list[str]) -> float:
    t0 = time.perf_counter()
    async with s.post(url + "/generate", data=orjson.dumps(body_for(images, 8))) as r:
        assert r.status == 200, await r.text()
        return await ttft_stream(r.content.iter_any(), t0)


async def run_epd(s: aiohttp.ClientSession, encoders: list[str], target: Target, images: list[str]) -> dict:
    """TTFT from before the balancer's dispatch (encoding included) to the first token."""
    t0 = time.perf_counter()
    res = await dispatch(s, "/generate", body_for(images, 8), encoders, target)
    assert res.status == 200, res.body
    out = {"ttft": await ttft_stream(res.stream, t0), "encode_wall": res.timings.get("encode_s", 0.0)}
    if res.encode:
        out["images"], out["room"] = res.encode["images"], res.encode["room"]
    return out


async def main_async(args: argparse.Namespace) -> None:
    model = ["--model-path", args.model_path, "--num-threads", str(args.threads), "--max-total-tokens", "8192",
             "--disaggregation-transfer-backend", args.backend, "--log-level", "warning"]
    bport = free_port()
    procs = {
        "unified": Proc("unified", model),
        "encode": Proc("encode", model + ["--encoder-only"]),
        "text": Proc("text", model + ["--disaggregation-mode", "text"]),
    }
    if not args.skip_pd:
        procs["prefill"] = Proc("prefill", model + ["--disaggregation-mode", "prefill", "--encoder-disaggregated",
                                                    "--disaggregation-bootstrap-port", str(bport)])
        procs["decode"] = Proc("decode", model + ["--disaggregation-mode", "decode"])
    n_img = sum(args.images) * (args.n + 1) * 3  # every request gets images never seen before
    _, urls, _ = serve_images(n_img)
    pool = iter(urls)
    rows: list[tuple] = []
    per_image: list[dict] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            await wait_ready(s, list(procs.values()))
            enc = [procs["encode"].url]
            targets = {"encode+text": Target(text=procs["text"].url)}
            if "prefill" in procs:
                targets["encode+prefill+decode"] = Target(prefill=procs["prefill"].url, bootstrap_port=bport,
                                                          decode=procs["decode"].url)
            for k in [0, *args.images]:  # 0: a text-only request, for reference
                take = lambda: [next(pool) for _ in range(k)]  # noqa: E731 - fresh images every request
                await run_unified(s, procs["unified"].url, take())  # warm-up
                ttfts = [await run_unified(s, procs["unified"].url, take()) for _ in range(args.n)]
                rows.append((k, "unified", statistics.median(ttfts), None))
                for name, t in targets.items():
                    await run_epd(s, enc, t, take())
                    res = [await run_epd(s, enc, t, take()) for _ in range(args.n)]
                    rows.append((k, name, statistics.median(r["ttft"] for r in res),
                                 statistics.median(r["encode_wall"] for r in res) if k else None))
                    for r in res:
                        if "room" not in r:
                            continue
                        async with s.get(enc[0] + f"/encode/transfers?room={r['room']}") as q:
                            sent = {x["index"]: x for x in await q.json()}
                        for i, im in enumerate(r["images"]):
                            per_image.append({"encode_s": im["encode_s"], "nbytes": im["nbytes"],
                                              "transfer_s": sent.get(i, {}).get("transfer_s", float("nan"))})
    finally:
        for p in procs.values():
            p.stop()
    print(f"\nmodel {args.model_path}, backend {args.backend}, {args.threads} thread(s) per server, "
          f"{args.n} requests per row (medians), CPU only: {os.cpu_count()} cores\n")
    if per_image:
        enc_ms = statistics.median(x["encode_s"] for x in per_image) * 1e3
        tr_ms = statistics.median(x["transfer_s"] for x in per_image) * 1e3
        nbytes = statistics.median(x["nbytes"] for x in per_image)
        print("per image (encode server)")
        print(f"  {'decode+preprocess+vision+projector':<36}{enc_ms:9.2f} ms")
        print(f"  {'embedding bytes':<36}{nbytes / 1024:9.1f} KiB")
        print(f"  {'transfer (' + args.backend + ' write)':<36}{tr_ms:9.3f} ms  ({len(per_image)} images)\n")
    print(f"{'images':>6}  {'deployment':<24}{'TTFT ms':>10}{'encode step ms':>16}")
    for k, name, ttft, enc_wall in rows:
        print(f"{k:>6}  {name:<24}{ttft * 1e3:10.1f}{'' if enc_wall is None else f'{enc_wall * 1e3:16.1f}'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default="demo-vlm")
    ap.add_argument("--backend", default="nixl", choices=("nixl", "mooncake", "fake"))
    ap.add_argument("-n", type=int, default=10, help="requests per row")
    ap.add_argument("--images", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-pd", action="store_true", help="no encode+prefill+decode row")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
