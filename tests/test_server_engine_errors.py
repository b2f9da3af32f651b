"""An engine failure fails only its request (500 / an SSE error event), never the server. In process, with a
stub engine client that fails prompts starting with "FAIL" (a real engine has no switch for that)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from pdserve.config import ServerConfig
from pdserve.engine.messages import EngineReady, FlushCacheResult, LoadReport, RequestOutput
from pdserve.model.loader import resolve_model
from pdserve.server.app import create_app
from pdserve.server.state import build_state


class StubEngineClient:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.resolved = resolve_model(None)
        self.ready = EngineReady(4096, 2048, self.resolved.source_path, "llama", ("LlamaForCausalLM",))
        self.eos_token_ids = (tokenizer.eos_token_id,)
        self.aborted: list[str] = []

    async def generate(self, req):
        prompt = self.tokenizer.decode(list(req.input_ids))
        out_ids = self.tokenizer.encode(" fine")
        if prompt.startswith("FAIL_BEFORE"):
            raise RuntimeError("engine process exited (code -9)")
        yield RequestOutput(req.rid, out_ids[:1], prompt_tokens=len(req.input_ids), completion_tokens=1)
        if "FAIL" in prompt:
            yield RequestOutput(req.rid, [], finish_reason="abort", error="engine error: RuntimeError: boom")
            return
        yield RequestOutput(req.rid, out_ids[1:], finish_reason="length", prompt_tokens=len(req.input_ids),
                            completion_tokens=len(out_ids))

    def abort(self, rid: str) -> None:
        self.aborted.append(rid)

    def is_alive(self) -> bool:
        return True

    async def get_load(self) -> LoadReport:
        return LoadReport(0, 0, 0, 4096, 0, 0)

    async def flush_cache(self) -> FlushCacheResult:
        return FlushCacheResult(True)


@pytest.fixture(scope="module")
def client(tokenizer):
    app = create_app(build_state(ServerConfig(), StubEngineClient(tokenizer)))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("prompt", ["FAIL please", "FAIL_BEFORE please"])
def test_engine_failure_is_a_500_and_the_next_request_works(client, prompt):
    r = client.post("/generate", json={"text": prompt})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == 500 and ("boom" in err["message"] or "exited" in err["message"])
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 500 and r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "all good", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " fine"


def test_engine_failure_mid_stream_ends_with_an_error_event(client):
    r = client.post("/generate", json={"text": "FAIL mid-stream", "stream": True})
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    assert "error" in events[-1] and "boom" in events[-1]["error"]["message"]
    assert sum("error" in e for e in events) == 1
    r = client.post("/v1/completions", json={"prompt": "FAIL", "stream": True, "max_tokens": 4})
    assert '"error"' in r.text and r.text.rstrip().endswith("data: [DONE]")
