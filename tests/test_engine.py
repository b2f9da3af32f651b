"""Engine correctness against transformers' own greedy generation, plus cache, chunking, preemption."""

from __future__ import annotations

import pytest
import torch

from pdserve.config import EngineConfig, ModelConfig
from pdserve.engine.engine import Engine
from pdserve.engine.messages import GenerateRequest
from pdserve.sampling_params import SamplingParams
from tests.engine_helpers import PROMPTS, build_tiny_model, hf_greedy

MAX_NEW = 24
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, temperature=0)


def assert_pool_free(engine: Engine) -> None:
    """No request holds a slot; after flushing the prefix cache the whole pool is free."""
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.scheduler.num_used_by_reqs == 0
    assert engine.flush_cache()
    alloc = engine.scheduler.kv.allocator
    assert alloc.num_free == alloc.size
    assert alloc.free_runs() == [(1, alloc.size + 1)]  # no slot lost or duplicated


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(max_total_tokens=4096))


@pytest.fixture(scope="module")
def reference(engine):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(engine.resolved.hf_dir, dtype=torch.float32)
    return {p: hf_greedy(hf, engine.tokenizer, p, MAX_NEW) for p in PROMPTS}


def _ids(out) -> list[int]:
    return out.new_token_ids


def test_greedy_matches_transformers_one_at_a_time(engine, reference):
    engine.flush_cache()
    for p in PROMPTS:
        out = engine.generate([p], GREEDY, return_logprob=True)[0]
        ref_ids, ref_lp = reference[p]
        n = len(ref_ids)
        assert _ids(out)[:n] == ref_ids, p
        first = out.new_logprobs[0]
        assert abs(first.logprob - ref_lp[first.token_id].item()) < 1e-4
    assert_pool_free(engine)


def test_greedy_matches_transformers_batched(engine, reference):
    outs = engine.generate(PROMPTS, GREEDY)
    for p, out in zip(PROMPTS, outs):
        ref_ids, _ = reference[p]
        assert _ids(out)[: len(ref_ids)] == ref_ids, p
    assert_pool_free(engine)


def test_first_step_top_logprobs_match(engine, reference):
    p = PROMPTS[0]
    out = engine.generate([p], SamplingParams(max_new_tokens=1, temperature=0), return_logprob=True,
                          top_logprobs_num=5)[0]
    _, ref_lp = reference[p]
    vals, idx = ref_lp.topk(5)
    got = out.new_logprobs[0].top
    assert [t for t, _ in got] == idx.tolist()
    assert max(abs(a - b) for (_, a), b in zip(got, vals.tolist())) < 1e-4
    assert_pool_free(engine)


