"""Token sampling over a batch of logits rows. Pure tensor code; no scheduling decisions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.messages import TokenLogprob
from pdserve.sampling_params import SamplingParams


@dataclass
class SampleRow:
    """Everything the sampler needs about one row (built by the runner from a request)."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    top_logprobs_num: int
    want_logprob: bool


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int = 0):
        self.eos_token_ids = list(eos_token_ids)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [N, V] float32. Returns N token ids and, where asked, their logprobs (of the raw model
        distribution, before temperature and filters)."""
        want_lp = any(r.want_logprob for r in rows)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None  # [N, V]
        simple = all(r.params.is_greedy and not self._needs_processing(r) for r in rows)
        if simple:
            tokens = logits.argmax(dim=-1).tolist()
        else:
            tokens = [self._sample_row(logits[i], r) for i, r in enumerate(rows)]
        lps: list[TokenLogprob | None] = []
        for i, r in enumerate(rows):
            lps.append(token_logprob(raw_logprobs[i], tokens[i], r.top_logprobs_num) if r.want_logprob else None)
        return tokens, lps

    def _needs_processing(self, r: SampleRow) -> bool:
        p = r.params
        return p.needs_penalties or bool(p.logit_bias) or len(r.output_ids) < p.min_new_tokens

    def _sample_row(self, logits: torch.Tensor, r: SampleRow) -> int:
        p = r.params
        x = logits.clone()  # [V]
        for tid, bias in p.logit_bias:
            if 0 <= tid < x.shape[0]:
                x[tid] += bias
        if len(r.output_ids) < p.min_new_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            if banned:
                x[torch.tensor(banned, dtype=torch.long)] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long)
            v = x[seen]
            x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and r.output_ids:
            ids, counts = torch.tensor(r.output_ids, dtype=torch.long).unique(return_counts=True)
            x[ids] -= p.frequency_penalty * counts.to(x.dtype) + p.presence_penalty
        if p.is_greedy:
            return int(x.argmax())
        x = x / p.temperature
        if p.top_k > 0 and p.top_k < x.shape[0]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            cum = sorted_p.cumsum(0)
            drop = cum - sorted_p > p.top_p  # keep the smallest set whose mass reaches top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        gen = self.generator
        if p.seed is not None:
            gen = torch.Generator().manual_seed(p.seed + len(r.output_ids))
        return int(torch.multinomial(probs, 1, generator=gen))


def token_logprob(logprobs_row: torch.Tensor, token_id: int, top_n: int) -> TokenLogprob:
    """logprobs_row: [V]."""
    top: list[tuple[int, float]] = []
    if top_n > 0:
        vals, idx = logprobs_row.topk(top_n)
        top = list(zip(idx.tolist(), vals.tolist()))
    return TokenLogprob(token_id, float(logprobs_row[token_id]), top)
