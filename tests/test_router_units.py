"""Router parts without servers: flags, the approximate tree, policies, circuit breaker, health thresholds,
bootstrap injection and logprob merging."""

from __future__ import annotations

import orjson
import pytest

from pdserve.router import payload
from pdserve.router.args import parse_router_args
from pdserve.router.config import BreakerConfig, CacheAwareConfig, HealthConfig, RouterConfig, WorkerSpec
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import CacheAwarePolicy, PowerOfTwoPolicy, RoundRobinPolicy
from pdserve.router.tree import ApproxTree
from pdserve.router.workers import BreakerState, CircuitBreaker, WorkerRegistry


# ---- flags -------------------------------------------------------------------------------------------------
def test_prefill_flags_and_defaults():
    c = parse_router_args(["--pd-disaggregation", "--prefill", "http://[::1]:8000", "--prefill", "127.0.0.1:8001",
                           "none", "--prefill", "http://h:8002/", "9000", "--decode", "http://d:1"])
    assert [(w.url, w.role, w.bootstrap_port) for w in c.workers] == [
        ("http://[::1]:8000", "prefill", 8998), ("http://127.0.0.1:8001", "prefill", None),
        ("http://h:8002", "prefill", 9000), ("http://d:1", "decode", None)]
    assert c.policy == "cache_aware" and c.effective_prefill_policy == "cache_aware"
    assert c.cache_aware == CacheAwareConfig(0.3, 64, 1.5, 60.0, 2 ** 26)
    assert payload.inject_bootstrap({}, "[::1]", 8998, None)  # serializable
    from pdserve.router.config import bootstrap_host_of
    assert bootstrap_host_of("http://[::1]:8000") == "[::1]" and bootstrap_host_of("http://a.b:1") == "a.b"


@pytest.mark.parametrize("argv", [
    ["--prefill", "http://a:1"],  # needs --pd-disaggregation
    ["--pd-disaggregation", "--prefill", "http://a:1", "1", "2"],
    ["--pd-disaggregation", "--prefill", "http://a:1", "port"],
    ["--pd-disaggregation", "--worker-urls", "http://a:1"],
    ["--worker-urls", "ftp://a:1"],
    ["--worker-urls", "http://a:1", "http://a:1/"],
    ["--cache-threshold", "2"],
    ["--balance-rel-threshold", "0.5"],
    ["--retry-backoff-multiplier", "0.5"],
    ["--health-failure-threshold", "0"],
])
def test_invalid_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_router_args(argv)
    assert e.value.code == 2


# ---- tree --------------------------------------------------------------------------------------------------
def test_tree_match_insert_split():
    t = ApproxTree()
    t.insert("hello world", "a")
    t.insert("hello there", "b")
    assert t.match("hello world!", {"a", "b"}) == ("a", 11)
    assert t.match("hello there", {"a", "b"}) == ("b", 11)
    assert t.match("hello", {"a", "b"})[1] == 5
    assert t.match("hello wor", {"b"}) == ("b", 6)  # only "hello " is b's
    assert t.match("xyz", {"a", "b"}) == (None, 0)
    assert t.tenant_size("a") == 11 and t.tenant_size("b") == 11


def test_tree_evicts_lru_leaves_to_the_cap():
    t = ApproxTree()
    t.insert("common-prefix/" + "x" * 50, "a")
    t.insert("common-prefix/" + "y" * 50, "a")
    t.insert("zzzz", "b")
    t.match("common-prefix/" + "y" * 50, {"a"})
    t.insert("common-prefix/" + "y" * 50, "a")  # y is now the most recent
    assert t.tenant_size("a") == 114
    t.evict(70)
    assert t.tenant_size("a") <= 70
    assert t.match("common-prefix/" + "y" * 50, {"a"})[1] == 64  # the recent branch stays
    assert t.match("common-prefix/" + "x" * 50, {"a"})[1] == 14  # the old one went
    assert t.tenant_size("b") == 4
    t.remove_tenant("a")
    assert t.match("common-prefix/", {"a", "b"}) == (None, 0) and t.tenant_size("a") == 0


# ---- policies ----------------------------------------------------------------------------------------------
def _registry(n: int, role: str = "prefill") -> tuple[WorkerRegistry, list]:
    cfg = RouterConfig(pd_disaggregation=role != "regular", health=HealthConfig(enabled=False))
    reg = WorkerRegistry(cfg, RouterMetrics())
    return reg, [reg.add(WorkerSpec(f"http://w{i}:1", role)) for i in range(n)]


def _workers(n: int) -> list:
    return _registry(n)[1]


def test_round_robin_and_power_of_two():
    ws = _workers(3)
    rr = RoundRobinPolicy()
    assert [rr.select(ws, None).url for _ in range(4)] == ["http://w0:1", "http://w1:1", "http://w2:1", "http://w0:1"]
    ws[0].inflight, ws[1].inflight = 5, 0
    p2 = PowerOfTwoPolicy()
    picks = {p2.select(ws[:2], None).url for _ in range(20)}
    assert picks == {"http://w1:1"}
    ws[1].polled_load, ws[1].inflight_at_poll = 9, 0  # the worker reports more load than this router sent
    assert {p2.select(ws[:2], None).url for _ in range(20)} == {"http://w0:1"}


