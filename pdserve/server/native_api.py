"""SGLang-native POST /generate: single or batch, streamed (cumulative SSE chunks) or not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import Response

from pdserve.engine.messages import TokenLogprob
from pdserve.epd.front import MultimodalFront
from pdserve.server.errors import BadRequestError, EngineError
from pdserve.server.generation import GenerationService, GenInput, GenResult, collect, merge
from pdserve.server.protocol import GenerateItem, GenerateReqInput, bootstrap_info
from pdserve.server.streaming import SSE_DONE, json_response, sse_error, sse_event, sse_response, unless_disconnected
from pdserve.server.tokenization import PromptEncoder


class NativeServing:
    def __init__(self, gen: GenerationService, encoder: PromptEncoder, mm: MultimodalFront | None = None) -> None:
        self.gen = gen
        self.encoder = encoder
        self.mm = mm

    async def _input(self, item: GenerateItem, stream: bool, epd: object) -> GenInput:
        ids = item.input_ids if item.input_ids is not None else self.encoder.encode_text(item.text or "")
        mm = None
        if self.mm is not None:
            ids, mm = await self.mm.prepare(list(ids), list(item.image_data), epd)
        elif item.image_data:
            raise BadRequestError("this server takes no images", param="image_data")
        return GenInput(
            rid=item.rid or self.gen.new_rid(), input_ids=ids, sampling=item.sampling,
            return_logprob=item.return_logprob, top_logprobs_num=item.top_logprobs_num,
            logprob_start_len=item.logprob_start_len, stream=stream,
            bootstrap=bootstrap_info(item.bootstrap_host, item.bootstrap_port, item.bootstrap_room,
                                     item.disagg_prefill_dp_rank), mm=mm,
            routed_dp_rank=item.routed_dp_rank, resume_ids=item.resume_ids,
        )

    async def generate(self, req: GenerateReqInput, request: Request) -> Response:
        inputs = [await self._input(item, req.stream, req.extra.get("epd")) for item in req.items]
        streams = await self.gen.open(inputs)
        if req.stream:
            return sse_response(self._events(req, inputs, streams))
        results = await unless_disconnected(request, asyncio.gather(*(collect(s, i.rid, i.resume_ids)
                                                                      for s, i in zip(streams, inputs))))
        failed = next((r for r in results if r.error is not None), None)
        if failed is not None:
            raise EngineError(f"request {failed.rid} failed: {failed.error}")
        out = [self._response(req, inp, r) for inp, r in zip(inputs, results)]
        return json_response(out if req.is_batch else out[0])

    async def _events(self, req: GenerateReqInput, inputs: list[GenInput], streams: list) -> AsyncIterator[bytes]:
        results = [GenResult(inp.rid, output_ids=list(inp.resume_ids)) for inp in inputs]
        async with aclosing(merge(streams)) as chunks:
            async for i, chunk in chunks:
                if chunk.error is not None:
                    yield sse_error(f"request {chunk.rid} failed: {chunk.error}", 500)
                    break
                results[i].add(chunk)
                if not chunk.delta and not chunk.new_ids and chunk.finish is None:
                    continue
                body = self._response(req, inputs[i], results[i])
                if req.is_batch:
                    body["index"] = i
                yield sse_event(body)
        yield SSE_DONE

    def _response(self, req: GenerateReqInput, inp: GenInput, r: GenResult) -> dict[str, object]:
        meta: dict[str, object] = {
            "id": inp.rid,
            "finish_reason": r.finish.to_sglang() if r.finish is not None else None,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "cached_tokens": r.cached_tokens,
            "e2e_latency": r.e2e_latency,
        }
        if inp.return_logprob:
            with_text = req.return_text_in_logprobs
            in_lps = r.input_logprobs or []
            # Entries without a logprob (the first prompt token) still name their token.
            in_ids = inp.input_ids[len(inp.input_ids) - len(in_lps):] if in_lps else []
            meta["input_token_logprobs"] = [
                self._entry(lp.logprob if lp else None, lp.token_id if lp else tok, with_text)
                for lp, tok in zip(in_lps, in_ids)
            ]
            meta["output_token_logprobs"] = [self._entry(lp.logprob, lp.token_id, with_text)
                                             for lp in r.output_logprobs]
            if inp.top_logprobs_num > 0:
                meta["input_top_logprobs"] = [self._top(lp, inp.top_logprobs_num, with_text) if lp else None
                                              for lp in in_lps]
                meta["output_top_logprobs"] = [self._top(lp, inp.top_logprobs_num, with_text)
                                               for lp in r.output_logprobs]
        return {"text": r.text, "output_ids": list(r.output_ids), "meta_info": meta}

    def _entry(self, logprob: float | None, token_id: int, with_text: bool) -> list[object]:
        """SGLang's [logprob, token_id, text-or-None] triple."""
        return [logprob, token_id, self.encoder.token_text(token_id) if with_text else None]

    def _top(self, lp: TokenLogprob, k: int, with_text: bool) -> list[list[object]]:
        return [self._entry(v, t, with_text) for t, v in lp.top[:k]]
