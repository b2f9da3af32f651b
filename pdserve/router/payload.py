"""Request and response bodies as the router sees them: JSON objects it reads only to route (prompt text),
to inject the PD bootstrap fields, and to merge the prefill's input logprobs into the decode's answer."""

from __future__ import annotations

import random

import orjson

GENERATE, COMPLETIONS, CHAT = "generate", "completions", "chat"
_SSE_ERROR = b'data: {"error"'


class BadRequest(Exception):
    """The client's body cannot be routed (400)."""


def parse_object(raw: bytes) -> dict:
    if not raw.strip():
        raise BadRequest("the request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _ids_text(ids: object) -> str | None:
    """Token ids as one character each, so that the character tree also works on pre-tokenized prompts."""
    try:
        return "".join(map(chr, ids))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None


def _prompt_text(v: object) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v:
        first = v[0]
        if isinstance(first, str):
            return first  # a batch is routed as a whole, by its first prompt
        if isinstance(first, int):
            return _ids_text(v)
        if isinstance(first, list):
            return _ids_text(first)
    return None


def routing_text(kind: str, body: dict) -> str | None:
    """The text cache-aware routing keys on (None when there is none)."""
    if kind == GENERATE:
        return _prompt_text(body["text"]) if body.get("text") is not None else _prompt_text(body.get("input_ids"))
    if kind == COMPLETIONS:
        return _prompt_text(body.get("prompt"))
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    parts = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts)


def batch_size(kind: str, body: dict) -> int | None:
    """Number of prompts of a batched /generate request; None for a single one."""
    if kind != GENERATE:
        return None
    text = body.get("text")
    if isinstance(text, list):
        return len(text)
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return len(ids)
    return None


def inject_bootstrap(body: dict, host: str, port: int | None, batch: int | None) -> bytes:
    """Sets bootstrap_host/port/room (fresh random 63-bit rooms; one per prompt of a batch) and serializes."""
    if batch is None:
        body["bootstrap_host"], body["bootstrap_port"] = host, port
        body["bootstrap_room"] = random.getrandbits(63)
    else:
        body["bootstrap_host"], body["bootstrap_port"] = [host] * batch, [port] * batch
        body["bootstrap_room"] = [random.getrandbits(63) for _ in range(batch)]
    return orjson.dumps(body)


def kv_transferable(kind: str, body: dict) -> bool:
    """A request that prefill-first dispatch (vLLM's kv_transfer_params) can carry: one OpenAI sequence."""
    if kind not in (COMPLETIONS, CHAT) or body.get("n") not in (None, 1):
        return False
    prompt = body.get("prompt")
    return not (isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) and len(prompt) > 1)


def prefill_first_body(body: dict) -> bytes:
    """The prefill's leg of prefill-first dispatch: one token, not streamed, keeping its KV for the decode."""
    out = {k: v for k, v in body.items()
           if k not in ("stream_options", "max_completion_tokens", "min_tokens", "kv_transfer_params")}
    resumed = body.get("resume_output_ids")  # a migrated stream: the tokens already sent come first
    out.update(max_tokens=1 + (len(resumed) if isinstance(resumed, list) else 0), stream=False,
               kv_transfer_params={"do_remote_decode": True})
    return orjson.dumps(out)


def kv_transfer_answer(raw: bytes) -> dict | None:
    """The kv_transfer_params of a prefill's answer (where the decode claims the KV); None if it has none."""
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
    return params if isinstance(params, dict) and params.get("do_remote_prefill") is True else None


def wants_input_logprobs(kind: str, body: dict) -> bool:
    """A /generate request whose input logprobs come from the prefill (the decode does not compute them)."""
    if kind != GENERATE:
        return False
    v = body.get("return_logprob")
    return any(v) if isinstance(v, list) else bool(v)


def _merge_item(prefill: object, decode: object) -> None:
    try:
        p_lps = prefill["meta_info"]["input_token_logprobs"]  # type: ignore[index]
        d_meta = decode["meta_info"]  # type: ignore[index]
    except (KeyError, TypeError, IndexError):
        return
    if isinstance(p_lps, list):
        d_meta["input_token_logprobs"] = p_lps + (d_meta.get("input_token_logprobs") or [])


def merge_input_logprobs(prefill_body: bytes, decode_body: bytes) -> bytes:
    """Prepend the prefill's meta_info.input_token_logprobs to the decode's (single or batch answers)."""
    try:
        p, d = orjson.loads(prefill_body), orjson.loads(decode_body)
    except orjson.JSONDecodeError:
        return decode_body
    if isinstance(p, list) and isinstance(d, list):
        for pi, di in zip(p, d):
            _merge_item(pi, di)
    else:
        _merge_item(p, d)
    return orjson.dumps(d)


def sse_events(data: bytes) -> list[bytes]:
    """Complete `data: ...` payloads of an SSE body."""
    return [e[6:] for e in data.split(b"\n\n") if e.startswith(b"data: ")]


def is_sse_error(chunk: bytes) -> bool:
    return chunk.startswith(_SSE_ERROR)


