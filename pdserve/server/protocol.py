"""Typed request parsing and validation: JSON bodies in, frozen dataclasses out (SGLang / OpenAI field names).

Every problem raises BadRequestError with a message naming the field. Unknown fields are ignored (kept in
`extra`), since routers add their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from pdserve.disagg.messages import BootstrapInfo
from pdserve.engine.messages import ProfileRequest
from pdserve.sampling_params import SamplingParams
from pdserve.server.errors import BadRequestError

T = TypeVar("T")

MAX_N = 128
MAX_TOP_LOGPROBS = 20
_UNSET_MAX_TOKENS = 1 << 30  # placeholder; replaced once the prompt length is known
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


# ---- small typed getters ------------------------------------------------------------------------------
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_int_list(v: object) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


def _get_int(d: dict, key: str, default: int | None = None) -> int | None:
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v) or not -(2**63) <= v < 2**63:
        raise BadRequestError(f"{key} must be a 64-bit integer, got {v!r}", param=key)
    return v


def _get_bool(d: dict, key: str, default: bool = False) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequestError(f"{key} must be a boolean, got {v!r}", param=key)
    return v


def _get_str(d: dict, key: str) -> str | None:
    v = d.get(key)
    if v is not None and not isinstance(v, str):
        raise BadRequestError(f"{key} must be a string, got {v!r}", param=key)
    return v


def _get_dict(d: dict, key: str) -> dict:
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise BadRequestError(f"{key} must be an object, got {v!r}", param=key)
    return v


def _sampling(d: dict, param: str | None) -> SamplingParams:
    try:
        return SamplingParams.from_dict(d)
    except (ValueError, TypeError) as e:
        raise BadRequestError(str(e), param=param) from None


def require_object(body: object) -> dict:
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object")
    return body


# ---- SGLang native /generate ---------------------------------------------------------------------------
_NATIVE_FIELDS = frozenset({
    "text", "input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len", "top_logprobs_num",
    "return_text_in_logprobs", "stream", "bootstrap_host", "bootstrap_port", "bootstrap_room", "image_data",
    *("routed_dp_rank", "data_parallel_rank", "disagg_prefill_dp_rank", "resume_output_ids"),
})
IMAGE_SENTINEL = "\ufffcimage\ufffc"  # an image part inside a flattened chat message (pdserve/epd/front.py)


@dataclass(frozen=True)
class GenerateItem:
    """One prompt of a (possibly batched) /generate request."""

    text: str | None
    input_ids: list[int] | None
    sampling: SamplingParams
    rid: str | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    image_data: tuple[str, ...] = ()  # images (URL, file path, data URI / base64), in placeholder order
    routed_dp_rank: int | None = None  # the data parallel replica asked for (routed_dp_rank / data_parallel_rank)
    disagg_prefill_dp_rank: int | None = None  # a decode: the prefill dp rank that has the room (SMG)
    resume_ids: tuple[int, ...] = ()  # resume_output_ids: a migrated stream's tokens so far (single prompt only)


@dataclass(frozen=True)
class GenerateReqInput:
    items: list[GenerateItem]
    is_batch: bool = False
    stream: bool = False
    return_text_in_logprobs: bool = False
    extra: dict[str, object] = field(default_factory=dict)  # unknown fields, untouched (router / PD hints)


# Fields a router may send in list form for a single prompt (SGLang's routers wrap PD fields per batch entry).
_LISTABLE_SINGLE = frozenset({"bootstrap_host", "bootstrap_port", "bootstrap_room", "routed_dp_rank",
                              "data_parallel_rank", "disagg_prefill_dp_rank"})


def _per_item(body: dict, key: str, n: int, is_batch: bool, check: Callable[[dict, str], T]) -> list[T]:
    """A field given once for all prompts, or (for a batch) as a list with one value per prompt."""
    v = body.get(key)
    if isinstance(v, list) and (is_batch or (len(v) == 1 and key in _LISTABLE_SINGLE)):
        if len(v) != n:
            raise BadRequestError(f"{key} has {len(v)} entries for {n} prompts", param=key)
        return [check({key: x}, key) for x in v]
    one = check(body, key)
    return [one] * n


def _sampling_entry(d: dict, key: str) -> SamplingParams:
    v = d.get(key)
    if v is not None and not isinstance(v, dict):
        raise BadRequestError(f"{key} must be an object, got {v!r}", param=key)
    return _sampling(v or {}, key)


def _rid_entry(d: dict, key: str) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise BadRequestError(f"{key} must be a non-empty string, got {v!r}", param=key)
    return v


def _int_entry(default: int | None) -> Callable[[dict, str], int | None]:
    return lambda d, key: _get_int(d, key, default)


def parse_generate(body: object) -> GenerateReqInput:
    body = require_object(body)
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise BadRequestError("exactly one of text and input_ids is required")
    texts: list[str | None]
    ids: list[list[int] | None]
    if text is not None:
        if isinstance(text, str):
            texts, is_batch = [text], False
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            texts, is_batch = list(text), True
        else:
            raise BadRequestError("text must be a string or a non-empty list of strings", param="text")
        ids = [None] * len(texts)
    else:
        if is_int_list(input_ids):
            ids, is_batch = [list(input_ids)], False
        elif isinstance(input_ids, list) and input_ids and all(is_int_list(x) for x in input_ids):
            ids, is_batch = [list(x) for x in input_ids], True
        else:
            raise BadRequestError("input_ids must be a list of integers or a list of such lists", param="input_ids")
        texts = [None] * len(ids)
    n = len(texts)
    sampling = _per_item(body, "sampling_params", n, is_batch, _sampling_entry)
    rids = _per_item(body, "rid", n, is_batch, _rid_entry)
    if is_batch and isinstance(body.get("rid"), str):
        rids = [f"{body['rid']}-{i}" for i in range(n)]
    if len({r for r in rids if r is not None}) != len([r for r in rids if r is not None]):
        raise BadRequestError("rid values must be distinct", param="rid")
    return_logprob = _per_item(body, "return_logprob", n, is_batch, lambda d, k: _get_bool(d, k))
    start_len = _per_item(body, "logprob_start_len", n, is_batch, _int_entry(-1))
    top_num = _per_item(body, "top_logprobs_num", n, is_batch, _int_entry(0))
    hosts = _per_item(body, "bootstrap_host", n, is_batch, lambda d, k: _get_str(d, k))
    ports = _per_item(body, "bootstrap_port", n, is_batch, _int_entry(None))
    rooms = _per_item(body, "bootstrap_room", n, is_batch, _int_entry(None))
    routed = _per_item(body, "routed_dp_rank", n, is_batch, _int_entry(None))
    native_dp = _per_item(body, "data_parallel_rank", n, is_batch, _int_entry(None))
    prefill_dp = _per_item(body, "disagg_prefill_dp_rank", n, is_batch, _int_entry(None))
    dp_ranks = [routed_dp_rank(r, d) for r, d in zip(routed, native_dp)]
    resume_ids = resume_output_ids(body)
    if resume_ids and is_batch:
        raise BadRequestError("resume_output_ids is supported with a single prompt only", param="resume_output_ids")
    images = _image_data(body.get("image_data"))
    if images and is_batch:
        raise BadRequestError("image_data is supported with a single prompt only", param="image_data")
    for k in top_num:
        if not 0 <= k <= MAX_TOP_LOGPROBS:
            raise BadRequestError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}], got {k}",
                                  param="top_logprobs_num")
    items = [
        GenerateItem(
            text=texts[i], input_ids=ids[i], sampling=sampling[i], rid=rids[i], return_logprob=return_logprob[i],
            logprob_start_len=start_len[i], top_logprobs_num=top_num[i], bootstrap_host=hosts[i],
            bootstrap_port=ports[i], bootstrap_room=rooms[i], image_data=images, routed_dp_rank=dp_ranks[i],
            disagg_prefill_dp_rank=prefill_dp[i], resume_ids=resume_ids,
        )
        for i in range(n)
    ]
    return GenerateReqInput(
        items=items,
        is_batch=is_batch,
        stream=_get_bool(body, "stream"),
        return_text_in_logprobs=_get_bool(body, "return_text_in_logprobs"),
        extra={k: v for k, v in body.items() if k not in _NATIVE_FIELDS},
    )


def resume_output_ids(body: dict) -> tuple[int, ...]:
    """pdserve's `resume_output_ids` (what a router sends when it migrates a stream): a list of token ids."""
    v = body.get("resume_output_ids")
    if v is None:
        return ()
    if not is_int_list(v):
        raise BadRequestError("resume_output_ids must be a list of token ids", param="resume_output_ids")
    return tuple(v)


