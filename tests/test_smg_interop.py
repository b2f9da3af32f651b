"""Interoperability with SGLang's own router (`smg`, PyPI) in PD mode in front of pdserve's prefill and decode
servers: chat, completions and /generate, streamed and not, give the unified server's greedy output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from tests.conftest import ServerProcess, free_port, stop_server
from tests.pd_helpers import response_text, start_decode, start_prefill, stop_all

SMG = shutil.which("smg") or os.path.join(os.path.dirname(sys.executable), "smg")
CHAT = {"model": "default", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 12,
        "temperature": 0}
COMPLETION = {"model": "default", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
GENERATE = {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
CASES = [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION), ("/generate", GENERATE)]


@pytest.fixture(scope="module")
def smg_router():
    if not os.path.exists(SMG):
        pytest.fail("smg is not installed (make setup installs it from requirements.txt)")
    prefill = start_prefill("nixl")
    decode = start_decode("nixl")
    port = free_port()
    fd, log_path = tempfile.mkstemp(prefix="smg-", suffix=".log")
    cmd = [SMG, "launch", "--pd-disaggregation", "--prefill", prefill.server.base_url, str(prefill.bootstrap_port),
           "--decode", decode.base_url, "--host", "127.0.0.1", "--port", str(port), "--disable-tokenizer-autoload",
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    r = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + 60
    ok = False
    while time.monotonic() < deadline and proc.poll() is None and not ok:
        try:  # ready once a real request goes through both workers
            ok = httpx.post(r.base_url + "/generate", json=GENERATE, timeout=30).status_code == 200
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    try:
        assert ok, f"smg did not serve:\n{r.log()[-5000:]}"
        yield r
    finally:
        stop_server(r)
        stop_all(prefill, decode)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body", CASES)
def test_smg_pd_matches_unified(smg_router, server, path, body, stream):
    body = {**body, "stream": stream}
    if "model" in body:  # smg routes OpenAI requests by the workers' served model name
        body["model"] = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
    ref = httpx.post(server.base_url + path, json=body, timeout=120)
    got = httpx.post(smg_router.base_url + path, json=body, timeout=120)
    assert ref.status_code == 200 and got.status_code == 200, got.text
    assert response_text(path, got, stream) == response_text(path, ref, stream) != ""
