"""The engine: scheduler + model runner in one process. step() reads as schedule -> run -> update.

Used in-process (offline `Engine.generate`, tests, benchmarks) and inside the engine process that the
HTTP front talks to through typed messages (pdserve/engine/process.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import msgspec

from pdserve.config import EngineConfig
from pdserve.engine.messages import GenerateRequest, LoadReport, RequestOutput
from pdserve.engine.forward_batch import ForwardBatch, SeqScoring, build_forward_batch
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.stop_checker import StopChecker
from pdserve.engine.tp_worker import TensorRanksFailed
from pdserve.kv_events import KVEventPublisher
from pdserve.model.loader import ResolvedModel, load_tokenizer, resolve_model
from pdserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _SlicedStep:
    """A step run in layer slices (SchedulerOutput.num_layer_slices): its batch, and the slice to run next."""

    sched: SchedulerOutput
    batch: ForwardBatch
    scoring: list[SeqScoring]
    overrides: list[tuple[int, object]] | None
    bounds: list[tuple[int, int]]  # [start, end) layers of each slice
    next_slice: int = 0


def layer_slices(num_layers: int, num_slices: int) -> list[tuple[int, int]]:
    """[start, end) layer ranges of num_slices near-equal slices (at most one layer each)."""
    k = min(num_slices, num_layers)
    return [(i * num_layers // k, (i + 1) * num_layers // k) for i in range(k)]


def eos_token_ids_of(hf_dir: str, tokenizer) -> tuple[int, ...]:
    """EOS ids from generation_config.json (int or list) and the tokenizer."""
    import json
    import os

    ids: set[int] = set()
    path = os.path.join(hf_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def validate_request(req: GenerateRequest, context_len: int, max_total_tokens: int,
                     disaggregation_mode: str = "null") -> GenerateRequest:
    """Reject what can never run; clip max_new_tokens to the context. Raises ValueError."""
    if disaggregation_mode == "prefill" and req.bootstrap is None:
        raise ValueError("a prefill server needs bootstrap_host, bootstrap_port and bootstrap_room on every request "
                         "(send requests through a PD router)")
    if disaggregation_mode == "decode" and req.bootstrap is not None and req.bootstrap.host is None:
        # Without any bootstrap field a decode server prefills the prompt itself (the router's decode-only
        # fallback when no prefill is healthy); a room without a host is a half-injected request.
        raise ValueError("a decode server needs bootstrap_host with bootstrap_room (or no bootstrap fields at all "
                         "to prefill locally)")
    n = len(req.input_ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    if n >= context_len:
        raise ValueError(f"the prompt has {n} tokens, but the model's context length is {context_len}")
    if n + 1 > max_total_tokens:
        raise ValueError(f"the prompt has {n} tokens, more than the KV pool holds ({max_total_tokens})")
    if req.top_logprobs_num < 0:
        raise ValueError("top_logprobs_num must be >= 0")
    if req.logprob_start_len >= n:
        raise ValueError(f"logprob_start_len ({req.logprob_start_len}) must be smaller than the prompt ({n} tokens)")
    room = context_len - n
    if req.sampling.max_new_tokens > room:
        req = replace(req, sampling=req.sampling.with_max_new_tokens(room))
    return req


class Engine:
    def __init__(self, config: EngineConfig, resolved: ResolvedModel | None = None):
        self.config = config
        self.resolved = resolved or resolve_model(config.model.model_path)
        self.tokenizer = load_tokenizer(self.resolved.hf_dir)
        self.eos_token_ids = eos_token_ids_of(self.resolved.hf_dir, self.tokenizer)
        if config.tp_size > 1 and self.resolved is not None:
            from pdserve.epd.vlm import VLMSpec

            if VLMSpec.from_dir(self.resolved.hf_dir) is not None:
                raise ValueError("--tp-size > 1 serves text models only (the vision tower is not sharded)")
        self.runner = ModelRunner(config, self.resolved.hf_dir, self.eos_token_ids)
        self.context_len = self.runner.context_len
        self.max_total_tokens = self.runner.num_slots
        self.kernel_plan = self.runner.model.ops.plan  # which op runs a CPU kernel, which runs torch
        self.scheduler = Scheduler(config, self.max_total_tokens, StopChecker(self.tokenizer, self.eos_token_ids, self.context_len))
        self.scheduler.stats.kv_cache_bytes = self.runner.kv.bytes_per_token() * self.max_total_tokens
        self.kv_events: KVEventPublisher | None = None  # --kv-events-config: flushed once per engine loop pass
        if config.kv_events is not None and self.scheduler.kv.tree is not None:
            self.kv_events = KVEventPublisher(config.kv_events, config.host, config.dp_rank)
            self.scheduler.kv.tree.on_change = self.kv_events.blocks.on_change
        self.requests: dict[str, Request] = {}
        self.last_forward: SchedulerOutput | None = None  # what the latest model run computed (for step logs)
        self._sliced: _SlicedStep | None = None  # a step whose layers run in slices, under way
        # Vision-language models: the vision tower runs here unless encode servers compute the embeddings.
        from pdserve.epd.vlm import VLMSpec

        self.vlm = VLMSpec.from_dir(self.resolved.hf_dir)
        self.vision = None
        if self.vlm is not None and config.runs_vision_tower:
            from pdserve.epd.vision import VisionEncoder

            self.vision = VisionEncoder(self.vlm, self.runner.dtype, self.runner.device)
        # Set by the EPD language wrapper (pdserve/epd/language.py): it fetches remote image embeddings.
        self.accepts_remote_embeddings = False

    # ---- requests ---------------------------------------------------------------------------------------
    def add_request(self, g: GenerateRequest) -> None:
        if g.rid in self.requests:
            raise ValueError(f"duplicate request id {g.rid!r}")
        g = validate_request(g, self.context_len, self.max_total_tokens, self.config.disaggregation_mode)
        req = Request(g.rid, list(g.input_ids), g.sampling, g.return_logprob, g.top_logprobs_num, g.logprob_start_len)
        if g.mm is not None:
            req.mm = self._mm_inputs(g)
        self.requests[g.rid] = req
        self.scheduler.add(req)

    def _mm_inputs(self, g: GenerateRequest):
        """The request's image embeddings: computed here from pixel values, or left to arrive (EPD language
        server), or never needed (a decode server: the KV arrives). Raises ValueError."""
        from pdserve.epd.mm import MMInputs

        mm = g.mm
        n = len(g.input_ids)
        for s in mm.spans:
            if s.offset < 0 or s.offset + s.length > n or any(
                    t != self.vlm.image_token_id for t in g.input_ids[s.offset:s.offset + s.length]):
                raise ValueError(f"image span {s} does not match the prompt's placeholder tokens")
        out = MMInputs(mm.spans)
        if mm.pixel_values:
            if self.vision is None:
                raise ValueError("this server runs no vision tower (it takes image embeddings from encode servers)")
            if len(mm.pixel_values) != len(mm.spans):
                raise ValueError(f"{len(mm.pixel_values)} images for {len(mm.spans)} image spans")
            for i, px in enumerate(mm.pixel_values):
                try:
                    out.set(i, self.vision.encode(px))
                except ValueError:
                    raise
                except Exception as e:  # noqa: BLE001 - report, keep the engine alive
                    logger.exception("vision encoder failed")
                    raise ValueError(f"vision encoder failed on image {i}: {type(e).__name__}: {e}") from None
        elif not (self.accepts_remote_embeddings or self.config.disaggregation_mode == "decode"):
            raise ValueError("this server cannot receive image embeddings from encode servers (start it with "
                             "--disaggregation-mode text, or prefill with --encoder-disaggregated)")
        return out

    def abort(self, rid: str, reason: str | None = None) -> RequestOutput | None:
        req = self.requests.pop(rid, None)
        if req is None:
            return None
        if reason is not None:
            self.scheduler.finish(req, "abort", error=reason)
        else:
            self.scheduler.abort(rid)
        return self.make_output(req)

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # ---- step: schedule -> run -> update ----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One model run: a whole step, a quick step between two layer slices of a step under way, or that
        step's next slice."""
        sliced = self._sliced
        if sliced is not None and any(seq.req.status is not RequestStatus.RUNNING for seq in sliced.sched.seqs):
            self._sliced = sliced = None  # a request of it ended meanwhile (abort): the others redo this chunk
        sched = self.scheduler.schedule(quick_only=sliced is not None)
        failed = []
        while self.scheduler.failed:  # finished inside schedule() (e.g. a preempted image prompt on a decode)
            req = self.scheduler.failed.pop()
            self.requests.pop(req.rid, None)
            failed.append(self.make_output(req))
        if not sched.empty:
            return failed + self._run(sched)
        if sliced is not None:
            return failed + self._next_slice()
        return failed

    def _run(self, sched: SchedulerOutput) -> list[RequestOutput]:
        try:
            batch, scoring, overrides = build_forward_batch(sched)
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep the engine alive
            return self._fail_batch(sched, e)
        if sched.num_layer_slices > 1:
            bounds = layer_slices(self.runner.model.arch.num_layers, sched.num_layer_slices)
            self._sliced = _SlicedStep(sched, batch, scoring, overrides, bounds)
            return self._next_slice()
        return self._forward(sched, batch, scoring, overrides, final=True)

    def _next_slice(self) -> list[RequestOutput]:
        sliced = self._sliced
        start, end = sliced.bounds[sliced.next_slice]
        sliced.next_slice += 1
        final = sliced.next_slice == len(sliced.bounds)
        if final:
            self._sliced = None
        batch = msgspec.structs.replace(sliced.batch, layer_start=start, layer_end=end)
        return self._forward(sliced.sched, batch, sliced.scoring, sliced.overrides if start == 0 else None, final)

    def _forward(self, sched: SchedulerOutput, batch: ForwardBatch, scoring: list[SeqScoring],
                 overrides: list[tuple[int, object]] | None, final: bool) -> list[RequestOutput]:
        self.last_forward = sched
        try:
            results = self.runner.run(batch, scoring, overrides)
        except TensorRanksFailed as e:  # the TP group is gone: nothing can run here any more
            logger.error("%s: failing every request and stopping the engine", e)
            self._fail_all(f"engine error: {e}")
            raise
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep the engine alive
            self._sliced = None
            return self._fail_batch(sched, e)
        if not final:
            return []
        changed = self.scheduler.update(sched, results)
        outs = []
        for req in changed:
            outs.append(self.make_output(req))
            if req.finished:
                self.requests.pop(req.rid, None)
        return outs

    def _fail_batch(self, sched: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        logger.exception("forward failed")
        outs = []
        for seq in sched.seqs:
            self.scheduler.finish(seq.req, "abort", error=f"engine error: {type(error).__name__}: {error}")
            self.requests.pop(seq.req.rid, None)
            outs.append(self.make_output(seq.req))
        return outs

    def idle(self) -> None:
        """Called by the engine loop when there is nothing to run (TP: keeps the other ranks' deadline)."""
        try:
            self.runner.keepalive()
        except TensorRanksFailed as e:
            logger.error("%s: stopping the engine", e)
            raise

    def _fail_all(self, reason: str) -> None:
        """End every request this engine holds with reason (its outputs are lost with the engine; the front
        reports the engine's death on every open stream)."""
        for req in list(self.requests.values()):
            self.scheduler.finish(req, "abort", error=reason)
        self.requests.clear()

    def close(self) -> None:
        if self.kv_events is not None:
            self.kv_events.close()
        self.runner.close()

    def make_output(self, req: Request) -> RequestOutput:
        new_ids = req.output_ids[req.num_sent_tokens :]
        req.num_sent_tokens = len(req.output_ids)
        out = RequestOutput(
            rid=req.rid,
            new_token_ids=new_ids,
            new_logprobs=req.pending_logprobs if req.return_logprob else None,
            finish_reason=req.finish_reason,
            matched_stop=req.matched_stop,
            prompt_tokens=len(req.prompt_ids),
            cached_tokens=req.num_cached_tokens,
            completion_tokens=len(req.output_ids),
            error=req.error,
        )
        req.pending_logprobs = []
        if req.return_logprob and req.logprob_start_len >= 0 and not req.input_logprobs_sent:
            out.input_logprobs = req.input_logprobs or []
            req.input_logprobs_sent = True
        return out

    # ---- control --------------------------------------------------------------------------------------
    def load(self) -> LoadReport:
        s = self.scheduler
        return LoadReport(
            num_reqs=len(s.running) + len(s.waiting),
            num_waiting_reqs=len(s.waiting),
            num_tokens=self.max_total_tokens - s.kv.allocator.num_free,
            max_total_tokens=self.max_total_tokens,
            num_used_by_reqs=s.num_used_by_reqs,
            num_cached_tokens=s.kv.num_cached_tokens,
            stats=replace(s.stats, time_s=time.monotonic()),
        )

    def flush_cache(self) -> bool:
        return self.scheduler.kv.flush()

    # ---- offline API ----------------------------------------------------------------------------------
    def generate(self, prompts: Iterable[str | list[int]], sampling: SamplingParams | None = None,
                 **kw) -> list[RequestOutput]:
        """Run prompts to completion (batched); returns one merged RequestOutput per prompt, in order."""
        sampling = sampling or SamplingParams()
        rids = []
        for i, p in enumerate(prompts):
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            rid = f"offline-{id(self)}-{len(self.requests)}-{i}"
            self.add_request(GenerateRequest(rid, tuple(ids), sampling, **kw))
            rids.append(rid)
        merged: dict[str, RequestOutput] = {}
        while any(r not in merged or merged[r].finish_reason is None for r in rids):
            for o in self.step():
                m = merged.get(o.rid)
                if m is None:
                    merged[o.rid] = o
                    continue
                m.new_token_ids = m.new_token_ids + o.new_token_ids
                if o.new_logprobs is not None:
                    m.new_logprobs = (m.new_logprobs or []) + o.new_logprobs
                m.finish_reason, m.matched_stop, m.completion_tokens = o.finish_reason, o.matched_stop, o.completion_tokens
                m.error = o.error
        return [merged[r] for r in rids]