def test_cache_aware_policy():
    ws = _workers(2)
    pol = CacheAwarePolicy(CacheAwareConfig(cache_threshold=0.5, balance_abs_threshold=4, balance_rel_threshold=2))
    long_a = "A" * 100
    first = pol.select(ws, long_a + " one")
    assert pol.select(ws, long_a + " two") is first  # match rate ~0.96 > 0.5
    other = pol.select(ws, "B" * 100)
    assert other is not first  # no match: least loaded, ties -> smaller tree
    ws[0].inflight = ws[1].inflight = 0
    low = pol.select(ws, "A" * 10 + "C" * 90)  # match rate 0.1 < 0.5: least loaded, ties -> smaller tree
    assert pol.tree.tenant_size(low.url) >= 100
    first.inflight = 3  # balanced (3 - 0 <= 4): the prefix wins although the other is less loaded
    assert pol.select(ws, long_a + " four") is first
    first.inflight = 10  # imbalanced: 10 - 0 > 4 and 10 > 0 * 2 -> least loaded
    assert pol.select(ws, long_a + " three") is other
    pol.remove_worker(first.url)
    assert pol.tree.tenant_size(first.url) == 0


# ---- circuit breaker and health ----------------------------------------------------------------------------
def test_circuit_breaker_opens_half_opens_and_closes():
    b = CircuitBreaker(BreakerConfig(failure_threshold=2, success_threshold=2, timeout_s=5))
    b.record(False, 0.0)
    assert b.allows(0.1)
    b.record(False, 1.0)
    assert b.state is BreakerState.OPEN and not b.allows(3.0)
    assert b.allows(6.5) and b.state is BreakerState.HALF_OPEN
    b.record(False, 6.6)
    assert b.state is BreakerState.OPEN and not b.allows(7.0)
    assert b.allows(12.0)
    b.record(True, 12.1)
    b.record(True, 12.2)
    assert b.state is BreakerState.CLOSED


def test_health_thresholds():
    cfg = RouterConfig(pd_disaggregation=True, health=HealthConfig(failure_threshold=2, success_threshold=3))
    reg = WorkerRegistry(cfg, RouterMetrics())
    w = reg.add(WorkerSpec("http://p:1", "prefill"))
    reg.add(WorkerSpec("http://d:1", "decode"))
    assert not w.healthy and not reg.ready()
    reg.apply_health(w, True)  # the first result decides at once
    assert w.healthy
    reg.apply_health(w, False)
    assert w.healthy  # one failure is not enough
    reg.apply_health(w, False)
    assert not w.healthy and reg.candidates("prefill") == []
    reg.apply_health(w, True)
    reg.apply_health(w, True)
    assert not w.healthy
    reg.apply_health(w, True)
    assert w.healthy and reg.candidates("prefill") == [w]


def test_candidates_exclude_and_fail_open():
    reg, ws = _registry(2)
    for _ in range(5):  # default threshold
        reg.record(ws[0], False, "boom")
    assert ws[0].breaker.state is BreakerState.OPEN
    assert reg.candidates("prefill") == [ws[1]]
    assert reg.candidates("prefill", exclude=[ws[1]]) == [ws[1]]  # exclusion never leaves nothing
    for _ in range(5):
        reg.record(ws[1], False, "boom")
    assert reg.candidates("prefill") == ws  # every circuit open: fail open to the healthy ones
    reg.remove(ws[0].url)
    assert reg.all() == [ws[1]] and reg.get("http://w1:1/") is ws[1]


# ---- payloads ----------------------------------------------------------------------------------------------
def test_bootstrap_injection_single_and_batch():
    one = orjson.loads(payload.inject_bootstrap({"text": "hi"}, "10.0.0.1", 8998, None))
    assert one["bootstrap_host"] == "10.0.0.1" and one["bootstrap_port"] == 8998
    assert 0 <= one["bootstrap_room"] < 2 ** 63
    body = {"text": ["a", "b", "c"]}
    many = orjson.loads(payload.inject_bootstrap(body, "h", None, payload.batch_size("generate", body)))
    assert many["bootstrap_host"] == ["h"] * 3 and many["bootstrap_port"] == [None] * 3
    assert len(set(many["bootstrap_room"])) == 3
    assert payload.batch_size("generate", {"input_ids": [[1], [2]]}) == 2
    assert payload.batch_size("generate", {"input_ids": [1, 2]}) is None
    assert payload.batch_size("completions", {"prompt": ["a", "b"]}) is None


