"""One tokenized request through the engine: validation, detokenization, stop cutting, metrics, abort on exit.

Both the native and the OpenAI APIs build on `GenerationService`. Each request yields `GenChunk`s and ends
with exactly one chunk whose `finish` is set; an engine failure becomes such a chunk with `error` set.
Closing or cancelling a stream aborts the request in the engine (the engine client does that).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from pdserve.disagg.messages import BootstrapInfo
from pdserve.engine.messages import GenerateRequest, RequestOutput, TokenLogprob
from pdserve.sampling_params import SamplingParams
from pdserve.server.detokenizer import DetokenizeStream
from pdserve.server.errors import APIError, BadRequestError
from pdserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenInput:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    stream: bool = False
    bootstrap: BootstrapInfo | None = None
    mm: object = None  # image prompts: pdserve.epd.mm.MultimodalInput (input_ids already expanded)
    routed_dp_rank: int | None = None  # the data parallel replica asked for; None: the client picks
    # A migrated stream (pdserve extension `resume_output_ids`): tokens another server already generated and the
    # client already has. They count as this request's output; only what follows them is generated here.
    resume_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class FinishReason:
    type: str  # stop | length | abort
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None

    def to_sglang(self) -> dict[str, object]:
        """SGLang's meta_info.finish_reason object."""
        if self.type == "length":
            return {"type": "length", "length": self.length}
        if self.type == "stop":
            return {"type": "stop", "matched": self.matched}
        return {"type": "abort", "message": self.message or "aborted"}


@dataclass(frozen=True)
class GenChunk:
    """What one engine output adds to a request (token fields are per chunk, text is cumulative)."""

    rid: str
    text: str  # visible text so far
    delta: str  # visible text added by this chunk
    new_ids: list[int]
    new_logprobs: list[TokenLogprob]
    input_logprobs: list[TokenLogprob | None] | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish: FinishReason | None = None
    error: str | None = None  # the engine failed the request
    e2e_latency: float = 0.0


@dataclass
class GenResult:
    """A request's output accumulated from its chunks."""

    rid: str
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    input_logprobs: list[TokenLogprob | None] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish: FinishReason | None = None
    error: str | None = None
    e2e_latency: float = 0.0

    def add(self, c: GenChunk) -> None:
        self.text = c.text
        self.output_ids.extend(c.new_ids)
        self.output_logprobs.extend(c.new_logprobs)
        if c.input_logprobs is not None:
            self.input_logprobs = c.input_logprobs
        self.prompt_tokens, self.cached_tokens = c.prompt_tokens, c.cached_tokens
        self.completion_tokens = c.completion_tokens
        self.finish, self.error, self.e2e_latency = c.finish, c.error, c.e2e_latency


