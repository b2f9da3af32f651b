"""Synthetic workloads: random prompts, shared-prefix groups, and the decode/long-prompt interference mix.

Prompts are random words from a list of common English words that BPE tokenizers (Llama, SmolLM2, GPT-2
families) encode as one token each, both after a space and at the start of a prompt (words such as "mountain"
that split there are left out), so N words are N prompt tokens for the default model without needing the
server's tokenizer. The real counts come from the server's `usage` and replace these estimates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pdserve.bench.config import DEFAULT_NUM_PROMPTS, BenchConfig

WORDS = tuple("""
the of and to in is was for on that with as by at from his it an were are which this be or has had not first one
their its new after but who they two her have she been other when time all during there into year also more only
three world city over most used between some school many would may later while where states about him under
national film season these four can part known then team best both before number being through each early well
years high called including since life music work back great game because such war second state five group
general area series family name day make way long people company public country small water light house river power
field law form line book land place sun color story food room order point word hand money road body tree star ship
king moon fire stone paper table window forest bird fish horse dog cat green blue red black white
gold dark bright open close north south east west left right old young good short little large big strong
free full hard simple clear true real human local final major common special
""".split())

KINDS = ("random", "shared-prefix", "decode", "long", "short", "warmup")


@dataclass(frozen=True)
class RequestSpec:
    """One request to send. `prompt_len` is the estimate (words); the server's usage gives the real count."""

    index: int
    kind: str  # one of KINDS
    prompt: str  # completions: the prompt after `system`; chat: the user message
    output_len: int  # max_tokens (exact when ignore_eos is honoured)
    prompt_len: int
    system: str | None = None  # shared-prefix: the group's common prefix (chat: a system message)
    group: int | None = None


def random_text(rng: random.Random, num_tokens: int) -> str:
    return " ".join(rng.choices(WORDS, k=num_tokens))


def sample_len(rng: random.Random, length: int, range_ratio: float) -> int:
    """Uniform in [max(1, int(length * range_ratio)), length], as SGLang's random dataset."""
    return rng.randint(max(1, int(length * range_ratio)), length)


def random_requests(cfg: BenchConfig, rng: random.Random) -> list[RequestSpec]:
    specs = []
    for i in range(cfg.num_prompts or DEFAULT_NUM_PROMPTS):
        n_in = sample_len(rng, cfg.random_input_len, cfg.random_range_ratio)
        n_out = sample_len(rng, cfg.random_output_len, cfg.random_range_ratio)
        specs.append(RequestSpec(i, "random", random_text(rng, n_in), n_out, n_in))
    return specs


def shared_prefix_requests(cfg: BenchConfig, rng: random.Random) -> list[RequestSpec]:
    """num_groups x prompts_per_group requests, shuffled so that the groups interleave in time."""
    pairs = []
    for g in range(cfg.num_groups):
        system = random_text(rng, cfg.system_prompt_len)
        for _ in range(cfg.prompts_per_group):
            pairs.append((g, system, random_text(rng, cfg.question_len)))
    rng.shuffle(pairs)
    if cfg.num_prompts is not None:
        pairs = pairs[:cfg.num_prompts]
    return [RequestSpec(i, "shared-prefix", question, cfg.shared_prefix_output_len,
                        cfg.system_prompt_len + cfg.question_len, system=system, group=g)
            for i, (g, system, question) in enumerate(pairs)]


def decode_request(cfg: BenchConfig, rng: random.Random, index: int) -> RequestSpec:
    """interference: a short-prompt, long-output stream (the decodes whose ITL we watch)."""
    return RequestSpec(index, "decode", random_text(rng, cfg.decode_input_len), cfg.decode_output_len,
                       cfg.decode_input_len)


def short_request(cfg: BenchConfig, rng: random.Random, index: int) -> RequestSpec:
    """interference: a short request arriving while long prompts run (its TTFT is what a new user sees)."""
    return RequestSpec(index, "short", random_text(rng, cfg.decode_input_len), cfg.short_output_len,
                       cfg.decode_input_len)


def long_requests(cfg: BenchConfig, rng: random.Random, first_index: int) -> list[RequestSpec]:
    """interference: long-prompt, short-output requests (the prefills that stall the decodes)."""
    return [RequestSpec(first_index + i, "long", random_text(rng, cfg.long_prompt_len), cfg.long_prompt_output_len,
                        cfg.long_prompt_len) for i in range(cfg.num_long_prompts)]


def warmup_request(cfg: BenchConfig, rng: random.Random, index: int) -> RequestSpec:
    """A fresh prompt of the measured requests' shape (fresh so that it leaves nothing in a prefix cache for
    them) with a short output."""
    if cfg.dataset == "random":
        n_in, n_out = cfg.random_input_len, cfg.random_output_len
    elif cfg.dataset == "shared-prefix":
        n_in, n_out = cfg.system_prompt_len + cfg.question_len, cfg.shared_prefix_output_len
    else:
        n_in, n_out = cfg.decode_input_len, cfg.decode_output_len
    return RequestSpec(index, "warmup", random_text(rng, n_in), min(n_out, 16), n_in)


def build_requests(cfg: BenchConfig, rng: random.Random) -> list[RequestSpec]:
    """The whole request list of a random or shared-prefix run (interference is scheduled by the runner)."""
    if cfg.dataset == "random":
        return random_requests(cfg, rng)
    if cfg.dataset == "shared-prefix":
        return shared_prefix_requests(cfg, rng)
    raise ValueError(f"dataset {cfg.dataset!r} has no fixed request list")
