"""EPD (encode / prefill / decode disaggregation) end to end: real servers on 127.0.0.1, the demo VLM, images
served by a local HTTP server, embeddings moved by NIXL.

Deployments (all --num-threads 1, started once for the module):
  unified        one server runs image processor, vision tower and language model
  encA, encB     encode servers (encB with a small PDSERVE_IMAGE_MAX_PIXELS, for the too-large test)
  text           --disaggregation-mode text, also --encoder-urls encA (encodes by itself without a balancer)
  prefill+decode prefill --language-only + decode (PD over NIXL)
The balancer is pdserve.epd.dispatch.dispatch, called the way mini_lb / the router will call it.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import functools
import http.server
import io
import os
import threading
import time

import aiohttp
import httpx
import numpy as np
import pytest

from pdserve.epd.dispatch import Target, assign_images, dispatch, extract_images
from tests.conftest import free_port, start_server, stop_server
from tests.pd_helpers import pickle_bomb, send_raw_frames

BACKEND = "nixl"
MAX_NEW = 12
COMMON = ["--num-threads", "1", "--max-total-tokens", "4096", "--model-path", "demo-vlm",
          "--disaggregation-transfer-backend", BACKEND]
FAST_TIMEOUT = {"PDSERVE_EPD_EMBEDDING_TIMEOUT": "8", "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "0.5"}


# ---- fixtures ---------------------------------------------------------------------------------------------
def _png(seed: int, w: int, h: int, solid: bool = False) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.full((h, w, 3), 200, np.uint8) if solid else rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A local HTTP server on 127.0.0.1 serving test images; yields {name: url} plus raw bytes."""
    d = tmp_path_factory.mktemp("epd-images")
    files = {"cat.png": _png(1, 200, 150), "dog.png": _png(2, 90, 120), "big.png": _png(3, 1200, 1000, solid=True),
             "text.png": b"this is not an image"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    handler = functools.partial(_QuietHandler, directory=str(d))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    urls = {name: f"{base}/{name}" for name in files}
    urls["missing"] = f"{base}/missing.png"
    urls["dead"] = f"http://127.0.0.1:{free_port()}/x.png"
    urls["dog_data_uri"] = "data:image/png;base64," + base64.b64encode(files["dog.png"]).decode()
    urls["cat_path"] = str(d / "cat.png")
    yield urls
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _start_all(specs: dict[str, tuple[list[str], dict]]) -> dict:
    """Start servers in parallel; all or nothing."""
    with cf.ThreadPoolExecutor(len(specs)) as ex:
        futs = {name: ex.submit(start_server, args, env=env) for name, (args, env) in specs.items()}
        out, errors = {}, []
        for name, f in futs.items():
            try:
                out[name] = f.result()
            except Exception as e:  # noqa: BLE001
                errors.append(f"{name}: {e}")
    if errors:
        for s in out.values():
            stop_server(s)
        raise RuntimeError("\n".join(errors))
    return out


@pytest.fixture(scope="module")
def epd(request):
    from pdserve.epd.demo_vlm import build_demo_vlm

    build_demo_vlm()  # once, before the servers race for it
    bp = free_port()
    first = _start_all({
        "unified": (COMMON, {}),
        "encA": (COMMON + ["--encoder-only"], {}),
        "encB": (COMMON + ["--disaggregation-mode", "encode"], {"PDSERVE_IMAGE_MAX_PIXELS": "1000000"}),
        "prefill": (COMMON + ["--disaggregation-mode", "prefill", "--language-only",
                              "--disaggregation-bootstrap-port", str(bp)], FAST_TIMEOUT),
        "decode": (COMMON + ["--disaggregation-mode", "decode"], FAST_TIMEOUT),
    })
    try:
        # text needs encA's URL for --encoder-urls (SGLang's later spelling of the language-only side)
        first.update(_start_all({"text": (COMMON + ["--disaggregation-mode", "text", "--encoder-urls",
                                                    first["encA"].base_url], FAST_TIMEOUT)}))
    except Exception:
        for s in first.values():
            stop_server(s)
        raise
    servers = first
    failed_before = request.session.testsfailed
    yield servers, bp
    for name, s in servers.items():
        stop_server(s)
        if request.session.testsfailed > failed_before:
            print(f"\n----- {name} log -----\n{s.log()[-6000:]}")


def _pd_target(servers, bp) -> Target:
    return Target(prefill=servers["prefill"].base_url, bootstrap_port=bp, decode=servers["decode"].base_url)


def run_dispatch(path: str, body: dict, encoders: list, target: Target):
    async def go():
        async with aiohttp.ClientSession() as s:
            res = await dispatch(s, path, body, [e.base_url for e in encoders], target)
            if res.stream is not None:
                chunks = [c async for c in res.stream]
                res.body = b"".join(chunks)
            return res

    return asyncio.run(go())


def gen_body(images: list[str] | str | None, text: str = "Describe the image.", **kw) -> dict:
    b = {"text": text, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}, **kw}
    if images is not None:
        b["image_data"] = images
    return b


