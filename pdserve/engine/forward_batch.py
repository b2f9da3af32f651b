"""What one model step computes, as plain data: built from the scheduler's output (requests), consumed by the
model runner (tensors). `ForwardBatch` is what every tensor-parallel rank receives (msgspec-encoded, broadcast by
rank 0); `SeqScoring` stays on rank 0 and says what to do with each sequence's logits (sample, score prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from pdserve.engine.sampler import SampleRow
from pdserve.engine.scheduler import ScheduledSeq, SchedulerOutput


class PrefillSpan(msgspec.Struct, frozen=True, array_like=True):
    """One sequence's run of >= 1 query tokens in the flat batch and the context it attends to."""

    q_start: int  # offset in the flat batch
    q_len: int
    kv_slots: list[int]  # context slots incl. the new tokens: [prefix_len + q_len]
    prefix_len: int


class ForwardBatch(msgspec.Struct, frozen=True):
    """The flat token batch of one step: prefill spans first, then one row per decoding sequence."""

    input_ids: list[int]  # [num_tokens]
    positions: list[int]  # [num_tokens]
    out_slots: list[int]  # [num_tokens] pool slot each new token's K/V goes to
    prefills: list[PrefillSpan]
    decode_contexts: list[list[int]]  # per decoding sequence: its context slots incl. the new token
    logit_rows: list[int]  # rows of the flat batch whose logits are needed
    # A step run in layer slices (scheduler: num_layer_slices) runs layers [layer_start, layer_end) per call;
    # the hidden state waits in the model between calls. layer_end 0: every layer.
    layer_start: int = 0
    layer_end: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class InputLogprobSpec:
    """Score prompt tokens predicted by this chunk's logits (rank 0 only)."""

    num_computed_tokens: int  # before this step
    num_new_tokens: int
    prompt_ids: list[int]
    logprob_start_len: int
    top_logprobs_num: int


@dataclass
class SeqScoring:
    """Per sequence of the batch: its logits rows and what they are for."""

    rows: tuple[int, int] | None  # (first row in the logits, count) or None: no logits needed
    sample: SampleRow | None  # sample the next token from the last row
    input_logprobs: InputLogprobSpec | None


def build_forward_batch(sched: SchedulerOutput) -> tuple[ForwardBatch, list[SeqScoring], list[tuple[int, object]]]:
    """(batch, scoring per sequence, image embedding overrides as (flat row offset, MMInputs hit))."""
    input_ids: list[int] = []
    positions: list[int] = []
    out_slots: list[int] = []
    spans: list[PrefillSpan] = []
    logit_rows: list[int] = []
    scoring: list[SeqScoring] = []
    overrides: list[tuple[int, object]] = []
    for i, seq in enumerate(sched.seqs):
        req, done, num_new = seq.req, seq.req.num_computed_tokens, seq.num_new_tokens
        start = len(input_ids)
        input_ids.extend(req.all_ids[done : done + num_new])
        positions.extend(range(done, done + num_new))
        out_slots.extend(req.slots[done : done + num_new])
        if i < len(sched.prefills):
            spans.append(PrefillSpan(start, num_new, req.slots[: done + num_new], done))
            if req.mm is not None and done < len(req.prompt_ids):
                hit = req.mm.rows_for(done, num_new)  # ([K] offsets from done, [K, H])
                if hit is not None:
                    overrides.append((start, hit))
        rows = _rows_to_score(seq, start)
        scoring.append(_scoring(seq, (len(logit_rows), len(rows)) if rows else None))
        logit_rows.extend(rows)
    contexts = [seq.req.slots[: seq.req.num_computed_tokens + 1] for seq in sched.decodes]
    batch = ForwardBatch(input_ids, positions, out_slots, spans, contexts, logit_rows)
    return batch, scoring, overrides


def _rows_to_score(seq: ScheduledSeq, start: int) -> list[int]:
    """Batch rows whose logits are needed: every row when the prompt is scored, else the last one."""
    if seq.req.wants_input_logprobs:
        return list(range(start, start + seq.num_new_tokens))
    return [start + seq.num_new_tokens - 1] if seq.samples else []


def _scoring(seq: ScheduledSeq, rows: tuple[int, int] | None) -> SeqScoring:
    req = seq.req
    sample = None
    if rows is not None and seq.samples and req.sampling.max_new_tokens > 0:
        sample = SampleRow(req.sampling, req.prompt_ids, req.output_ids, req.top_logprobs_num, req.return_logprob)
    lp = None
    if rows is not None and req.wants_input_logprobs:
        lp = InputLogprobSpec(req.num_computed_tokens, seq.num_new_tokens, req.prompt_ids, req.logprob_start_len,
                              req.top_logprobs_num)
    return SeqScoring(rows, sample, lp)
