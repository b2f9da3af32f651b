"""Prefill steps in layer slices (--prefill-layer-slices with --schedule-policy spf): a long prompt's step runs its
layers a slice at a time, a short prompt's quick step runs between two slices, and every output is the one the
whole steps give; an abort in the middle of a sliced step leaves nothing behind."""

from __future__ import annotations

import pytest

from pdserve.config import EngineConfig, ModelConfig
from pdserve.engine.engine import layer_slices
from pdserve.engine.messages import GenerateRequest
from pdserve.sampling_params import SamplingParams
from tests.test_paged_kv import assert_engine_pool_free

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
CHUNK = 64  # SLICED_STEP_MIN_TOKENS: a step this big is sliced


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.engine_helpers import build_tiny_model

    # 4 layers: slices of 1-2 layers
    return build_tiny_model(str(tmp_path_factory.mktemp("slices") / "llama"), "llama", num_layers=4)


def engine(path: str, slices: int, policy: str = "spf"):
    from pdserve.engine.engine import Engine

    return Engine(EngineConfig(model=ModelConfig(model_path=path), chunked_prefill_size=CHUNK,
                               schedule_policy=policy, prefill_layer_slices=slices, disable_radix_cache=True,
                               max_total_tokens=1024))


def prompts(eng) -> tuple[list[int], list[int]]:
    ids = eng.tokenizer.encode("The history of computing is long and full of surprises. " * 40)
    return ids[:3 * CHUNK], ids[300:310]  # a long prompt (3 chunks) and a short one


def reference(path: str) -> tuple[list[int], list[int]]:
    eng = engine(path, 1, "fcfs")
    long_ids, short_ids = prompts(eng)
    return tuple(o.new_token_ids for o in eng.generate([long_ids, short_ids], GREEDY))


def run_to_end(eng, max_steps: int = 500) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        for o in eng.step():
            tokens.setdefault(o.rid, []).extend(o.new_token_ids)
        if not eng.has_work:
            return tokens
    raise AssertionError("the engine did not finish")


def test_layer_slices_cover_every_layer_once():
    assert layer_slices(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert layer_slices(4, 3) == [(0, 1), (1, 2), (2, 4)]
    assert layer_slices(2, 5) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="prefill_layer_slices"):
        EngineConfig(prefill_layer_slices=0)


def test_a_short_prompt_runs_between_two_slices_and_outputs_match_whole_steps(tiny_model):
    ref_long, ref_short = reference(tiny_model)
    eng = engine(tiny_model, 3)
    long_ids, short_ids = prompts(eng)
    eng.add_request(GenerateRequest("long", tuple(long_ids), GREEDY))
    assert eng.step() == [] and eng.step() == [] and eng.step() == []  # the first chunk: three slices
    long_req = eng.requests["long"]
    assert long_req.num_computed_tokens == CHUNK
    assert eng.step() == []  # the second chunk's first slice
    eng.add_request(GenerateRequest("short", tuple(short_ids), GREEDY))
    outs = eng.step()  # the short prompt's quick step, between two slices of the long one's chunk
    assert [(o.rid, len(o.new_token_ids)) for o in outs] == [("short", 1)]
    assert long_req.num_computed_tokens == CHUNK  # its chunk is still under way
    tokens = run_to_end(eng)
    assert tokens["long"] == ref_long
    assert [outs[0].new_token_ids[0]] + tokens["short"] == ref_short
    assert_engine_pool_free(eng)


@pytest.mark.parametrize("victim", ["long", "other"])
def test_an_abort_in_the_middle_of_a_sliced_step(tiny_model, victim):
    """The aborted request's slots are freed; the rest of the step is dropped and redone by those left."""
    ref_long, _ = reference(tiny_model)
    eng = engine(tiny_model, 3)
    long_ids, _ = prompts(eng)
    eng.add_request(GenerateRequest("long", tuple(long_ids), GREEDY))
    eng.add_request(GenerateRequest("other", tuple(long_ids[:150]), GREEDY))  # shares the sliced steps
    eng.step()
    eng.step()  # two slices of the first step: both prompts' first chunks are in it
    out = eng.abort(victim)
    assert out is not None and out.finish_reason == "abort"
    tokens = run_to_end(eng)
    assert victim not in tokens
    if victim == "other":
        assert tokens["long"] == ref_long
    else:
        assert len(tokens["other"]) == GREEDY.max_new_tokens
    assert_engine_pool_free(eng)


def test_fcfs_and_decode_steps_are_never_sliced(tiny_model):
    eng = engine(tiny_model, 3, "fcfs")
    long_ids, _ = prompts(eng)
    eng.add_request(GenerateRequest("long", tuple(long_ids), GREEDY))
    eng.step()
    assert eng.requests["long"].num_computed_tokens == CHUNK  # a whole step
    eng = engine(tiny_model, 3)
    eng.add_request(GenerateRequest("a", tuple(long_ids[:40]), GREEDY))  # < CHUNK: its one step runs whole
    run_to_end(eng)  # steps with decodes in them run whole: nothing to check but that it ends
    assert_engine_pool_free(eng)