def test_prefix_cache_hit_gives_same_tokens(engine):
    engine.flush_cache()
    base = "You are a careful assistant. Answer briefly and precisely. " * 4
    prompts = [base + "What is two plus two?", base + "Name a fruit."]
    sp = SamplingParams(max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    cold = []
    for p in prompts:
        engine.flush_cache()
        cold.append(engine.generate([p], sp)[0])
    assert [c.cached_tokens for c in cold] == [0, 0]
    engine.flush_cache()
    engine.generate([prompts[0]], sp)  # warms the shared prefix
    warm = engine.generate([prompts[1]], sp)[0]
    assert warm.cached_tokens > 40
    assert _ids(warm) == _ids(cold[1])
    assert_pool_free(engine)


def test_chunked_prefill_matches_unchunked(engine):
    long_prompt = " ".join(PROMPTS) * 3
    cold = engine.generate([long_prompt], GREEDY)[0]
    chunked = Engine(EngineConfig(max_total_tokens=2048, chunked_prefill_size=16, disable_radix_cache=True))
    out = chunked.generate([long_prompt, PROMPTS[0]], GREEDY)
    assert _ids(out[0]) == _ids(cold)
    assert_pool_free(chunked)
    assert_pool_free(engine)


def test_preemption_resumes_with_same_tokens(engine):
    sp = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    expect = [_ids(o) for o in engine.generate(PROMPTS[:6], sp)]
    small = Engine(EngineConfig(max_total_tokens=160, chunked_prefill_size=64))
    outs = small.generate(PROMPTS[:6], sp)
    assert [_ids(o) for o in outs] == expect
    assert_pool_free(small)
    assert_pool_free(engine)


def test_preemption_really_happens():
    small = Engine(EngineConfig(max_total_tokens=120, chunked_prefill_size=64, disable_radix_cache=True))
    sp = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    for i, p in enumerate(PROMPTS[:5]):
        small.add_request(GenerateRequest(f"p{i}", tuple(small.tokenizer.encode(p)), sp))
    reqs = list(small.requests.values())
    done = 0
    for _ in range(2000):
        done += sum(1 for o in small.step() if o.finish_reason)
        if done == 5:
            break
    assert done == 5
    assert sum(r.num_preemptions for r in reqs) > 0
    assert all(len(r.output_ids) == 30 for r in reqs)
    assert_pool_free(small)


def test_abort_running_and_waiting_frees_slots(engine):
    sp = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(GenerateRequest(f"a{i}", tuple(engine.tokenizer.encode(p)), sp))
    for _ in range(3):
        engine.step()
    outs = [engine.abort(f"a{i}") for i in range(len(PROMPTS))]
    assert all(o is not None and o.finish_reason == "abort" for o in outs)
    assert_pool_free(engine)


def test_sampling_params_and_stops(engine):
    out = engine.generate(["Count: 1, 2, 3,"], SamplingParams(max_new_tokens=30, temperature=0, stop=(" 6",)))[0]
    assert out.finish_reason == "stop" and out.matched_stop == " 6"
    assert " 6" in engine.tokenizer.decode(out.new_token_ids)
    stop_id = engine.tokenizer.encode(" 5")[0]
    out = engine.generate(["Count: 1, 2, 3,"], SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=(stop_id,)))[0]
    assert out.finish_reason == "stop" and out.matched_stop == stop_id and out.new_token_ids[-1] == stop_id
    s1 = engine.generate(["Tell me a joke."], SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7))[0]
    s2 = engine.generate(["Tell me a joke."], SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7))[0]
    assert _ids(s1) == _ids(s2)
    out = engine.generate(["Hi"], SamplingParams(max_new_tokens=5, min_new_tokens=5, temperature=0,
                                                   repetition_penalty=1.3, frequency_penalty=0.5,
                                                   presence_penalty=0.5, min_p=0.1))[0]
    assert len(out.new_token_ids) == 5 and out.finish_reason == "length"
    target = engine.tokenizer.encode(" banana")[0]
    out = engine.generate(["Hello"], SamplingParams(max_new_tokens=3, temperature=0, logit_bias=((target, 100.0),)))[0]
    assert out.new_token_ids == [target] * 3
    assert_pool_free(engine)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_bad_sampling_params_rejected(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)


def test_too_long_prompt_rejected_before_queueing(engine):
    ids = tuple([1] * (engine.context_len + 5))
    with pytest.raises(ValueError, match="context length"):
        engine.add_request(GenerateRequest("long", ids, GREEDY))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(GenerateRequest("empty", (), GREEDY))
    assert not engine.scheduler.waiting and "long" not in engine.requests


def test_input_logprobs_match_transformers(engine):
    from transformers import AutoModelForCausalLM

    p = PROMPTS[2]
    ids = engine.tokenizer.encode(p)
    out = engine.generate([p], SamplingParams(max_new_tokens=1, temperature=0), return_logprob=True,
                          logprob_start_len=0)[0]
    hf = AutoModelForCausalLM.from_pretrained(engine.resolved.hf_dir, dtype=torch.float32)
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    got = out.input_logprobs
    assert len(got) == len(ids) and got[0] is None
    for t in range(1, len(ids)):
        assert abs(got[t].logprob - lp[t - 1, ids[t]].item()) < 1e-4


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "mistral"])
def test_other_architectures_match_transformers(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(str(tmp_path / model_type), model_type)
    eng = Engine(EngineConfig(model=ModelConfig(model_path=path), max_total_tokens=1024))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    outs = eng.generate(PROMPTS[:4], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    for p, out in zip(PROMPTS[:4], outs):
        ref, _ = hf_greedy(hf, eng.tokenizer, p, 12)
        assert _ids(out) == ref
    assert_pool_free(eng)