def _image_data(v: object) -> tuple[str, ...]:
    """image_data: one image or a list of them (a one-prompt batch's [[...]] is accepted too)."""
    if v is None:
        return ()
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], list):
        v = v[0]
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
        raise BadRequestError("image_data must be an image (URL, file path or data URI) or a list of them",
                              param="image_data")
    return tuple(items)


# ---- OpenAI --------------------------------------------------------------------------------------------
# OpenAI request field -> SGLang sampling field (the SGLang extensions are accepted under their own names).
_OPENAI_SAMPLING = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop", "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos", "skip_special_tokens": "skip_special_tokens", "no_stop_trim": "no_stop_trim",
    "spaces_between_special_tokens": "spaces_between_special_tokens", "logit_bias": "logit_bias",
    "min_tokens": "min_new_tokens",
}


@dataclass(frozen=True)
class OpenAICommon:
    model: str | None
    n: int
    stream: bool
    include_usage: bool
    sampling: SamplingParams  # max_new_tokens is a placeholder until the prompt length is known
    max_tokens: int | None  # None: OpenAI default (completions: 16, chat: the rest of the context)
    rid: str | None
    bootstrap: BootstrapInfo | None = None  # injected by a PD router
    # SGLang's list form (a PD router's n > 1): one entry per choice, in choice order; () when not a list
    bootstrap_per_choice: tuple[BootstrapInfo, ...] = ()
    epd: object = None  # injected by an EPD balancer: where the image embeddings wait (pdserve/epd/front.py)
    routed_dp_rank: int | None = None  # the data parallel replica asked for (routed_dp_rank / data_parallel_rank)
    return_token_ids: bool = False  # vLLM's: each choice (and stream delta) also carries its token ids
    resume_ids: tuple[int, ...] = ()  # resume_output_ids: a migrated stream's tokens so far (n = 1 only)
    kv_transfer: KVTransferParams | None = None  # vLLM's PD protocol


