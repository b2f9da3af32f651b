"""The one request object. Its counters are the truth; everything else is derived from them."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.messages import TokenLogprob
from pdserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    arrival_time: float = field(default_factory=time.monotonic)
    queued_at: float = field(default_factory=time.monotonic)  # when it last entered the waiting queue

    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # leading tokens of all_ids whose KV sits in `slots`
    slots: list[int] = field(default_factory=list)  # pool slots of all_ids[:len(slots)]
    num_tree_slots: int = 0  # leading slots owned by the radix cache (locked via cache_node)
    cache_node: Any = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    error: str | None = None
    # Outputs produced since the last RequestOutput was emitted.
    num_sent_tokens: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    input_logprobs: list[TokenLogprob | None] | None = None
    input_logprobs_sent: bool = False
    # Set by a disaggregation queue; the scheduler treats it as opaque.
    disagg: Any = None
    # Image prompts: pdserve.epd.mm.MMInputs (embeddings the runner puts at the placeholder positions). The
    # scheduler reads only `inputs_ready`.
    mm: Any = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        return bool(self.output_ids) and self.num_uncomputed_tokens == 1

    @property
    def inputs_ready(self) -> bool:
        """False while a multimodal request's image embeddings are still being computed or received."""
        return self.mm is None or self.mm.ready

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0 and not self.input_logprobs_sent