def sse_error_status(event_payload: bytes, default: int = 500) -> int:
    try:
        code = orjson.loads(event_payload)["error"]["code"]
        return code if isinstance(code, int) and 400 <= code < 600 else default
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return default


class StreamLogprobMerger:
    """Rewrites decode SSE events to carry the prefill's input logprobs (per batch `index`)."""

    def __init__(self, prefill_stream: bytes) -> None:
        self.inputs: dict[int, list] = {}
        for payload in sse_events(prefill_stream):
            try:
                ev = orjson.loads(payload)
                lps = ev["meta_info"]["input_token_logprobs"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            self.inputs.setdefault(ev.get("index", 0), lps)
        self._buf = b""

    def feed(self, chunk: bytes) -> bytes:
        self._buf += chunk
        *events, self._buf = self._buf.split(b"\n\n")
        return b"".join(self._event(e) + b"\n\n" for e in events)

    def flush(self) -> bytes:
        rest, self._buf = self._buf, b""
        return rest

    def _event(self, e: bytes) -> bytes:
        if not e.startswith(b"data: {"):
            return e
        try:
            ev = orjson.loads(e[6:])
            meta = ev["meta_info"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return e
        lps = self.inputs.get(ev.get("index", 0))
        if lps is None:
            return e
        meta["input_token_logprobs"] = lps + (meta.get("input_token_logprobs") or [])
        return b"data: " + orjson.dumps(ev)


_PENALTIES = (("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("repetition_penalty", 1.0))


def _has_images(body: dict) -> bool:
    if body.get("image_data") or body.get("epd"):
        return True
    messages = body.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") != "text" for p in m["content"]) for m in messages)


def migratable(kind: str, body: dict | None) -> bool:
    """A stream the router can continue on another pair if its decode dies: one sequence, streamed, no logprobs
    (they are not re-sent), no images, no echo, no penalties (they count the tokens a server generated itself,
    so a continuation would weigh them differently)."""
    if body is None or body.get("stream") is not True or _has_images(body):
        return False
    sampling = (body.get("sampling_params") or {}) if kind == GENERATE else body
    if not isinstance(sampling, dict) or any(sampling.get(k, neutral) not in (None, neutral)
                                             for k, neutral in _PENALTIES):
        return False
    if kind == GENERATE:
        return batch_size(kind, body) is None and not body.get("return_logprob")
    prompt = body.get("prompt")
    if kind == COMPLETIONS and isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            return False  # several prompts: several sequences
    return (body.get("n") in (None, 1) and not body.get("logprobs") and not body.get("echo")
            and body.get("top_logprobs") is None)


class StreamTracker:
    """Reads a relayed SSE stream event by event, for stream migration: the token ids sent so far and whether
    the answer finished. Only complete events are passed on (a half event of a stream that breaks is dropped,
    and its tokens are regenerated). Removes the `token_ids` the router asked for when the client did not, and
    gives a continuation (OpenAI) the first stream's `id`."""

    def __init__(self, kind: str, strip_token_ids: bool) -> None:
        self.kind, self.strip = kind, strip_token_ids
        self.ids: list[int] = []
        self.finished = False
        self.stream_id: object = None
        self.server_error: bytes | None = None  # a 5xx error event: the stream failed there (held back)
        self._buf = b""

    def feed(self, chunk: bytes) -> bytes:
        self._buf += chunk
        *events, self._buf = self._buf.split(b"\n\n")
        return b"".join(out + b"\n\n" for out in map(self._event, events) if out is not None)

    def flush(self) -> bytes:
        """What is left at the end of the stream (an event without its closing blank line)."""
        rest, self._buf = self._buf, b""
        return rest if self.server_error is None else b""

    def restart(self) -> None:
        """A new upstream stream continues this one."""
        self._buf, self.server_error = b"", None

    def _event(self, e: bytes) -> bytes | None:
        if self.server_error is not None:
            return None  # after a server's error event (its [DONE]): the stream continues elsewhere
        if not e.startswith(b"data: {"):
            return e
        try:
            ev = orjson.loads(e[6:])
        except orjson.JSONDecodeError:
            return e
        if not isinstance(ev, dict):
            return e
        if "error" in ev:
            if sse_error_status(e[6:]) >= 500 and not self.finished:
                self.server_error = e[6:]
                return None
            return e
        if self.kind == GENERATE:
            ids = ev.get("output_ids")
            if isinstance(ids, list):
                self.ids = ids  # cumulative
            meta = ev.get("meta_info")
            self.finished = self.finished or (isinstance(meta, dict) and meta.get("finish_reason") is not None)
            return e
        changed = False
        if self.stream_id is None:
            self.stream_id = ev.get("id")
        elif ev.get("id") != self.stream_id:
            ev["id"], changed = self.stream_id, True
        choices = ev.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            ids = choice.pop("token_ids", None) if self.strip else choice.get("token_ids")
            changed = changed or (self.strip and ids is not None)
            if isinstance(ids, list):
                self.ids.extend(ids)
            self.finished = self.finished or choice.get("finish_reason") is not None
        return b"data: " + orjson.dumps(ev) if changed else e
