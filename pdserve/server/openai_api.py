"""OpenAI-compatible /v1/completions, /v1/chat/completions and /v1/models on top of GenerationService."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from pdserve.disagg.messages import BootstrapInfo
from pdserve.engine.messages import TokenLogprob
from pdserve.epd.front import MultimodalFront
from pdserve.server.errors import BadRequestError, EngineError
from pdserve.server.generation import GenChunk, GenerationService, GenInput, GenResult, collect, merge
from pdserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAICommon,
    parse_chat,
    sampling_for_choice,
)
from pdserve.server.streaming import SSE_DONE, json_response, sse_error, sse_event, sse_response, unless_disconnected
from pdserve.server.tokenization import PromptEncoder

_DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class _Choice:
    """One generated sequence of an OpenAI request: which prompt it answers and at which choice index."""

    index: int
    prompt_index: int
    input: GenInput


def _finish(result: GenChunk | GenResult) -> tuple[str | None, int | str | None]:
    if result.finish is None:
        return None, None
    return result.finish.type, result.finish.matched


def _usage(prompts: Sequence[Sequence[int]], choices: Sequence[_Choice], completion: Sequence[int],
           cached: Sequence[int]) -> dict[str, object]:
    """Each prompt counts once however many choices it has; cached tokens likewise (the most any choice hit)."""
    prompt_tokens, completion_tokens = sum(len(p) for p in prompts), sum(completion)
    per_prompt: dict[int, int] = {}
    for c, n in zip(choices, cached):
        per_prompt[c.prompt_index] = max(per_prompt.get(c.prompt_index, 0), n)
    return {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(per_prompt.values())},
    }


def _bootstrap_of(common: OpenAICommon, index: int, num_choices: int) -> BootstrapInfo | None:
    """The PD fields of one choice: the request's, or its entry of SGLang's list form."""
    if not common.bootstrap_per_choice:
        if common.bootstrap is not None and num_choices > 1:  # the prefill would refuse the second use of the room
            raise BadRequestError(f"{num_choices} prompts with PD disaggregation need one bootstrap_room each "
                                  "(a list)", param="bootstrap_room")
        return common.bootstrap
    if len(common.bootstrap_per_choice) != num_choices:
        raise BadRequestError(f"bootstrap_room has {len(common.bootstrap_per_choice)} entries for {num_choices} "
                              "choices (prompts x n)", param="bootstrap_room")
    return common.bootstrap_per_choice[index]


@dataclass(frozen=True)
class PDRole:
    """This server's place in PD: what vLLM's kv_transfer_params need."""

    mode: str = "null"  # --disaggregation-mode
    bootstrap_host: str = ""  # a prefill's bootstrap server, as others reach it
    bootstrap_port: int = 0
    engine_id: str = ""
    tp_size: int = 1


class OpenAIServing:
    def __init__(self, gen: GenerationService, encoder: PromptEncoder, served_model_name: str, strict_model: bool,
                 mm: MultimodalFront | None = None, aliases: tuple[str, ...] = (), pd: PDRole = PDRole()):
        self.pd = pd
        self.mm = mm
        self.gen = gen
        self.encoder = encoder
        self.model_name = served_model_name
        self.strict_model = strict_model  # --served-model-name given: other model names are rejected
        self.accepted_names = {served_model_name, *aliases}  # the served name, or the model's path

    def models(self) -> dict[str, object]:
        return {
            "object": "list",
            "data": [{
                # "sglang": SMG and other tools detect the runtime from owned_by
                "id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "sglang",
                "root": self.model_name, "max_model_len": self.gen.context_len,
            }],
        }

    def _check_model(self, common: OpenAICommon) -> None:
        if self.strict_model and common.model is not None and common.model not in self.accepted_names:
            raise BadRequestError(f"the model {common.model!r} does not exist; this server serves {self.model_name!r}",
                                  param="model")

    def _choices(self, common: OpenAICommon, prompts: list[list[int]], default_max: int | None,
                 logprobs: int | None, logprob_start_len: int = -1, mm: object = None) -> list[_Choice]:
        sampling = common.sampling
        if common.max_tokens is None and default_max is not None:
            sampling = sampling.with_max_new_tokens(default_max)
        base = common.rid or self.gen.new_rid()
        total = len(prompts) * common.n
        kv_bootstrap = self._kv_transfer_bootstrap(common, total) if common.kv_transfer is not None else None
        if common.resume_ids and total > 1:
            raise BadRequestError("resume_output_ids continues one sequence: give one prompt and n = 1",
                                  param="resume_output_ids")
        choices = []
        for p, ids in enumerate(prompts):
            for i in range(common.n):
                index = p * common.n + i
                choices.append(_Choice(index, p, GenInput(
                    rid=base if total == 1 else f"{base}-{index}", input_ids=ids,
                    sampling=sampling_for_choice(sampling, i), return_logprob=logprobs is not None,
                    top_logprobs_num=logprobs or 0, logprob_start_len=logprob_start_len, stream=common.stream,
                    bootstrap=kv_bootstrap or _bootstrap_of(common, index, total), mm=mm,
                    # a held room lives on dp rank room % dp_size, where its decode looks for it
                    routed_dp_rank=None if kv_bootstrap is not None and kv_bootstrap.hold_kv else common.routed_dp_rank,
                    resume_ids=common.resume_ids,
                )))
        return choices

    def _kv_transfer_bootstrap(self, common: OpenAICommon, total: int) -> BootstrapInfo:
        """vLLM's PD protocol: a prefill (do_remote_decode) holds the KV under a fresh room; a decode
        (do_remote_prefill) claims it from the prefill its params name."""
        kvt = common.kv_transfer
        assert kvt is not None
        flag, want = ("do_remote_decode", "prefill") if kvt.do_remote_decode else ("do_remote_prefill", "decode")
        if self.pd.mode != want:
            raise BadRequestError(f"kv_transfer_params.{flag} needs a {want} server (--disaggregation-mode {want}); "
                                  f"this server's mode is {self.pd.mode!r}", param="kv_transfer_params")
        if total != 1 or common.bootstrap is not None or common.bootstrap_per_choice:
            raise BadRequestError("kv_transfer_params takes one prompt, n = 1 and no bootstrap_* fields",
                                  param="kv_transfer_params")
        if kvt.do_remote_prefill:
            return BootstrapInfo(kvt.remote_host, kvt.remote_port, kvt.remote_bootstrap_room)  # type: ignore[arg-type]
        if common.stream:
            raise BadRequestError("kv_transfer_params.do_remote_decode is answered with kv_transfer_params in one "
                                  "JSON body: send it with stream false", param="stream")
        return BootstrapInfo(None, None, secrets.randbits(63), hold_kv=True)

    def _kv_transfer_answer(self, choices: Sequence[_Choice]) -> dict[str, object]:
        """A prefill-first answer's kv_transfer_params: where the decode claims the KV (vLLM's names)."""
        b = choices[0].input.bootstrap
        if b is None or not b.hold_kv:
            return {}
        return {"kv_transfer_params": {
            "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.pd.engine_id,
            "remote_host": self.pd.bootstrap_host, "remote_port": self.pd.bootstrap_port,
            "remote_bootstrap_room": b.room, "tp_size": self.pd.tp_size}}

    # ---- /tokenize, /detokenize (vLLM's; KV-aware routers such as vllm-router tokenize through them) ----------
    def tokenize(self, body: dict) -> dict[str, object]:
        """A prompt (`prompt`; `add_special_tokens`, default true) or a conversation (`messages`, through the chat
        template) -> the token ids this server computes for it."""
        if "messages" in body:
            req = parse_chat({"messages": body["messages"], "chat_template_kwargs": body.get("chat_template_kwargs")})
            tokens = self.encoder.encode_chat(req.messages, req.chat_template_kwargs)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise BadRequestError("prompt must be a string (or give messages)", param="prompt")
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise BadRequestError("add_special_tokens must be a boolean", param="add_special_tokens")
            tokens = self.encoder.encode_text(prompt, add_special_tokens=special)
        return {"count": len(tokens), "max_model_len": self.gen.context_len, "tokens": tokens, "token_strs": None}

    def detokenize(self, body: dict) -> dict[str, object]:
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.gen.vocab_size for t in tokens):
            raise BadRequestError(f"tokens must be a list of token ids in [0, {self.gen.vocab_size})", param="tokens")
        return {"prompt": self.gen.tokenizer.decode(tokens)}

    # ---- /v1/completions --------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self._check_model(req.common)
        prompts = [self.encoder.encode_text(p) if isinstance(p, str) else p for p in req.prompts]
        echo_logprobs = req.echo and req.logprobs is not None
        choices = self._choices(req.common, prompts, _DEFAULT_COMPLETION_MAX_TOKENS, req.logprobs,
                                logprob_start_len=0 if echo_logprobs else -1)
        prompt_texts = [p if isinstance(p, str) else self.gen.tokenizer.decode(p) for p in req.prompts]
        rid = f"cmpl-{choices[0].input.rid}"
        created = int(time.time())
        streams = await self.gen.open([c.input for c in choices])
        if req.common.stream:
            return sse_response(self._completion_events(req, choices, streams, prompts, prompt_texts, rid, created))
        results = await unless_disconnected(request, asyncio.gather(*(collect(s, c.input.rid, c.input.resume_ids)
                                                                      for s, c in zip(streams, choices))))
        _raise_on_error(results)
        out = []
        for c, r in zip(choices, results):
            text = (prompt_texts[c.prompt_index] if req.echo else "") + r.text
            lp = None
            if req.logprobs is not None:
                lp = self._completion_logprobs(
                    (r.input_logprobs or []) if echo_logprobs else [], prompts[c.prompt_index] if echo_logprobs else [],
                    r.output_logprobs, req.logprobs,
                )
            reason, matched = _finish(r)
            out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": reason,
                        "matched_stop": matched, **({"token_ids": r.output_ids} if req.common.return_token_ids else {})})
        return json_response({
            "id": rid, "object": "text_completion", "created": created, "model": self.model_name, "choices": out,
            "usage": _usage(prompts, choices, [r.completion_tokens for r in results],
                            [r.cached_tokens for r in results]),
            **self._kv_transfer_answer(choices),
        })

    async def _completion_events(self, req: CompletionRequest, choices: list[_Choice], streams: list,
                                 prompts: list[list[int]], prompt_texts: list[str], rid: str,
                                 created: int) -> AsyncIterator[bytes]:
        completion, cached = [0] * len(choices), [0] * len(choices)
        echo_logprobs = req.echo and req.logprobs is not None
        started = [False] * len(choices)
        async with aclosing(merge(streams)) as chunks:
            async for i, chunk in chunks:
                if chunk.error is not None:
                    yield sse_error(chunk.error, 500)
                    break
                c = choices[i]
                completion[i], cached[i] = chunk.completion_tokens, chunk.cached_tokens
                text = chunk.delta
                lp = None
                if req.logprobs is not None:
                    inp = (chunk.input_logprobs or []) if echo_logprobs and not started[i] else []
                    lp = self._completion_logprobs(inp, prompts[c.prompt_index] if inp else [], chunk.new_logprobs,
                                                   req.logprobs)
                if req.echo and not started[i]:
                    text = prompt_texts[c.prompt_index] + text
                started[i] = True
                reason, matched = _finish(chunk)
                with_ids = req.common.return_token_ids and bool(chunk.new_ids)
                if not text and lp is None and reason is None and not with_ids:
                    continue
                choice = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": reason}
                if req.common.return_token_ids:
                    choice["token_ids"] = chunk.new_ids
                if reason is not None:
                    choice["matched_stop"] = matched
                yield sse_event({"id": rid, "object": "text_completion", "created": created,
                                 "model": self.model_name, "choices": [choice],
                                 **({"usage": None} if req.common.include_usage else {})})
            else:
                if req.common.include_usage:
                    yield sse_event({"id": rid, "object": "text_completion", "created": created,
                                     "model": self.model_name, "choices": [],
                                     "usage": _usage(prompts, choices, completion, cached)})
        yield SSE_DONE

    def _completion_logprobs(self, input_lps: Sequence[TokenLogprob | None], prompt_ids: Sequence[int],
                             output_lps: Sequence[TokenLogprob], top: int) -> dict[str, object]:
        """The legacy completions logprobs object (prompt entries first when echoing)."""
        tokens, token_lps, tops = [], [], []
        skip = len(prompt_ids) - len(input_lps)
        for k, lp in enumerate(input_lps):
            tok = lp.token_id if lp is not None else prompt_ids[skip + k]
            tokens.append(self.encoder.token_text(tok))
            token_lps.append(lp.logprob if lp is not None else None)
            tops.append(self._top_map(lp.top, top) if lp is not None and top else None)
        for lp in output_lps:
            tokens.append(self.encoder.token_text(lp.token_id))
            token_lps.append(lp.logprob)
            tops.append(self._top_map(lp.top, top) if top else None)
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops if top else None,
                "text_offset": offsets}

    def _top_map(self, top_list: Sequence[tuple[int, float]], k: int) -> dict[str, float]:
        return {self.encoder.token_text(t): lp for t, lp in top_list[:k]}

    # ---- /v1/chat/completions ---------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(req.common)
        prompt = self.encoder.encode_chat(req.messages, req.chat_template_kwargs)
        mm = None
        if req.images:
            if self.mm is None:
                raise BadRequestError("this server takes no images", param="messages")
            if req.common.n > 1 and self.mm.config.language_only:
                raise BadRequestError("n > 1 is not supported for image requests on EPD servers", param="n")
            prompt, mm = await self.mm.prepare(prompt, list(req.images), req.common.epd, param="messages")
        # max_tokens unset: the rest of the context (GenerationService clamps the placeholder).
        choices = self._choices(req.common, [prompt], None, req.top_logprobs if req.logprobs else None, mm=mm)
        rid = f"chatcmpl-{choices[0].input.rid}"
        created = int(time.time())
        streams = await self.gen.open([c.input for c in choices])
        if req.common.stream:
            return sse_response(self._chat_events(req, choices, streams, prompt, rid, created))
        results = await unless_disconnected(request, asyncio.gather(*(collect(s, c.input.rid, c.input.resume_ids)
                                                                      for s, c in zip(streams, choices))))
        _raise_on_error(results)
        out = []
        for c, r in zip(choices, results):
            reason, matched = _finish(r)
            out.append({
                "index": c.index, "message": {"role": "assistant", "content": r.text},
                "logprobs": self._chat_logprobs(r.output_logprobs, req.top_logprobs) if req.logprobs else None,
                "finish_reason": reason, "matched_stop": matched,
                **({"token_ids": r.output_ids} if req.common.return_token_ids else {}),
            })
        return json_response({
            "id": rid, "object": "chat.completion", "created": created, "model": self.model_name, "choices": out,
            "usage": _usage([prompt], choices, [r.completion_tokens for r in results],
                            [r.cached_tokens for r in results]),
            **self._kv_transfer_answer(choices),
        })

    async def _chat_events(self, req: ChatCompletionRequest, choices: list[_Choice], streams: list,
                           prompt: list[int], rid: str, created: int) -> AsyncIterator[bytes]:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        usage_field = {"usage": None} if req.common.include_usage else {}
        completion, cached = [0] * len(choices), [0] * len(choices)
        for c in choices if not req.common.resume_ids else ():  # the role first (a migrated stream sent it already)
            yield sse_event({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}], **usage_field})
        async with aclosing(merge(streams)) as chunks:
            async for i, chunk in chunks:
                if chunk.error is not None:
                    yield sse_error(chunk.error, 500)
                    break
                completion[i], cached[i] = chunk.completion_tokens, chunk.cached_tokens
                reason, matched = _finish(chunk)
                lps = self._chat_logprobs(chunk.new_logprobs, req.top_logprobs) if req.logprobs else None
                with_ids = req.common.return_token_ids and bool(chunk.new_ids)
                if not chunk.delta and reason is None and not (lps and lps["content"]) and not with_ids:
                    continue
                choice = {"index": choices[i].index, "delta": {"content": chunk.delta} if chunk.delta else {},
                          "logprobs": lps, "finish_reason": reason}
                if req.common.return_token_ids:
                    choice["token_ids"] = chunk.new_ids
                if reason is not None:
                    choice["matched_stop"] = matched
                yield sse_event({**head, "choices": [choice], **usage_field})
            else:
                if req.common.include_usage:
                    yield sse_event({**head, "choices": [], "usage": _usage([prompt], choices, completion, cached)})
        yield SSE_DONE

    def _chat_logprobs(self, lps: Sequence[TokenLogprob], top: int) -> dict[str, object]:
        def entry(token_id: int, logprob: float) -> dict[str, object]:
            text = self.encoder.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top[:top]]} for lp in lps
        ]}


def _raise_on_error(results: Sequence[GenResult]) -> None:
    failed = next((r for r in results if r.error is not None), None)
    if failed is not None:
        raise EngineError(f"request {failed.rid} failed: {failed.error}")