@dataclass(frozen=True)
class KVTransferParams:
    """vLLM's `kv_transfer_params` (NixlConnector's names). A prefill gets do_remote_decode and answers with
    do_remote_prefill plus where its KV waits; the decode gets that answer's params and claims the KV."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_host: str | None = None  # the prefill's bootstrap server
    remote_port: int | None = None
    remote_bootstrap_room: int | None = None  # pdserve's: the room the prefill holds the KV under


def kv_transfer_params(body: dict) -> KVTransferParams | None:
    params = _get_dict(body, "kv_transfer_params")
    if not params:
        return None
    out = KVTransferParams(_get_bool(params, "do_remote_decode"), _get_bool(params, "do_remote_prefill"),
                           _get_str(params, "remote_host"), _get_int(params, "remote_port"),
                           _get_int(params, "remote_bootstrap_room"))
    if out.do_remote_decode and out.do_remote_prefill:
        raise BadRequestError("kv_transfer_params: do_remote_decode and do_remote_prefill exclude each other",
                              param="kv_transfer_params")
    if out.do_remote_prefill and (not out.remote_host or out.remote_port is None or out.remote_bootstrap_room is None):
        raise BadRequestError("kv_transfer_params.do_remote_prefill needs remote_host, remote_port and "
                              "remote_bootstrap_room: pass the prefill's answered kv_transfer_params unchanged",
                              param="kv_transfer_params")
    if out.do_remote_prefill:
        bootstrap_info(out.remote_host, out.remote_port, out.remote_bootstrap_room)  # range checks
    return out if out.do_remote_decode or out.do_remote_prefill else None


def _openai_common(body: dict, max_token_keys: tuple[str, ...]) -> OpenAICommon:
    model = _get_str(body, "model")
    n = _get_int(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise BadRequestError(f"n must be in [1, {MAX_N}], got {n}", param="n")
    max_tokens = None
    for key in max_token_keys:
        v = _get_int(body, key)
        if v is not None:
            if v <= 0:
                raise BadRequestError(f"{key} must be a positive integer, got {v}", param=key)
            max_tokens = v
            break
    sampling_dict = {dst: body[src] for src, dst in _OPENAI_SAMPLING.items() if body.get(src) is not None}
    for tok, bias in _get_dict(body, "logit_bias").items():
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise BadRequestError(f"logit_bias[{tok}] must be a number in [-100, 100], got {bias!r}", "logit_bias")
    sampling_dict["max_new_tokens"] = max_tokens if max_tokens is not None else _UNSET_MAX_TOKENS
    sampling = _sampling(sampling_dict, None)
    stream = _get_bool(body, "stream")
    include_usage = _get_bool(_get_dict(body, "stream_options"), "include_usage")
    fmt = _get_dict(body, "response_format").get("type", "text")
    if fmt != "text":
        raise BadRequestError(f"response_format {fmt!r} is not supported", param="response_format")
    per_choice = _bootstrap_list(body)
    bootstrap = None
    if not per_choice:
        bootstrap = bootstrap_info(_get_str(body, "bootstrap_host"), _get_int(body, "bootstrap_port"),
                                   _get_int(body, "bootstrap_room"), _get_int(body, "disagg_prefill_dp_rank"))
    elif len(per_choice) == 1:
        bootstrap, per_choice = per_choice[0], ()
    if bootstrap is not None and n > 1:
        raise BadRequestError("n > 1 with PD disaggregation needs one bootstrap_room per choice (a list)", param="n")
    dp_rank = routed_dp_rank(_get_int(body, "routed_dp_rank"), _get_int(body, "data_parallel_rank"))
    resume_ids = resume_output_ids(body)
    if resume_ids and n > 1:
        raise BadRequestError("resume_output_ids needs n = 1", param="resume_output_ids")
    return OpenAICommon(model, n, stream, include_usage, sampling, max_tokens, _rid_entry(body, "rid"), bootstrap,
                        per_choice, body.get("epd"), routed_dp_rank=dp_rank,
                        return_token_ids=_get_bool(body, "return_token_ids"), resume_ids=resume_ids,
                        kv_transfer=kv_transfer_params(body))


_BOOTSTRAP_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room", "disagg_prefill_dp_rank")


def _bootstrap_list(body: dict) -> tuple[BootstrapInfo, ...]:
    """SGLang's list-form PD fields (bootstrap_room: [..], host and port as one value or a list of the same
    length): one BootstrapInfo per entry; () when bootstrap_room is not a list."""
    rooms = body.get("bootstrap_room")
    if not isinstance(rooms, list):
        return ()
    if not rooms:
        raise BadRequestError("bootstrap_room must not be an empty list", param="bootstrap_room")
    columns = {}
    for key in _BOOTSTRAP_FIELDS:
        v = body.get(key)
        if isinstance(v, list) and len(v) != len(rooms):
            raise BadRequestError(f"{key} has {len(v)} entries for {len(rooms)} bootstrap rooms", param=key)
        columns[key] = v if isinstance(v, list) else [v] * len(rooms)
    out = []
    for i in range(len(rooms)):
        entry = {key: columns[key][i] for key in _BOOTSTRAP_FIELDS}
        info = bootstrap_info(_get_str(entry, "bootstrap_host"), _get_int(entry, "bootstrap_port"),
                              _get_int(entry, "bootstrap_room"), _get_int(entry, "disagg_prefill_dp_rank"))
        if info is None:
            raise BadRequestError(f"bootstrap_room[{i}] is missing", param="bootstrap_room")
        out.append(info)
    return tuple(out)


def bootstrap_info(host: str | None, port: int | None, room: int | None,
                   prefill_dp_rank: int | None = None) -> BootstrapInfo | None:
    """The PD routing fields of a request, validated (room in [0, 2^63-1])."""
    if room is None:
        return None
    if prefill_dp_rank is not None and not 0 <= prefill_dp_rank < 4096:
        raise BadRequestError(f"disagg_prefill_dp_rank must be in [0, 4096), got {prefill_dp_rank}",
                              param="disagg_prefill_dp_rank")
    if not 0 <= room <= (1 << 63) - 1:
        raise BadRequestError(f"bootstrap_room must be in [0, 2^63-1], got {room}", param="bootstrap_room")
    if port is not None and not 0 < port < 65536:
        raise BadRequestError(f"bootstrap_port must be in 1..65535, got {port}", param="bootstrap_port")
    return BootstrapInfo(host, port, room, prefill_dp_rank)


def routed_dp_rank(routed: int | None, data_parallel_rank: int | None) -> int | None:
    """The data parallel rank a request names: `routed_dp_rank` (SMG injects it) or SGLang's native
    `data_parallel_rank` (both: they must agree). Whether the server has that rank is checked at dispatch.
    SMG's `disagg_prefill_dp_rank` (the prefill's rank, for a decode) goes into BootstrapInfo."""
    for key, v in (("routed_dp_rank", routed), ("data_parallel_rank", data_parallel_rank)):
        if v is not None and v < 0:
            raise BadRequestError(f"{key} must be >= 0, got {v}", param=key)
    if routed is not None and data_parallel_rank is not None and routed != data_parallel_rank:
        raise BadRequestError(f"routed_dp_rank ({routed}) and data_parallel_rank ({data_parallel_rank}) disagree",
                              param="routed_dp_rank")
    return routed if routed is not None else data_parallel_rank


@dataclass(frozen=True)
class CompletionRequest:
    common: OpenAICommon
    prompts: list[str | list[int]]
    echo: bool = False
    logprobs: int | None = None  # number of top logprobs per token; None: no logprobs


def parse_completion(body: object) -> CompletionRequest:
    body = require_object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif is_int_list(prompt) and prompt:
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_int_list(p) for p in prompt):
        prompts = [p if isinstance(p, str) else list(p) for p in prompt]
    else:
        raise BadRequestError("prompt must be a string, a list of strings or a list of token ids", param="prompt")
    logprobs = _get_int(body, "logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise BadRequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}", param="logprobs")
    return CompletionRequest(
        common=_openai_common(body, ("max_tokens",)),
        prompts=prompts,
        echo=_get_bool(body, "echo"),
        logprobs=logprobs,
    )


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    name: str | None = None

    def to_template(self) -> dict[str, str]:
        d = {"role": self.role, "content": self.content}
        if self.name:
            d["name"] = self.name
        return d


@dataclass(frozen=True)
class ChatCompletionRequest:
    common: OpenAICommon
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int = 0
    chat_template_kwargs: dict[str, object] = field(default_factory=dict)
    images: tuple[str, ...] = ()  # image_url parts, in order; each marked by IMAGE_SENTINEL in its message


def _message_content(content: object, i: int, images: list[str]) -> str:
    """A message's text; image_url parts become IMAGE_SENTINEL (their URLs are appended to `images`)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "image_url":
                iu = part.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                if not isinstance(url, str) or not url:
                    raise BadRequestError(f"messages[{i}].content: an image_url part needs image_url.url",
                                          param="messages")
                images.append(url)
                parts.append(IMAGE_SENTINEL)
            else:
                raise BadRequestError(f"messages[{i}].content: only text and image_url parts are supported",
                                      param="messages")
        return "".join(parts)
    raise BadRequestError(f"messages[{i}].content must be a string or a list of parts", param="messages")


