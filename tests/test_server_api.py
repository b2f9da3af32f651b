"""The HTTP server end to end: a real server process, the official openai SDK, httpx for the native API."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.conftest import API_KEY, SERVED_MODEL_NAME, ServerProcess

MAX_TOKENS = 12
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


def sdk(server: ServerProcess, api_key: str | None = None, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=api_key or server.api_key or "none",
                         max_retries=0, timeout=120, **kw)


def native(server: ServerProcess, body: dict, path: str = "/generate") -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=server.headers, timeout=120)


def sse_events(response: httpx.Response) -> list:
    """The JSON payloads of an SSE body; asserts it ends with [DONE]."""
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", response.text[-500:]
    return [json.loads(line) for line in lines[:-1]]


def greedy_generate(server: ServerProcess, text: str, max_new_tokens: int = MAX_TOKENS, **sampling) -> dict:
    r = native(server, {"text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0,
                                                         **sampling}})
    assert r.status_code == 200, r.text
    return r.json()


def chat_prompt_len(tokenizer, messages: list[dict]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


# ---- OpenAI API ------------------------------------------------------------------------------------------
def test_chat_completion(server, tokenizer):
    r = sdk(server).chat.completions.create(model="any", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == chat_prompt_len(tokenizer, CHAT)
    assert 0 < r.usage.completion_tokens <= MAX_TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_completion_streamed_matches_plain(server, tokenizer):
    client = sdk(server)
    plain = client.chat.completions.create(model="any", messages=CHAT, max_completion_tokens=MAX_TOKENS,
                                           temperature=0)
    chunks = list(client.chat.completions.create(model="any", messages=CHAT, max_completion_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == chat_prompt_len(tokenizer, CHAT)
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_streamed_multibyte_text_has_no_partial_characters(server):
    messages = [{"role": "user", "content": "Say hi in Chinese"}]
    kw = dict(model="any", messages=messages, max_tokens=20, temperature=0)
    plain = sdk(server).chat.completions.create(**kw).choices[0].message.content
    deltas = [c.choices[0].delta.content or "" for c in sdk(server).chat.completions.create(stream=True, **kw)
              if c.choices]
    assert "".join(deltas) == plain and not plain.isascii()
    assert all("\ufffd" not in d for d in deltas[:-1])


def test_completion_matches_native_generate(server, tokenizer):
    r = sdk(server).completions.create(model="any", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.object == "text_completion"
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == MAX_TOKENS and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == greedy_generate(server, PROMPT)["text"]


def test_completion_batch_prompts_echo_and_logprobs(server, tokenizer):
    prompts = [PROMPT, "1, 2, 3,"]
    r = sdk(server).completions.create(model="any", prompt=prompts, max_tokens=4, temperature=0, logprobs=2,
                                       echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    for p, c in zip(prompts, r.choices):
        assert c.text.startswith(p)
        n_prompt = len(tokenizer.encode(p))
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == n_prompt + 4
        assert c.logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in c.logprobs.token_logprobs[1:])
        assert all(len(t) == 2 for t in c.logprobs.top_logprobs[1:])
    assert r.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_exactly(server, stream):
    full = greedy_generate(server, PROMPT, max_new_tokens=16)["text"]
    start = len(full) // 2
    stop = full[start : start + 3]
    cut = full[: full.index(stop)]
    kw = dict(model="any", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    if stream:
        chunks = list(sdk(server).completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason][-1]
    else:
        r = sdk(server).completions.create(**kw)
        text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert (text, reason) == (cut, "stop")
    # Native: matched stop reported, no_stop_trim keeps the stop string itself.
    out = greedy_generate(server, PROMPT, max_new_tokens=16, stop=[stop], no_stop_trim=True)
    assert out["text"] == cut + stop
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_chat_n_choices(server):
    r = sdk(server).chat.completions.create(model="any", messages=CHAT, max_tokens=6, n=3, temperature=0.9, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 18  # summed over the choices
    # Greedy: all n choices equal the single greedy answer.
    g = sdk(server).chat.completions.create(model="any", messages=CHAT, max_tokens=6, n=2, temperature=0)
    one = sdk(server).chat.completions.create(model="any", messages=CHAT, max_tokens=6, temperature=0)
    assert [c.message.content for c in g.choices] == [one.choices[0].message.content] * 2
    assert g.usage.prompt_tokens == one.usage.prompt_tokens
    assert g.usage.completion_tokens == 2 * one.usage.completion_tokens


def test_chat_streamed_n_choices(server):
    chunks = list(sdk(server).chat.completions.create(model="any", messages=CHAT, max_tokens=6, n=2, temperature=0,
                                                      stream=True))
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts[0] == texts[1] and texts[0]


def test_models(server):
    models = sdk(server).models.list().data
    assert len(models) == 1 and models[0].id


# ---- native API ------------------------------------------------------------------------------------------
def test_generate_single(server, tokenizer):
    out = greedy_generate(server, PROMPT)
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(tokenizer.encode(PROMPT))
    assert meta["completion_tokens"] == len(out["output_ids"]) == MAX_TOKENS
    assert meta["finish_reason"] == {"type": "length", "length": MAX_TOKENS}
    assert out["text"] == tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    assert meta["id"] and meta["e2e_latency"] > 0 and "cached_tokens" in meta


def test_generate_input_ids_and_batch(server, tokenizer):
    single = greedy_generate(server, PROMPT)
    ids = tokenizer.encode(PROMPT)
    r = native(server, {"input_ids": [ids, tokenizer.encode("1, 2, 3,")], "rid": ["b-0", "b-1"],
                        "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0},
                        "bootstrap_room": [1, 2], "some_router_field": True})
    assert r.status_code == 200, r.text
    outs = r.json()
    assert isinstance(outs, list) and [o["meta_info"]["id"] for o in outs] == ["b-0", "b-1"]
    assert outs[0]["text"] == single["text"]
    r = native(server, {"text": [PROMPT, "Hi"], "sampling_params": [{"max_new_tokens": 2, "temperature": 0},
                                                                    {"max_new_tokens": 3, "temperature": 0}]})
    assert [o["meta_info"]["completion_tokens"] for o in r.json()] == [2, 3]


def test_generate_streamed_cumulative(server):
    single = greedy_generate(server, PROMPT)
    r = native(server, {"text": PROMPT, "stream": True,
                        "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0}})
    events = sse_events(r)
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts
    assert texts[-1] == single["text"] and events[-1]["output_ids"] == single["output_ids"]
    assert [e["meta_info"]["finish_reason"] for e in events][-1] == {"type": "length", "length": MAX_TOKENS}
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])


def test_generate_batch_streamed(server):
    r = native(server, {"text": [PROMPT, "Hi"], "stream": True,
                        "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    events = sse_events(r)
    assert {e["index"] for e in events} == {0, 1}
    assert sum(e["meta_info"]["finish_reason"] is not None for e in events) == 2


def test_generate_logprobs(server, tokenizer):
    ids = tokenizer.encode(PROMPT)
    r = native(server, {"text": PROMPT, "return_logprob": True, "top_logprobs_num": 3, "logprob_start_len": 0,
                        "return_text_in_logprobs": True,
                        "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(e[0] <= 0 and isinstance(e[2], str) for e in meta["output_token_logprobs"])
    assert [e[1] for e in meta["input_token_logprobs"]] == ids and meta["input_token_logprobs"][0][0] is None
    assert all(len(top) == 3 for top in meta["output_top_logprobs"])
    # Greedy: the chosen token is the most likely one.
    assert all(top[0][1] == e[1] for top, e in zip(meta["output_top_logprobs"], meta["output_token_logprobs"]))
    assert len(meta["input_top_logprobs"]) == len(ids)


def test_chat_logprobs(server):
    r = sdk(server).chat.completions.create(model="any", messages=CHAT, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


# ---- info, control, metrics ------------------------------------------------------------------------------
def test_info_endpoints(server):
    get = lambda path: httpx.get(server.base_url + path, timeout=60)  # noqa: E731
    assert get("/health").status_code == 200
    assert get("/health_generate").status_code == 200
    for path in ("/server_info", "/get_server_info"):
        info = get(path).json()
        assert info["tp_size"] == 1 and info["dp_size"] == 1 and info["disaggregation_mode"] == "null"
        assert info["max_total_tokens"] > 0 and info["version"] and info["served_model_name"]
        assert info["model_path"].startswith("/") and info["disaggregation_bootstrap_port"] == 8998
        kernels = info["cpu_kernels"]  # the load-time self-check's outcome: the ISA path and each op's path
        if kernels["isa"] != "none":
            assert kernels["isa"] in kernels["cpu_isas"] and len(kernels["ops"]) == 9
            assert all(o["path"] in ("kernel", "torch", "mixed") for o in kernels["ops"].values())
    for path in ("/model_info", "/get_model_info"):
        info = get(path).json()
        assert info["is_generation"] is True and info["model_type"] == "llama"
        assert info["architectures"] == ["LlamaForCausalLM"] and info["model_path"].startswith("/")
    load = get("/get_load").json()
    assert load[0]["dp_rank"] == 0 and {"num_reqs", "num_waiting_reqs", "num_tokens"} <= set(load[0])
    assert httpx.post(server.base_url + "/flush_cache").status_code == 200
    r = httpx.post(server.base_url + "/abort_request", json={"rid": "no-such-request"})
    assert r.status_code == 200


def test_metrics(server):
    greedy_generate(server, PROMPT, max_new_tokens=2)
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
                 "sglang:prompt_tokens_total", "sglang:generation_tokens_total",
                 "sglang:time_to_first_token_seconds_bucket", "sglang:inter_token_latency_seconds_bucket",
                 "sglang:e2e_request_latency_seconds_count"):
        assert name in text, name
    gen_tokens = [line for line in text.splitlines() if line.startswith("sglang:generation_tokens_total")]
    assert float(gen_tokens[0].split()[-1]) >= 2


def test_abort_request_ends_a_running_request(server):
    async def run() -> dict:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as c:
            task = asyncio.create_task(c.post("/generate", json={
                "text": PROMPT, "rid": "to-abort", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}))
            await asyncio.sleep(1.0)
            assert (await c.post("/abort_request", json={"rid": "to-abort"})).status_code == 200
            return (await task).json()

    out = asyncio.run(run())
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["meta_info"]["completion_tokens"] < 2000


# ---- concurrency and disconnects -------------------------------------------------------------------------
def test_16_concurrent_streams_match_greedy_alone(server):
    prompts = [f"Fact number {i}: the" for i in range(8)] * 2
    alone = {p: greedy_generate(server, p, max_new_tokens=16)["text"] for p in set(prompts)}

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model="any", prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(run()) == [alone[p] for p in prompts]


def _wait_load(server: ServerProcess, pred, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        load = httpx.get(server.base_url + "/get_load", headers=server.headers).json()[0]
        if pred(load) or time.monotonic() > deadline:
            return load
        time.sleep(0.1)


LONG = {"sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}


def test_stream_disconnect_frees_kv(secured_server):
    s = secured_server
    before = _wait_load(s, lambda load: load["num_reqs"] == 0)
    with httpx.Client(timeout=60, headers=s.headers) as c:
        with c.stream("POST", s.base_url + "/generate", json={"text": PROMPT, "stream": True, **LONG}) as r:
            lines = r.iter_lines()  # kept referenced: closing it would close the response
            assert sum(1 for _, line in zip(range(8), lines) if line.startswith("data:")) >= 3
            during = httpx.get(s.base_url + "/get_load", headers=s.headers).json()[0]
            assert during["num_reqs"] == 1 and during["num_tokens"] > before["num_tokens"]
    after = _wait_load(s, lambda load: load["num_reqs"] == 0 and load["num_tokens"] == before["num_tokens"])
    assert (after["num_reqs"], after["num_tokens"]) == (0, before["num_tokens"])


def test_non_stream_disconnect_frees_kv(secured_server):
    s = secured_server
    before = _wait_load(s, lambda load: load["num_reqs"] == 0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(s.base_url + "/generate", json={"text": PROMPT, **LONG}, headers=s.headers, timeout=1.5)
    after = _wait_load(s, lambda load: load["num_reqs"] == 0 and load["num_tokens"] == before["num_tokens"])
    assert (after["num_reqs"], after["num_tokens"]) == (0, before["num_tokens"])


# ---- errors ----------------------------------------------------------------------------------------------
def _bad_requests(tokenizer) -> list[tuple[str, object]]:
    long_prompt = [100] * 9000  # more than the 8192-token context
    return [
        ("/v1/completions", b"{not json"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": "ten"}),
        ("/v1/completions", {"prompt": 42}),
        ("/v1/completions", {"prompt": ""}),
        ("/v1/completions", {"prompt": long_prompt, "max_tokens": 1}),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": -3}),
        ("/v1/completions", {"prompt": PROMPT, "temperature": -0.5}),
        ("/v1/completions", {"prompt": PROMPT, "top_p": 0}),
        ("/v1/completions", {"prompt": PROMPT, "top_p": 1.5}),
        ("/v1/chat/completions", {"messages": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
        ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}),
        ("/v1/chat/completions", {"messages": CHAT, "temperature": "hot"}),
        ("/generate", {"text": ""}),
        ("/generate", {"input_ids": []}),
        ("/generate", {"input_ids": long_prompt}),
        ("/generate", {"text": PROMPT, "sampling_params": {"top_p": 2}}),
        ("/generate", {"text": PROMPT, "sampling_params": "greedy"}),
        ("/generate", {"input_ids": [len(tokenizer) + 10**6]}),
        ("/generate", {}),
        ("/generate", [1, 2]),
    ]


def test_bad_requests_answer_400_and_server_keeps_serving(server, tokenizer):
    for path, body in _bad_requests(tokenizer):
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(server.base_url + path, timeout=60, **kw)
        assert r.status_code == 400, (path, body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error" and err["code"] == 400, (path, body, err)
    assert greedy_generate(server, PROMPT, max_new_tokens=2)["meta_info"]["completion_tokens"] == 2
    r = sdk(server).chat.completions.create(model="any", messages=CHAT, max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_sdk_raises_bad_request(server):
    with pytest.raises(openai.BadRequestError) as e:
        sdk(server).completions.create(model="any", prompt=PROMPT, max_tokens=4, temperature=-1)
    assert "temperature" in str(e.value)


def test_unknown_routes_and_methods_use_the_error_shape(server):
    r = httpx.get(server.base_url + "/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = httpx.get(server.base_url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


# ---- api key and served model name -----------------------------------------------------------------------
def test_api_key_required(secured_server):
    s = secured_server
    assert httpx.get(s.base_url + "/health").status_code == 200
    for path in ("/v1/models", "/get_load", "/server_info", "/metrics", "/health_generate"):
        r = httpx.get(s.base_url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401, path
        assert httpx.get(s.base_url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(s.base_url + path, headers=s.headers, timeout=60).status_code == 200, path
    r = httpx.post(s.base_url + "/generate", json={"text": PROMPT})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        sdk(s, api_key="wrong").models.list()
    assert [m.id for m in sdk(s).models.list().data] == [SERVED_MODEL_NAME]
    assert API_KEY not in httpx.get(s.base_url + "/server_info", headers=s.headers).text


def test_served_model_name_enforced(secured_server):
    client = sdk(secured_server)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-4", messages=CHAT, max_tokens=2)
    assert "gpt-4" in str(e.value)
    r = client.chat.completions.create(model=SERVED_MODEL_NAME, messages=CHAT, max_tokens=2)
    assert r.model == SERVED_MODEL_NAME and r.usage.completion_tokens == 2


def test_tokenize_and_detokenize(server):
    """vLLM's /tokenize and /detokenize: the ids the server computes for a prompt or a conversation."""
    url = server.base_url
    prompt = "The capital of France is"
    t = httpx.post(url + "/tokenize", json={"prompt": prompt}, timeout=30).json()
    c = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=60).json()
    assert t["count"] == len(t["tokens"]) == c["usage"]["prompt_tokens"] and t["max_model_len"] > 0
    assert httpx.post(url + "/detokenize", json={"tokens": t["tokens"]}, timeout=30).json()["prompt"].endswith(prompt)
    messages = [{"role": "user", "content": "Name a color."}]
    t = httpx.post(url + "/tokenize", json={"messages": messages}, timeout=30).json()
    c = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=60).json()
    assert t["count"] == c["usage"]["prompt_tokens"]
    for path, body, message in (("/tokenize", {"prompt": 5}, "prompt must be a string"),
                                ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, "add_special_tokens"),
                                ("/tokenize", {"messages": []}, "messages"),
                                ("/detokenize", {"tokens": [-1]}, "token ids"),
                                ("/detokenize", [1, 2], "JSON object")):
        r = httpx.post(url + path, json=body, timeout=30)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (path, r.text)