class GenerationService:
    def __init__(
        self, client, tokenizer, metrics: ServerMetrics, context_len: int, vocab_size: int,
        eos_token_ids: Sequence[int], dp_size: int = 1,
    ) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.context_len = context_len
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.dp_size = dp_size  # engine replicas behind the client
        self.active: set[str] = set()  # rids with an open stream in this front
        self.draining = False  # set by a drain: new requests are refused, open ones finish

    @staticmethod
    def new_rid() -> str:
        return uuid.uuid4().hex

    # ---- validation -------------------------------------------------------------------------------------
    def validate(self, inp: GenInput) -> GenInput:
        """Reject what the engine cannot run (400); clamp max_new_tokens to the room left in the context."""
        if not inp.input_ids:
            raise BadRequestError("the prompt is empty", param="prompt")
        if inp.resume_ids:
            if len(inp.resume_ids) >= inp.sampling.max_new_tokens:
                raise BadRequestError(f"resume_output_ids has {len(inp.resume_ids)} tokens: nothing is left of "
                                      f"max_new_tokens={inp.sampling.max_new_tokens}", param="resume_output_ids")
            s = inp.sampling
            inp = replace(inp, sampling=replace(s, max_new_tokens=s.max_new_tokens - len(inp.resume_ids),
                                                min_new_tokens=max(0, s.min_new_tokens - len(inp.resume_ids))))
        n = len(inp.input_ids) + len(inp.resume_ids)
        bad = next((t for t in (*inp.input_ids, *inp.resume_ids) if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise BadRequestError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", "input_ids")
        bad = next((t for t, _ in inp.sampling.logit_bias if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise BadRequestError(f"logit_bias names token id {bad}, outside the vocabulary [0, {self.vocab_size})",
                                  "logit_bias")
        if inp.routed_dp_rank is not None and not 0 <= inp.routed_dp_rank < self.dp_size:
            raise BadRequestError(
                f"routed_dp_rank {inp.routed_dp_rank} is out of range: this server has dp_size {self.dp_size} "
                f"(ranks 0..{self.dp_size - 1})", param="routed_dp_rank",
            )
        room = self.context_len - n
        if room < 0 or (room == 0 and inp.sampling.max_new_tokens > 0):
            raise BadRequestError(
                f"the prompt has {n} tokens, which leaves no room in the model's context length of "
                f"{self.context_len} tokens", param="prompt",
            )
        if inp.return_logprob and not -1 <= inp.logprob_start_len < n:
            raise BadRequestError(f"logprob_start_len must be in [-1, {n}), got {inp.logprob_start_len}",
                                  param="logprob_start_len")
        if inp.sampling.max_new_tokens > room:
            inp = replace(inp, sampling=inp.sampling.with_max_new_tokens(room))
        return inp

    # ---- running ----------------------------------------------------------------------------------------
    async def open(self, inputs: Sequence[GenInput]) -> list[AsyncIterator[GenChunk]]:
        """Start requests and wait for each one's first output, so that a request the engine rejects fails
        here (400) rather than in the middle of a stream. All or nothing."""
        if self.draining:
            raise APIError("this server is draining (shutting down): send the request to another server", status=503)
        inputs = [self.validate(inp) for inp in inputs]
        rids = [inp.rid for inp in inputs]
        if len(set(rids)) != len(rids):
            raise BadRequestError("rid values must be distinct", param="rid")
        taken = next((r for r in rids if r in self.active), None)
        if taken is not None:
            raise BadRequestError(f"a request with rid {taken!r} is already running", param="rid")
        self.active.update(rids)  # claimed now, so a concurrent request cannot take the same rid
        streams = [self._run(inp) for inp in inputs]
        firsts = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
        failure = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failure is not None:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            raise failure
        return [_prepend(first, s) for first, s in zip(firsts, streams)]

    async def _run(self, inp: GenInput) -> AsyncIterator[GenChunk]:
        """The request's chunks; `inp.rid` must already be in `self.active` (released here)."""
        timer = self.metrics.start_request()
        req = GenerateRequest(
            rid=inp.rid, input_ids=(*inp.input_ids, *inp.resume_ids), sampling=inp.sampling, return_logprob=inp.return_logprob,
            top_logprobs_num=inp.top_logprobs_num, logprob_start_len=inp.logprob_start_len, stream=inp.stream,
            bootstrap=inp.bootstrap, mm=inp.mm, routed_dp_rank=inp.routed_dp_rank,
        )
        engine_stream = self.client.generate(req)
        num_resumed = len(inp.resume_ids)
        prompt_tokens, cached, completion, started = len(inp.input_ids), 0, num_resumed, False
        finish: FinishReason | None = None
        try:
            detok = DetokenizeStream(self.tokenizer, inp.input_ids, inp.sampling)
            if num_resumed:
                detok.skip(inp.resume_ids)  # the client has this text already: only what follows is sent
            while finish is None:
                out, error = await self._next_output(engine_stream, inp.rid, started)
                started = True
                completion = max(completion + len(out.new_token_ids), num_resumed + out.completion_tokens)
                if not num_resumed:  # else the engine's prompt includes the resumed tokens
                    prompt_tokens = out.prompt_tokens or prompt_tokens
                cached = min(max(cached, out.cached_tokens), prompt_tokens)
                timer.on_tokens(len(out.new_token_ids))
                finish = self._finish_reason(out, error, completion)
                stop_token = self._stop_token(out, finish)
                delta = detok.feed(out.new_token_ids, finished=finish is not None, stop_token=stop_token)
                if finish is None and detok.matched_stop is not None:
                    # The front saw the stop string first: end here; closing the stream aborts in the engine.
                    finish = FinishReason("stop", matched=detok.matched_stop)
                    delta += detok.feed([], finished=True)
                yield GenChunk(
                    rid=inp.rid, text=detok.text, delta=delta, new_ids=list(out.new_token_ids),
                    new_logprobs=list(out.new_logprobs or ()), input_logprobs=out.input_logprobs,
                    prompt_tokens=prompt_tokens, cached_tokens=cached, completion_tokens=completion,
                    finish=finish, error=error, e2e_latency=timer.elapsed(),
                )
        finally:
            self.active.discard(inp.rid)
            await engine_stream.aclose()
            aborted = finish is None or finish.type == "abort"
            timer.on_finish(prompt_tokens if started else 0, completion, cached, aborted)

    @staticmethod
    async def _next_output(engine_stream: AsyncIterator[RequestOutput], rid: str,
                           started: bool) -> tuple[RequestOutput, str | None]:
        """The engine's next output, or a stand-in with an error for whatever went wrong getting it."""
        try:
            out = await engine_stream.__anext__()
        except StopAsyncIteration:
            return RequestOutput(rid, []), "the engine ended the request without a finish reason"
        except ValueError as e:  # the engine client rejects a request before its first output
            if not started:
                raise BadRequestError(str(e)) from None
            return RequestOutput(rid, []), f"engine error: {e}"
        except Exception as e:  # the engine client failed (e.g. the engine process died)
            logger.exception("request %s failed in the engine client", rid)
            return RequestOutput(rid, []), f"engine error: {type(e).__name__}: {e}"
        return out, out.error

    @staticmethod
    def _finish_reason(out: RequestOutput, error: str | None, completion: int) -> FinishReason | None:
        if error is not None:
            return FinishReason("abort", message=error)
        if out.finish_reason is None:
            return None
        if out.finish_reason == "length":
            return FinishReason("length", length=completion)
        if out.finish_reason == "stop":
            return FinishReason("stop", matched=out.matched_stop)
        return FinishReason("abort", message="aborted")

    def _stop_token(self, out: RequestOutput, finish: FinishReason | None) -> int | None:
        """The token id that ended the request (its text is not shown), if any."""
        if finish is None or finish.type != "stop" or not out.new_token_ids:
            return None
        last = out.new_token_ids[-1]
        if finish.matched == last or (finish.matched is None and last in self.eos_token_ids):
            return last
        return None


async def _prepend(first: GenChunk, rest: AsyncIterator[GenChunk]) -> AsyncIterator[GenChunk]:
    async with aclosing(rest):
        yield first
        if first.finish is None:
            async for chunk in rest:
                yield chunk


async def collect(stream: AsyncIterator[GenChunk], rid: str, resumed: Sequence[int] = ()) -> GenResult:
    result = GenResult(rid, output_ids=list(resumed))
    async with aclosing(stream):
        async for chunk in stream:
            result.add(chunk)
    return result


_END = object()


async def merge(streams: Sequence[AsyncIterator[GenChunk]]) -> AsyncIterator[tuple[int, GenChunk]]:
    """Interleave several streams as (index, chunk); closing the merge closes (aborts) them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for chunk in only:
                yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[GenChunk]) -> None:
        try:
            async with aclosing(s):
                async for chunk in s:
                    queue.put_nowait((i, chunk))
        except Exception as e:  # a bug, not an engine error (those arrive as chunks)
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
