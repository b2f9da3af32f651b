"""Prefill batching (plain-Python scheduler, no model): prompts being chunked and waiting ones share each step's
budget, so a short prompt behind a long one starts at the next step; the schedule policies order waiting prompts."""

from __future__ import annotations

import time

import pytest

from pdserve.config import EngineConfig
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import MIN_PREFILL_SHARE, SPF_MAX_WAIT_S, Scheduler
from pdserve.sampling_params import SamplingParams

CHUNK = 256


def scheduler(policy: str = "fcfs", **kw) -> Scheduler:
    config = EngineConfig(chunked_prefill_size=CHUNK, disable_radix_cache=True, schedule_policy=policy, **kw)
    return Scheduler(config, num_slots=8192, stop_checker=None)


def request(rid: str, prompt_len: int, max_new_tokens: int = 8) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_new_tokens=max_new_tokens))


def run_step(s: Scheduler) -> dict[str, int]:
    """Schedule one step and apply it as if the model ran (no sampling): {rid: prompt tokens computed}."""
    out = s.schedule()
    for seq in out.prefills:
        seq.req.num_computed_tokens += seq.num_new_tokens
    return {seq.req.rid: seq.num_new_tokens for seq in out.prefills}


def test_a_short_prompt_behind_a_long_one_starts_at_the_next_step():
    s = scheduler()
    s.add(request("long", 4 * CHUNK))
    assert run_step(s) == {"long": CHUNK}  # alone: the whole budget
    s.add(request("short", 20))
    step = run_step(s)
    assert step == {"long": CHUNK - 20, "short": 20}  # both in one step, the budget fully used
    assert s.running[-1].rid == "short" and not s.waiting
    # The long prompt keeps its whole budget again once the short one is done with its prompt.
    s.running[-1].output_ids.append(7)  # its first token: it decodes from now on
    assert run_step(s) == {"long": CHUNK - 1}


def test_many_waiting_prompts_share_fairly_and_the_long_one_still_advances():
    s = scheduler()
    s.add(request("long", 8 * CHUNK))
    run_step(s)
    for i in range(3):
        s.add(request(f"mid{i}", 200))
    step = run_step(s)
    assert step["long"] >= CHUNK // 4 and sum(step.values()) == CHUNK
    assert all(step[f"mid{i}"] >= CHUNK // 4 for i in range(3))
    for _ in range(8):  # every prompt finishes within a bounded number of steps
        run_step(s)
    assert all(r.num_uncomputed_tokens == 0 for r in s.running if r.rid.startswith("mid"))


def test_share_never_drops_below_the_minimum():
    s = scheduler()
    for i in range(CHUNK // MIN_PREFILL_SHARE + 4):
        s.add(request(f"r{i}", 100))
    step = run_step(s)
    assert all(n >= MIN_PREFILL_SHARE for n in step.values()) and sum(step.values()) == CHUNK


def test_fcfs_stops_admitting_at_the_first_prompt_that_does_not_fit():
    s = Scheduler(EngineConfig(chunked_prefill_size=CHUNK, disable_radix_cache=True), num_slots=100,
                  stop_checker=None)
    s.add(request("big", 90))
    s.add(request("huge", 50))
    s.add(request("tiny", 5))
    step = run_step(s)
    assert step == {"big": 90}  # huge does not fit in the 10 slots left; FCFS: tiny does not overtake it
    assert [r.rid for r in s.waiting] == ["huge", "tiny"]


@pytest.mark.parametrize("policy, first", [("fcfs", "a"), ("spf", "c"), ("lof", "b")])
def test_schedule_policies_order_waiting_prompts(policy, first):
    s = scheduler(policy, max_running_requests=1)
    s.add(request("a", 300, max_new_tokens=4))
    s.add(request("b", 200, max_new_tokens=64))
    s.add(request("c", 50, max_new_tokens=8))
    assert list(run_step(s)) == [first]


def test_spf_does_not_starve_a_long_prompt():
    s = scheduler("spf", max_running_requests=1)
    s.add(request("long", 1000))
    s.waiting[0].queued_at = time.monotonic() - SPF_MAX_WAIT_S - 1  # waited too long already
    s.add(request("short", 10))
    assert list(run_step(s)) == ["long"]


def test_spf_gives_short_arrivals_a_step_of_their_own_and_the_long_prompt_every_other_step():
    s = scheduler("spf")
    s.add(request("long", 8 * CHUNK))
    assert run_step(s) == {"long": CHUNK}
    s.add(request("short", 20))
    s.add(request("mid", CHUNK + 1))  # does not fit whole in one step: not quick
    assert run_step(s) == {"short": 20}  # the quick step: no long chunk beside it
    s.add(request("short2", 30))
    step = run_step(s)  # no quick step follows a quick step: everyone shares this one
    assert step["long"] > 0 and step["mid"] > 0 and step["short2"] > 0
    s.add(request("short3", 10))
    assert run_step(s) == {"short3": 10}
    # fcfs keeps the long prompt's chunk in every step
    f = scheduler("fcfs")
    f.add(request("long", 8 * CHUNK))
    run_step(f)
    f.add(request("short", 20))
    assert run_step(f) == {"long": CHUNK - 20, "short": 20}


def test_random_policy_is_seeded_and_unknown_policies_are_refused():
    picks = []
    for _ in range(2):
        s = scheduler("random", max_running_requests=1, seed=3)
        for i in range(6):
            s.add(request(f"r{i}", 10))
        picks.append(list(run_step(s)))
    assert picks[0] == picks[1]
    with pytest.raises(ValueError, match="schedule_policy"):
        EngineConfig(schedule_policy="lpm")
    assert all(r.status is RequestStatus.WAITING for r in s.waiting)


def test_many_long_prompts_in_a_small_pool_all_finish():
    """Started prompts keep the room they still need: admitting parts of many long prompts must not fill the pool
    with halves that can never finish."""
    s = Scheduler(EngineConfig(chunked_prefill_size=CHUNK, disable_radix_cache=True), num_slots=2048,
                  stop_checker=None)
    for i in range(8):
        s.add(request(f"p{i}", 1000))
    finished = []
    for _ in range(200):
        run_step(s)
        for req in [r for r in s.running if r.num_uncomputed_tokens == 0]:
            s.finish(req, "stop")  # its prompt is done: its KV goes back (a PD prefill hands it over)
            finished.append(req.rid)
        if len(finished) == 8:
            break
    assert sorted(finished) == [f"p{i}" for i in range(8)]
    assert s.kv.allocator.num_free == 2048