def test_routing_text_and_logprob_merge():
    assert payload.routing_text("generate", {"text": "abc"}) == "abc"
    assert payload.routing_text("generate", {"input_ids": [65, 66]}) == "AB"
    assert payload.routing_text("chat", {"messages": [{"role": "user", "content": "x"},
                                                      {"role": "user", "content": [{"type": "text", "text": "y"}]}]}) \
        == "x\ny"
    assert payload.routing_text("completions", {"prompt": ["p1", "p2"]}) == "p1"
    p = orjson.dumps({"meta_info": {"input_token_logprobs": [[None, 1, None], [-1.0, 2, None]]}})
    d = orjson.dumps({"meta_info": {"input_token_logprobs": [], "x": 1}})
    assert orjson.loads(payload.merge_input_logprobs(p, d))["meta_info"]["input_token_logprobs"][1][1] == 2
    m = payload.StreamLogprobMerger(b"data: " + p + b"\n\ndata: [DONE]\n\n")
    out = m.feed(b"data: " + d[:10]) + m.feed(d[10:] + b"\n\ndata: [DONE]\n\n") + m.flush()
    events = payload.sse_events(out)
    assert len(orjson.loads(events[0])["meta_info"]["input_token_logprobs"]) == 2 and events[1] == b"[DONE]"
    assert payload.is_sse_error(b'data: {"error": {"code": 503}}')
    assert payload.sse_error_status(b'{"error": {"code": 503}}') == 503


def test_stream_tracker_for_migration():
    assert payload.migratable("generate", {"text": "a", "stream": True})
    assert not payload.migratable("generate", {"text": ["a", "b"], "stream": True})  # a batch
    assert not payload.migratable("generate", {"text": "a", "stream": True, "return_logprob": True})
    assert not payload.migratable("chat", {"messages": [], "stream": True, "n": 2})
    assert not payload.migratable("completions", {"prompt": "a", "stream": True, "echo": True})
    assert not payload.migratable("chat", {"messages": [], "stream": False})
    assert not payload.migratable("completions", {"prompt": ["a", "b"], "stream": True})  # two sequences
    assert payload.migratable("completions", {"prompt": [1, 2, 3], "stream": True})  # one tokenized prompt
    assert not payload.migratable("chat", {"stream": True, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert not payload.migratable("chat", {"messages": [], "stream": True, "frequency_penalty": 0.5})
    assert payload.migratable("chat", {"messages": [], "stream": True, "frequency_penalty": 0})
    assert not payload.migratable("generate", {"text": "a", "stream": True,
                                               "sampling_params": {"repetition_penalty": 1.1}})

    gen = payload.StreamTracker("generate", strip_token_ids=False)
    first = b'data: {"text": "A", "output_ids": [5], "meta_info": {"finish_reason": null}}\n\n'
    out = gen.feed(first[:20]) + gen.feed(first[20:])  # events split across reads come out whole
    assert out == first and gen.ids == [5] and not gen.finished
    gen.feed(b'data: {"text": "AB", "output_ids": [5, 6], "meta_info": {"finish_reason": {"type": "length"}}}\n\n')
    assert gen.ids == [5, 6] and gen.finished

    chat = payload.StreamTracker("chat", strip_token_ids=True)
    out = chat.feed(b'data: {"id": "c1", "choices": [{"delta": {"content": "Hi"}, "token_ids": [7, 8], '
                    b'"finish_reason": null}]}\n\ndata: {"id": "c1", "choices": [{"delta": {"content": "!"}, ')
    assert chat.ids == [7, 8] and b"token_ids" not in out and out.endswith(b"\n\n")
    chat.restart()  # the rest of the half event is gone with the broken stream; a continuation follows
    out = chat.feed(b'data: {"id": "c2", "choices": [{"delta": {"content": "!"}, "token_ids": [9], '
                    b'"finish_reason": "stop"}]}\n\ndata: [DONE]\n\n')
    first_event = orjson.loads(out.split(b"\n\n")[0][6:])
    assert first_event["id"] == "c1" and "token_ids" not in first_event["choices"][0]
    assert chat.ids == [7, 8, 9] and chat.finished and out.endswith(b"data: [DONE]\n\n")


def test_stream_tracker_holds_back_a_server_error_and_flushes_the_rest():
    gen = payload.StreamTracker("generate", strip_token_ids=False)
    out = gen.feed(b'data: {"text": "A", "output_ids": [5], "meta_info": {"finish_reason": null}}\n\n'
                   b'data: {"error": {"message": "engine died", "code": 500}}\n\ndata: [DONE]\n\n')
    assert b"error" not in out and b"[DONE]" not in out and gen.server_error is not None and gen.ids == [5]
    gen.restart()  # the continuation elsewhere
    assert gen.server_error is None
    assert gen.feed(b'data: {"error": {"message": "bad", "code": 400}}\n\n').startswith(b'data: {"error"')
    assert gen.server_error is None  # a client error is the client's answer, not a failure to migrate
    assert gen.feed(b"data: [DONE]") == b"" and gen.flush() == b"data: [DONE]"  # no closing blank line