def chat_body(urls: list[str]) -> dict:
    content = [{"type": "text", "text": "Compare"}]
    for i, u in enumerate(urls):
        content += [{"type": "image_url", "image_url": {"url": u}}, {"type": "text", "text": f" (picture {i})"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": MAX_NEW, "temperature": 0}


def load(server) -> dict:
    return httpx.get(server.base_url + "/get_load", timeout=30).json()[0]


def assert_no_leaks(servers: dict, timeout: float = 30.0) -> None:
    """No request, KV slot (after a cache flush), embedding row or held embedding left anywhere."""
    deadline = time.monotonic() + timeout
    for name, s in servers.items():
        while True:
            httpx.post(s.base_url + "/flush_cache", timeout=30)
            ld = load(s)
            busy = ld["num_reqs"] or ld["num_tokens"] or ld.get("epd_buffer_tokens_in_use", 0) or \
                ld.get("epd_waiting_reqs", 0) or ld.get("epd_held_embeddings", 0) or \
                ld.get("epd_inflight_writes", 0) or ld.get("epd_staging_bytes_in_use", 0)
            if not busy:
                break
            assert time.monotonic() < deadline, f"{name} still holds resources: {ld}"
            time.sleep(0.3)


def ids_of(r: httpx.Response | object) -> list[int]:
    import orjson

    if isinstance(r, httpx.Response):
        assert r.status_code == 200, r.text
        return r.json()["output_ids"]
    assert r.status == 200, r.body
    return orjson.loads(r.body)["output_ids"]


def chat_text(r) -> str:
    import orjson

    if isinstance(r, httpx.Response):
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    assert r.status == 200, r.body
    return orjson.loads(r.body)["choices"][0]["message"]["content"]


def error_of(r) -> tuple[int, str]:
    import orjson

    if isinstance(r, httpx.Response):
        return r.status_code, r.json()["error"]["message"]
    body = orjson.loads(r.body)
    return r.status, body["error"]["message"]


# ---- unit checks (no servers) ------------------------------------------------------------------------------
def test_placeholder_expansion_and_helpers():
    from pdserve.epd.buffers import RangeAllocator
    from pdserve.epd.mm import expand_placeholders

    ids, spans = expand_placeholders([5, 9, 6, 9], 9, [3, 2], ["a", "b"])
    assert ids == [5, 9, 9, 9, 6, 9, 9]
    assert [(s.offset, s.length, s.digest) for s in spans] == [(1, 3, "a"), (5, 2, "b")]
    with pytest.raises(ValueError, match="2 image placeholder tokens for 1 images"):
        expand_placeholders([9, 9], 9, [4])
    a = RangeAllocator(10)
    x, y = a.alloc(4), a.alloc(4)
    assert (x, y, a.alloc(4), a.used) == (0, 4, None, 8)
    a.free(x, 4)
    a.free(y, 4)
    assert a.free_ranges == [(0, 10)] and a.used == 0
    assert assign_images(2, 2) == [0, 1] and assign_images(5, 2, start=1) == [1, 1, 1, 0, 0]
    assert assign_images(1, 3, start=2) == [2]
    chat = chat_body(["u1", "u2"])
    assert extract_images("/v1/chat/completions", chat) == ["u1", "u2"]
    assert extract_images("/generate", {"text": "x", "image_data": "u"}) == ["u"]
    assert extract_images("/generate", {"text": "x"}) == []


def test_preprocessing_matches_transformers_pil_processor():
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from pdserve.epd.demo_vlm import build_demo_vlm
    from pdserve.epd.images import preprocess
    from pdserve.epd.vlm import VLMSpec

    path = build_demo_vlm()
    spec = VLMSpec.from_dir(path)
    hf = CLIPImageProcessorPil.from_pretrained(path)
    for seed, (w, h) in enumerate([(200, 150), (90, 120), (112, 112), (640, 33)]):
        img = Image.open(io.BytesIO(_png(seed, w, h))).convert("RGB")
        ours = preprocess(img, spec.processor)
        ref = hf(img, return_tensors="np")["pixel_values"][0]
        assert ours.shape == ref.shape == (3, 112, 112)
        assert np.abs(ours - ref).max() < 1e-5


# ---- deployments --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(epd, images):
    """Outputs of the unified server: the ground truth every EPD deployment must reproduce."""
    servers, _ = epd
    u = servers["unified"].base_url
    ref = {
        "one": ids_of(httpx.post(u + "/generate", json=gen_body(images["cat.png"]), timeout=120)),
        "two": ids_of(httpx.post(u + "/generate", json=gen_body([images["cat.png"], images["dog.png"]],
                                                                 text="<image> and <image>: which is brighter?"),
                                 timeout=120)),
        "chat": chat_text(httpx.post(u + "/v1/chat/completions",
                                     json=chat_body([images["dog_data_uri"], images["cat.png"]]), timeout=120)),
        "text": ids_of(httpx.post(u + "/generate", json=gen_body(None, text="The capital of France is"),
                                  timeout=120)),
    }
    return ref


def test_unified_matches_transformers_llava(epd, images, reference):
    """Our engine (vision tower + embedding override + KV pool) reproduces transformers' LLaVA greedy output."""
    import torch
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from pdserve.epd.demo_vlm import build_demo_vlm
    from pdserve.epd.images import preprocess
    from pdserve.epd.mm import expand_placeholders
    from pdserve.epd.vlm import VLMSpec
    from pdserve.model.loader import load_tokenizer

    torch.set_num_threads(1)
    path = build_demo_vlm()
    spec, tok = VLMSpec.from_dir(path), load_tokenizer(path)
    px = preprocess(Image.open(io.BytesIO(_png(1, 200, 150))).convert("RGB"), spec.processor)
    ids = [spec.image_token_id] + tok.encode("Describe the image.")
    ids, _ = expand_placeholders(ids, spec.image_token_id, [spec.tokens_per_image])
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(px)[None],
                             max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out[0, len(ids):].tolist()[:len(reference["one"])] == reference["one"]
    # the image matters: another image, another answer
    # the image matters, and the prefix cache never serves one image's KV for another with the same placeholders
    other = httpx.post(epd[0]["unified"].base_url + "/generate", json=gen_body(images["dog.png"]), timeout=120)
    assert ids_of(other) != reference["one"] and other.json()["meta_info"]["cached_tokens"] == 0


def test_chunked_prefill_splits_images_exactly():
    """An image's rows may straddle prefill chunks: the output does not change (in-process engines)."""
    import torch
    from PIL import Image

    from pdserve.config import EngineConfig, ModelConfig
    from pdserve.engine.engine import Engine
    from pdserve.engine.messages import GenerateRequest
    from pdserve.epd.demo_vlm import build_demo_vlm
    from pdserve.epd.images import preprocess
    from pdserve.epd.mm import MultimodalInput, expand_placeholders
    from pdserve.sampling_params import SamplingParams

    path = build_demo_vlm()
    outs = []
    for chunk in (-1, 24):
        eng = Engine(EngineConfig(model=ModelConfig(model_path=path), num_threads=1, max_total_tokens=1024,
                                  chunked_prefill_size=chunk))
        spec = eng.vlm
        px = [preprocess(Image.open(io.BytesIO(_png(s, 100, 80))).convert("RGB"), spec.processor) for s in (1, 2)]
        ids = eng.tokenizer.encode("<image> left, <image> right. Which one?")
        ids, spans = expand_placeholders(ids, spec.image_token_id, [spec.tokens_per_image] * 2)
        eng.add_request(GenerateRequest("r", tuple(ids), SamplingParams(max_new_tokens=6, temperature=0),
                                        mm=MultimodalInput(spans, pixel_values=tuple(px))))
        got = []
        while eng.has_work:
            for o in eng.step():
                got += o.new_token_ids
        outs.append(got)
        del eng
        torch.set_num_threads(1)
    assert len(outs[0]) == 6 and outs[0] == outs[1]


def assert_matches_reference(enc, t: Target, images, reference) -> None:
    """One image, two images, and a chat with two images through encoders `enc` and target `t` == unified."""
    assert ids_of(run_dispatch("/generate", gen_body(images["cat.png"]), enc, t)) == reference["one"]
    two = gen_body([images["cat.png"], images["dog.png"]], text="<image> and <image>: which is brighter?")
    assert ids_of(run_dispatch("/generate", two, enc, t)) == reference["two"]
    chat = chat_body([images["dog_data_uri"], images["cat.png"]])
    assert chat_text(run_dispatch("/v1/chat/completions", chat, enc, t)) == reference["chat"]


def test_encode_text_matches_unified(epd, images, reference):
    servers, _ = epd
    t = Target(text=servers["text"].base_url)
    enc = [servers["encA"]]
    assert_matches_reference(enc, t, images, reference)
    # --encoder-urls: the text server sends the images to its encoder itself (no balancer)
    direct = httpx.post(servers["text"].base_url + "/generate", json=gen_body(images["cat.png"]), timeout=120)
    assert ids_of(direct) == reference["one"]
    assert_no_leaks({k: servers[k] for k in ("text", "encA")})


def test_encode_prefill_decode_matches_unified(epd, images, reference):
    servers, bp = epd
    t = _pd_target(servers, bp)
    enc = [servers["encA"]]
    assert_matches_reference(enc, t, images, reference)
    streamed = run_dispatch("/generate", {**gen_body(images["cat.png"]), "stream": True}, enc, t)
    assert streamed.status == 200 and b"[DONE]" in streamed.body
    import orjson

    last = [ln for ln in streamed.body.split(b"\n\n") if ln.startswith(b"data: {")][-1]
    assert orjson.loads(last[6:])["output_ids"] == reference["one"]
    assert_no_leaks({k: servers[k] for k in ("prefill", "decode", "encA")})


def test_two_images_on_two_encoders_equal_one_encoder(epd, images, reference):
    servers, bp = epd
    two = gen_body([images["cat.png"], images["dog.png"]], text="<image> and <image>: which is brighter?")
    for target in (Target(text=servers["text"].base_url), _pd_target(servers, bp)):
        before = {k: load(servers[k])["images_encoded"] for k in ("encA", "encB")}
        res = run_dispatch("/generate", two, [servers["encA"], servers["encB"]], target)
        assert ids_of(res) == reference["two"]
        assert len({im["encoder"] for im in res.encode["images"]}) == 2  # one image per encoder
        after = {k: load(servers[k])["images_encoded"] for k in ("encA", "encB")}
        assert after["encA"] == before["encA"] + 1 and after["encB"] == before["encB"] + 1
    assert_no_leaks({k: servers[k] for k in ("text", "prefill", "decode", "encA", "encB")})


def test_text_only_requests_unchanged(epd, reference):
    servers, bp = epd
    body = gen_body(None, text="The capital of France is")
    for target in (Target(text=servers["text"].base_url), _pd_target(servers, bp)):
        assert ids_of(run_dispatch("/generate", body, [servers["encA"]], target)) == reference["text"]
    assert load(servers["encA"])["epd_held_embeddings"] == 0


def test_control_ports_run_no_pickle(epd, images, reference, tmp_path):
    """An encoder's control address is public (/server_info): a pickle sent there runs nothing, and the
    encoder still serves."""
    servers, _ = epd
    enc = servers["encA"]
    addr = httpx.get(enc.base_url + "/server_info", timeout=30).json()["epd_control_addr"]
    marker = str(tmp_path / "pwned")
    send_raw_frames(addr, [[pickle_bomb(marker)], [pickle_bomb(marker), b""]])
    deadline = time.monotonic() + 30
    while enc.log().count("control frame dropped") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert enc.log().count("control frame dropped") >= 2 and not os.path.exists(marker)
    test_encode_text_matches_unified(epd, images, reference)


def test_bad_images_fail_cleanly(epd, images):
    servers, bp = epd
    targets = (Target(text=servers["text"].base_url), _pd_target(servers, bp))
    cases = [
        (images["text.png"], [servers["encA"]], 400, "not an image"),
        (images["missing"], [servers["encA"]], 400, "HTTP 404"),
        (images["dead"], [servers["encA"]], 400, "cannot fetch image"),
        (images["big.png"], [servers["encB"]], 400, "too large: 1200x1000"),
        ("data:image/png;base64,@@@", [servers["encA"]], 400, "invalid base64"),
    ]
    for target in targets:
        for src, enc, status, needle in cases:
            res = run_dispatch("/generate", gen_body(src), enc, target)
            code, msg = error_of(res)
            assert code == status and needle in msg and "encode server" in msg, (src, code, msg)
        # the second image is bad: the first one's embedding is dropped too
        res = run_dispatch("/generate", gen_body([images["cat.png"], images["text.png"]]),
                           [servers["encA"], servers["encB"]], target)
        code, msg = error_of(res)
        assert code == 400 and "image 1" in msg
    # the unified server checks images itself
    r = httpx.post(servers["unified"].base_url + "/generate", json=gen_body(images["text.png"]), timeout=60)
    assert error_of(r)[0] == 400 and "not an image" in error_of(r)[1]
    assert_no_leaks(servers)


def test_encoder_failures_fail_cleanly(epd, images):
    servers, bp = epd
    targets = (Target(text=servers["text"].base_url), _pd_target(servers, bp))
    dead = type("S", (), {"base_url": f"http://127.0.0.1:{free_port()}"})()
    for target in targets:
        # unreachable encode server: 502 naming it
        code, msg = error_of(run_dispatch("/generate", gen_body(images["cat.png"]), [dead], target))
        assert code == 502 and dead.base_url in msg and "unreachable" in msg
        # the encoder no longer holds the embedding (expired / restarted): its error reaches the client
        enc_addr = httpx.get(servers["encA"].base_url + "/server_info").json()["epd_control_addr"]
        body = {**gen_body(images["cat.png"]), "epd": {"room": 12345, "images": [{"encoder": enc_addr, "rows": 64}]}}
        if target.text:
            r = httpx.post(target.text + "/generate", json=body, timeout=60)
        else:
            r = _pd_direct(servers, bp, body)
        code, msg = error_of(r)
        assert code == 500 and enc_addr in msg and "no embedding for room 12345" in msg, msg
        # an encoder that never answers: the language server gives up after PDSERVE_EPD_EMBEDDING_TIMEOUT
        gone = f"tcp://127.0.0.1:{free_port()}"
        body = {**gen_body(images["cat.png"]), "epd": {"room": 777, "images": [{"encoder": gone, "rows": 64}]}}
        t0 = time.monotonic()
        r = httpx.post(target.text + "/generate", json=body, timeout=60) if target.text else \
            _pd_direct(servers, bp, body)
        code, msg = error_of(r)
        assert code == 500 and gone in msg and "did not arrive within 8 s" in msg, msg
        assert time.monotonic() - t0 < 30
    # a language-only server without encoders refuses images it cannot get embeddings for
    r = httpx.post(servers["prefill"].base_url + "/generate", json=gen_body(images["cat.png"]), timeout=60)
    code, msg = error_of(r)
    assert code == 400 and "encode servers" in msg
    assert_no_leaks(servers, timeout=40)  # rows of the silent encoder stay quarantined for the timeout


def test_fake_backend_moves_embeddings_inline_and_backend_mismatch_is_reported(epd, images, reference):
    """fake: the rows travel inside EmbedDone (same output). A fake encoder with a nixl text server is a
    misconfiguration the encoder reports; the request fails with that cause and nothing leaks."""
    servers, _ = epd
    fake = ["--num-threads", "1", "--max-total-tokens", "4096", "--model-path", "demo-vlm",
            "--disaggregation-transfer-backend", "fake"]
    extra = _start_all({"enc_fake": (fake + ["--encoder-only"], {}),
                        "text_fake": (fake + ["--disaggregation-mode", "text"], FAST_TIMEOUT)})
    try:
        res = run_dispatch("/generate", gen_body(images["cat.png"]), [extra["enc_fake"]],
                           Target(text=extra["text_fake"].base_url))
        assert ids_of(res) == reference["one"]
        res = run_dispatch("/generate", gen_body(images["cat.png"]), [extra["enc_fake"]],
                           Target(text=servers["text"].base_url))
        code, msg = error_of(res)
        assert code == 500 and "transfer backend 'nixl'" in msg and "this encoder 'fake'" in msg, msg
        assert_no_leaks({**extra, "text": servers["text"]})
    finally:
        for s in extra.values():
            stop_server(s)


def _pd_direct(servers, bp, body) -> httpx.Response:
    """A PD pair without the dispatch function (for hand-made epd fields): the prefill's answer."""
    import random

    b = {**body, "bootstrap_host": "127.0.0.1", "bootstrap_port": bp, "bootstrap_room": random.getrandbits(63)}
    with cf.ThreadPoolExecutor(2) as ex:
        fp = ex.submit(httpx.post, servers["prefill"].base_url + "/generate", json=b, timeout=120)
        fd = ex.submit(httpx.post, servers["decode"].base_url + "/generate", json=b, timeout=120)
        rp, rd = fp.result(), fd.result()
    assert rd.status_code != 200  # the decode fails with the prefill
    return rp


def test_demo_vlm_is_cached_and_documented():
    from pdserve.epd.demo_vlm import build_demo_vlm, demo_vlm_dir

    t0 = time.monotonic()
    path = build_demo_vlm()
    assert path == demo_vlm_dir() and time.monotonic() - t0 < 5
    with open(os.path.join(path, "README.md")) as f:
        assert "UNTRAINED" in f.read()


def test_mini_lb_epd_setups(epd, images, reference):
    """`python -m pdserve.mini_lb --encode ... --text ...` and `--encode ... --prefill ... --decode ...`."""
    from tests.test_router import router

    servers, bp = epd
    setups = [["--encode", servers["encA"].base_url, servers["encB"].base_url, "--text", servers["text"].base_url],
              ["--encode", servers["encA"].base_url, "--prefill", servers["prefill"].base_url,
               "--prefill-bootstrap-ports", str(bp), "--decode", servers["decode"].base_url]]
    for args in setups:
        with router(args, module="pdserve.mini_lb", ready=False) as lb:
            r = httpx.post(lb.base_url + "/generate", json=gen_body(images["cat.png"]), timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["output_ids"] == reference["one"]
            two = gen_body([images["cat.png"], images["dog.png"]], text="<image> and <image>: which is brighter?")
            assert httpx.post(lb.base_url + "/generate", json=two, timeout=120).json()["output_ids"] == reference["two"]
    assert_no_leaks({k: servers[k] for k in ("text", "prefill", "decode", "encA", "encB")})


def test_route_with_encode_servers(epd, images, reference):
    """`pdserve route --encode ...` in front of a text server, and in front of a PD pair."""
    from tests.test_router import router

    servers, bp = epd
    setups = [["--encode", servers["encA"].base_url, "--worker-urls", servers["text"].base_url],
              ["--encode", servers["encA"].base_url, servers["encB"].base_url, "--pd-disaggregation",
               "--prefill", servers["prefill"].base_url, str(bp), "--decode", servers["decode"].base_url]]
    for args in setups:
        with router(args + ["--policy", "round_robin"]) as r:
            resp = httpx.post(r.base_url + "/generate", json=gen_body(images["cat.png"]), timeout=120)
            assert resp.status_code == 200, resp.text
            assert resp.json()["output_ids"] == reference["one"]
            chat = chat_body([images["dog_data_uri"], images["cat.png"]])
            assert chat_text(httpx.post(r.base_url + "/v1/chat/completions", json=chat, timeout=120)) == reference["chat"]
            bad = httpx.post(r.base_url + "/generate", json=gen_body("data:image/png;base64,bm90IGFuIGltYWdl"),
                             timeout=60)
            assert bad.status_code == 400 and "image" in bad.json()["error"]["message"]
    assert_no_leaks({k: servers[k] for k in ("text", "prefill", "decode", "encA", "encB")})
