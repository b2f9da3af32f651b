"""Continuous-batching scheduler: plain Python, never touches tensors.

schedule() picks, under a token budget, the running decodes (one token each) and prefill chunks for this
step and gives each the KV slots it will write; update() applies the sampled tokens and retires requests.
Memory: slots come from PagedKVAllocator (whole pages of config.page_size slots; a request's slots are always
whole pages); the radix cache lends prefixes (whole pages) and is evicted LRU when short. A
decode that cannot grow preempts the newest running request (its KV is cached, it re-queues at the front).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.config import EngineConfig
from pdserve.engine.kv_pool import PagedKVAllocator
from pdserve.engine.messages import TokenLogprob
from pdserve.engine.radix_cache import RadixCache
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.stats import EngineStats
from pdserve.engine.stop_checker import StopChecker


MIN_PREFILL_SHARE = 32  # tokens: the smallest fair share of a step's prefill budget
SPF_MAX_WAIT_S = 10.0  # --schedule-policy spf: a prompt waiting this long starts before shorter ones
SLICED_STEP_MIN_TOKENS = 64  # --prefill-layer-slices: smaller prefill steps run whole


def _slots_to_come(req: Request) -> int:
    """KV slots a prompt still needs beyond those it holds."""
    return max(req.num_tokens - len(req.slots), 0)


@dataclass
class ScheduledSeq:
    req: Request
    num_new_tokens: int  # computed this step, from req.num_computed_tokens on

    @property
    def samples(self) -> bool:
        return self.req.num_computed_tokens + self.num_new_tokens == self.req.num_tokens


@dataclass
class SchedulerOutput:
    prefills: list[ScheduledSeq] = field(default_factory=list)
    decodes: list[ScheduledSeq] = field(default_factory=list)
    # > 1: run this step's layers in that many slices; the engine may run a quick step (schedule(quick_only))
    # between two slices. Only for prefill-only steps of spf that are not quick steps themselves.
    num_layer_slices: int = 1

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def seqs(self) -> list[ScheduledSeq]:
        return self.prefills + self.decodes


@dataclass
class SampledToken:
    """What the runner returns for each sequence that sampled (or scored its prompt) this step."""

    token_id: int | None
    logprob: TokenLogprob | None = None
    input_logprobs: list[TokenLogprob | None] | None = None  # for the prompt positions computed this step


class KVManager:
    """Slots for requests: prefix-cache lookup, allocation with eviction, release into the cache.
    Counts are in tokens; a request's slots (req.slots) always cover whole pages of page_size slots."""

    def __init__(self, num_slots: int, enable_radix: bool, page_size: int = 1):
        self.page_size = page_size
        self.allocator = PagedKVAllocator(num_slots, page_size)
        self.tree = RadixCache(self.allocator.free, page_size) if enable_radix else None

    @property
    def num_available(self) -> int:
        return self.allocator.num_free + (self.tree.num_evictable_tokens if self.tree else 0)

    @property
    def num_cached_tokens(self) -> int:
        return self.tree.num_cached_tokens if self.tree else 0

    def match_prefix(self, req: Request) -> None:
        """Attach the longest cached prefix (leaving >= 1 token to compute) to a request with no slots."""
        if self.tree is None or req.mm is not None:  # image prompts: placeholder ids do not identify images
            return
        limit = req.num_tokens - 1
        if req.wants_input_logprobs:
            limit = min(limit, max(req.logprob_start_len - 1, 0))
        slots, node = self.tree.match_prefix(req.all_ids[:limit])
        self.tree.lock(node)
        req.cache_node, req.slots, req.num_tree_slots = node, slots, len(slots)
        req.num_computed_tokens = len(slots)

    def grow(self, req: Request, n: int) -> bool:
        """Give req slots (whole pages) for its next n tokens, evicting cached prefixes if needed."""
        need = req.num_computed_tokens + n - len(req.slots)
        if need <= 0:
            return True
        need = -(-need // self.page_size) * self.page_size
        if self.allocator.num_free < need and self.tree is not None:
            self.tree.evict(need - self.allocator.num_free)
        got = self.allocator.alloc(need)
        if got is None:
            return False
        req.slots.extend(got)
        return True

    def release(self, req: Request) -> None:
        """Return a request's slots: computed KV in whole pages goes into the prefix cache, the rest (a
        partly computed last page included) to the free list."""
        n = req.num_computed_tokens // self.page_size * self.page_size
        if self.tree is not None and req.cache_node is not None:
            already = self.tree.insert(req.all_ids[:n], req.slots[:n])
            self.allocator.free(req.slots[req.num_tree_slots:already])
            self.allocator.free(req.slots[max(n, already):])
            self.tree.unlock(req.cache_node)
        else:
            self.allocator.free(req.slots[req.num_tree_slots:])
        req.slots, req.num_tree_slots, req.cache_node = [], 0, None

    def detach(self, req: Request) -> list[int]:
        """Take the slots a request owns away from it without freeing them; free_detached() frees them later.
        A PD decode keeps a failed request's destination this way while a prefill may still write into it."""
        slots = req.slots[req.num_tree_slots:]
        if self.tree is not None and req.cache_node is not None:
            self.tree.unlock(req.cache_node)
        req.slots, req.num_tree_slots, req.cache_node = [], 0, None
        return slots

    def lend_run(self, num_tokens: int) -> list[int] | None:
        """num_tokens contiguous free slots (whole pages) lent outside any request, e.g. to stage a PD transfer;
        None when no such run is free (nothing is evicted for it). Return them with free_detached()."""
        got = self.allocator.alloc(num_tokens)
        if got is None or num_tokens == 0:
            return got
        if got[num_tokens - 1] - got[0] != num_tokens - 1:  # sorted, distinct: one run iff the ends are n-1 apart
            self.allocator.free(got)
            return None
        return got

    def free_detached(self, slots: list[int]) -> None:
        self.allocator.free(slots)

    def flush(self) -> bool:
        if self.tree is None:
            return True
        self.tree.reset()
        return self.tree.num_cached_tokens == 0


class Scheduler:
    def __init__(self, config: EngineConfig, num_slots: int, stop_checker: StopChecker):
        self.config = config
        self.kv = KVManager(num_slots, enable_radix=not config.disable_radix_cache, page_size=config.page_size)
        self.stop = stop_checker
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Set by the prefill side of PD: takes ownership of a finished request's KV (returns True) so
        # it can be transferred before the slots are released.
        self.kv_hold: Callable[[Request], bool] | None = None
        self.step_budget = config.chunked_prefill_size if config.chunked_prefill_size > 0 else config.max_prefill_tokens
        # Requests finished inside schedule() (not by a step's results); the engine reports them.
        self.failed: list[Request] = []
        self.stats = EngineStats(max_running_requests=config.max_running_requests)
        self._rng = random.Random(config.seed)  # --schedule-policy random
        self._last_step_quick = False  # --schedule-policy spf: the last prefill step was a quick one

    # ---- queue management -------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.queued_at = time.monotonic()
        self.waiting.append(req)

    def abort(self, rid: str) -> Request | None:
        for req in list(self.waiting) + self.running:
            if req.rid == rid:
                self.finish(req, "abort")
                return req
        return None

    def finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.finished:
            return
        req.finish_reason = req.finish_reason or reason
        if error:
            req.finish_reason, req.error = "abort", error
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        if self.kv_hold is None or not self.kv_hold(req):
            self.kv.release(req)

    @property
    def num_used_by_reqs(self) -> int:
        return sum(len(r.slots) - r.num_tree_slots for r in self.running)

    # ---- schedule -----------------------------------------------------------------------------------
    def schedule(self, quick_only: bool = False) -> SchedulerOutput:
        """The next step. quick_only (a step in layer slices is under way; its requests must not be scheduled
        again): only a quick step of waiting prompts (spf), or nothing."""
        out = SchedulerOutput()
        budget = max(self.step_budget, 1)
        if quick_only:
            self._schedule_prefills(out, budget, quick_only=True)
            return out
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING or not req.is_decoding:
                continue
            while not self.kv.grow(req, 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                out.decodes.append(ScheduledSeq(req, 1))
        budget -= len(out.decodes)
        quick = self._schedule_prefills(out, budget)
        slices = self.config.prefill_layer_slices
        if (slices > 1 and self.config.schedule_policy == "spf" and not quick and not out.decodes
                and sum(s.num_new_tokens for s in out.prefills) >= SLICED_STEP_MIN_TOKENS):
            out.num_layer_slices = slices
        return out

    def _schedule_prefills(self, out: SchedulerOutput, budget: int, quick_only: bool = False) -> bool:
        """Prefill batching: the prompts being chunked and the waiting ones the policy picks share the step's
        token budget. Each first gets a fair share (budget / their number, at least MIN_PREFILL_SHARE tokens),
        then what is left goes to them in order (up to a chunk each). So a short prompt that arrives behind a long
        one starts within one step, and a long one still advances every step. A waiting prompt is admitted only
        while the KV pool also holds the rest of every prompt already started (else parts of many prompts could
        fill it and none finish); the first that does not fit stops admission (FCFS). Returns whether this is a
        quick step (spf: waiting prompts that fit whole, alone)."""
        if budget <= 0:
            return False
        continuing = [r for r in self.running if not r.is_decoding and r.num_uncomputed_tokens > 0]
        room = self.config.max_running_requests - len(self.running)
        waiting = self._pick_waiting(room) if room > 0 else []
        candidates = continuing + waiting
        quick = self._quick_step(continuing, waiting, budget)
        if quick or quick_only:
            candidates = quick
        if not candidates:
            return bool(quick)
        share = max(budget // len(candidates), MIN_PREFILL_SHARE)
        reserved = sum(_slots_to_come(r) for r in continuing)  # what started prompts still need
        planned: dict[str, ScheduledSeq] = {}
        admitting = True
        for cap in (share, None):  # pass 1: the fair share each; pass 2: the rest, in order
            for req in candidates:
                if budget <= 0:
                    return bool(quick)
                seq = planned.get(req.rid)
                waiting = seq is None and req.status is RequestStatus.WAITING
                if waiting and not admitting:
                    continue
                matched_now = waiting and not req.slots
                if matched_now:
                    self.kv.match_prefix(req)
                    if req.num_preemptions == 0:
                        req.num_cached_tokens = req.num_computed_tokens
                already = seq.num_new_tokens if seq is not None else 0
                want = min(req.num_uncomputed_tokens, self.config.chunk_size)
                n = min(want if cap is None else min(want, cap), budget + already) - already
                if n <= 0:
                    continue
                # Keep room for every running decode to grow one token after this step.
                room_for_decodes = self.kv.num_available >= n + len(out.decodes)
                if waiting:
                    need = _slots_to_come(req)
                    if (not room_for_decodes or self.kv.num_available < need + reserved + len(out.decodes)
                            or not self.kv.grow(req, n)):
                        if matched_now:  # give the cached prefix back (its lock would pin it while it waits)
                            self.kv.release(req)
                            req.num_computed_tokens = req.num_cached_tokens = 0
                        admitting = False
                        continue
                    self._admit(req)
                    reserved += _slots_to_come(req)
                else:
                    before = _slots_to_come(req)
                    if not room_for_decodes or not self.kv.grow(req, already + n):
                        admitting = False  # a started prompt cannot grow: admit nobody new
                        continue
                    reserved -= before - _slots_to_come(req)
                if seq is None:
                    seq = planned[req.rid] = ScheduledSeq(req, n)
                    out.prefills.append(seq)
                else:
                    seq.num_new_tokens += n
                budget -= n
        return bool(quick)

    def _quick_step(self, continuing: list[Request], waiting: list[Request], budget: int) -> list[Request]:
        """--schedule-policy spf: the waiting prompts that fit whole in this step (shortest first) get a step of
        their own, without the started long prompts' chunks: a short prompt's step then costs one pass over the
        weights plus its own tokens, not a long prompt's chunk too (shortest remaining work first, as SRPT). A
        started prompt still advances at least every other step: no quick step follows a quick step."""
        last, self._last_step_quick = self._last_step_quick, False
        if self.config.schedule_policy != "spf" or not continuing or last:
            return []
        limit = min(self.config.chunk_size, budget)
        quick = [r for r in waiting if r.num_uncomputed_tokens <= limit]
        self._last_step_quick = bool(quick)
        return quick

    def _pick_waiting(self, room: int) -> list[Request]:
        """Up to `room` waiting requests whose inputs are ready (image embeddings may still be on their way), in
        the schedule policy's order."""
        ready = [r for r in self.waiting if r.inputs_ready]
        policy = self.config.schedule_policy
        if policy == "spf":
            now = time.monotonic()
            # Shortest prompt first; a prompt that waited SPF_MAX_WAIT_S goes first anyway (no starvation).
            ready.sort(key=lambda r: (now - r.queued_at < SPF_MAX_WAIT_S, r.num_uncomputed_tokens))
        elif policy == "lof":
            ready.sort(key=lambda r: -r.sampling.max_new_tokens)
        elif policy == "random":
            self._rng.shuffle(ready)
        return ready[:room]

    def _admit(self, req: Request) -> None:
        self.waiting.remove(req)
        self.stats.queue_time.observe(time.monotonic() - req.queued_at)
        if req.num_preemptions == 0:  # first admission (a preempted request is counted once, before)
            self.stats.num_admitted_prompt_tokens += len(req.prompt_ids)
            self.stats.num_admitted_cached_tokens += req.num_cached_tokens
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _preempt(self, req: Request) -> None:
        if not req.inputs_ready:  # an image prompt without embeddings here (a decode server): cannot recompute
            self.finish(req, "abort", error="preempted for KV memory, and this server cannot recompute an image "
                                            "prompt (it holds no image embeddings); raise --max-total-tokens")
            self.failed.append(req)
            return
        self.running.remove(req)
        self.kv.release(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        if not req.input_logprobs_sent:
            req.input_logprobs = None  # recomputed from scratch on resume
        req.status = RequestStatus.WAITING
        self.stats.num_retracted_reqs += 1
        req.queued_at = time.monotonic()
        self.waiting.appendleft(req)

    # ---- update -------------------------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, results: list[SampledToken | None]) -> list[Request]:
        """Advance counters with this step's results; returns requests that changed (for output)."""
        changed = []
        for seq, res in zip(sched.seqs, results):
            req = seq.req
            if req.finished:  # aborted while the step ran
                continue
            samples = seq.samples
            req.num_computed_tokens += seq.num_new_tokens
            if res is not None and res.input_logprobs is not None:
                req.input_logprobs = (req.input_logprobs or []) + res.input_logprobs
            if not samples:
                continue
            if req.sampling.max_new_tokens == 0:
                self.finish(req, "length")
            else:
                assert res is not None and res.token_id is not None
                req.output_ids.append(res.token_id)
                self.stats.num_generated_tokens += 1
                if res.logprob is not None:
                    req.pending_logprobs.append(res.logprob)
                self.stop.check(req)
                if req.finish_reason is not None:
                    self.finish(req, req.finish_reason)
            changed.append(req)
        return changed