def parse_chat(body: object) -> ChatCompletionRequest:
    body = require_object(body)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequestError("messages must be a non-empty list", param="messages")
    messages = []
    images: list[str] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequestError(f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise BadRequestError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                                  param="messages")
        name = m.get("name")
        content = _message_content(m.get("content"), i, images)
        messages.append(ChatMessage(role, content, name if isinstance(name, str) else None))
    logprobs = _get_bool(body, "logprobs")
    top = _get_int(body, "top_logprobs", 0)
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadRequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs")
    if top and not logprobs:
        raise BadRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    return ChatCompletionRequest(
        common=_openai_common(body, ("max_completion_tokens", "max_tokens")),
        messages=messages,
        logprobs=logprobs,
        top_logprobs=top,
        chat_template_kwargs=_get_dict(body, "chat_template_kwargs"),
        images=tuple(images),
    )


def sampling_for_choice(sampling: SamplingParams, index: int) -> SamplingParams:
    """The i-th of n independent samples: seed + i when a seed is set."""
    return sampling if sampling.seed is None or index == 0 else replace(sampling, seed=sampling.seed + index)


@dataclass(frozen=True)
class AbortReq:
    rid: str
    abort_all: bool = False


def parse_profile(body: object, start: bool) -> ProfileRequest:
    """/start_profile's body (SGLang's ProfileReqInput; every field optional, an empty body allowed)."""
    body = require_object(body if body is not None else {})
    activities = body.get("activities")
    if activities is None:
        activities = ["CPU", "GPU"]
    if not isinstance(activities, list) or not all(isinstance(a, str) for a in activities):
        raise BadRequestError("activities must be a list of strings (CPU, GPU, MEM)", param="activities")
    for key in ("start_step", "num_steps"):
        v = _get_int(body, key)
        if v is not None and v < (1 if key == "num_steps" else 0):
            raise BadRequestError(f"{key} must be {'positive' if key == 'num_steps' else '>= 0'}, got {v}", param=key)
    return ProfileRequest(
        start=start, output_dir=_get_str(body, "output_dir"), start_step=_get_int(body, "start_step"),
        num_steps=_get_int(body, "num_steps"), activities=tuple(activities),
        profile_by_stage=_get_bool(body, "profile_by_stage"), with_stack=_get_bool(body, "with_stack"),
        record_shapes=_get_bool(body, "record_shapes"), profile_prefix=_get_str(body, "profile_prefix"),
    )


def parse_abort(body: object) -> AbortReq:
    body = require_object(body)
    rid = _get_str(body, "rid") or ""
    abort_all = _get_bool(body, "abort_all")
    if not rid and not abort_all:
        raise BadRequestError("rid is required (or abort_all: true)", param="rid")
    return AbortReq(rid, abort_all)
