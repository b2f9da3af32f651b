"""Model runner: turns a SchedulerOutput into tensors, runs the forward, samples. Makes no scheduling
decisions and never mutates requests."""

from __future__ import annotations

import logging

import torch

from pdserve.config import EngineConfig
from pdserve.engine.messages import TokenLogprob
from pdserve.engine.sampler import Sampler, SampleRow, token_logprob
from pdserve.engine.scheduler import SampledToken, ScheduledSeq, SchedulerOutput
from pdserve.model.llama import AttnMetadata, KVCache, LlamaForCausalLM, PrefillSegment

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_TOKENS = 16384


def pick_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_dir: str, eos_token_ids: tuple[int, ...]):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device, self.dtype = pick_device_dtype(config.model.device, config.model.dtype)
        self.model = LlamaForCausalLM(hf_dir, self.dtype, self.device)
        self.num_slots = self._num_slots(config)
        # +1: slot 0 is padding for decode tables and never allocated.
        self.kv = KVCache(self.model.arch, self.num_slots + 1, self.dtype, self.device)
        self.sampler = Sampler(eos_token_ids, config.seed)
        logger.info("KV pool: %d tokens, %.1f MB", self.num_slots, self.kv.bytes_per_token() * self.num_slots / 1e6)

    @property
    def context_len(self) -> int:
        return self.model.arch.max_position_embeddings

    def _num_slots(self, config: EngineConfig) -> int:
        if config.max_total_tokens:
            return config.max_total_tokens
        if self.device.type == "cuda" and config.mem_fraction_static > 0:
            free, _ = torch.cuda.mem_get_info(self.device)
            a = self.model.arch
            per_tok = 2 * a.num_layers * a.num_kv_heads * a.head_dim * torch.finfo(self.dtype).bits // 8
            return int(free * config.mem_fraction_static) // per_tok
        return DEFAULT_CPU_KV_TOKENS

    # ---- one step -----------------------------------------------------------------------------------
    def run(self, sched: SchedulerOutput) -> list[SampledToken | None]:
        seqs = sched.seqs
        input_ids: list[int] = []
        positions: list[int] = []
        out_slots: list[int] = []
        segments: list[PrefillSegment] = []
        logit_rows: list[int] = []
        row_of: list[tuple[int, int] | None] = []  # per seq: (first logits row, count) or None
        over_rows: list[torch.Tensor] = []  # image embedding overrides: flat batch rows [K_i]
        over_vals: list[torch.Tensor] = []  # and their embeddings [K_i, H]
        dev = self.device
        for i, seq in enumerate(seqs):
            req, c, n = seq.req, seq.req.num_computed_tokens, seq.num_new_tokens
            start = len(input_ids)
            input_ids.extend(req.all_ids[c : c + n])
            positions.extend(range(c, c + n))
            out_slots.extend(req.slots[c : c + n])
            if i < len(sched.prefills):
                kv_slots = torch.tensor(req.slots[: c + n], dtype=torch.long, device=dev)
                segments.append(PrefillSegment(start, n, kv_slots, c))
                if req.mm is not None and c < len(req.prompt_ids):
                    hit = req.mm.rows_for(c, n)  # ([K] offsets from c, [K, H])
                    if hit is not None:
                        over_rows.append(hit[0] + start)
                        over_vals.append(hit[1])
            rows = self._rows_to_score(seq, start)
            row_of.append((len(logit_rows), len(rows)) if rows else None)
            logit_rows.extend(rows)
        table = lens = None
        if sched.decodes:
            ctx = [seq.req.slots[: seq.req.num_computed_tokens + 1] for seq in sched.decodes]
            width = max(len(c) for c in ctx)
            table = torch.tensor([c + [0] * (width - len(c)) for c in ctx], dtype=torch.long, device=dev)  # [B, S]
            lens = torch.tensor([len(c) for c in ctx], dtype=torch.long, device=dev)  # [B]
        meta = AttnMetadata(
            out_slots=torch.tensor(out_slots, dtype=torch.long, device=dev),
            prefills=segments,
            decode_start=len(input_ids) - len(sched.decodes),
            decode_slot_table=table,
            decode_lens=lens,
        )
        logits = self.model.forward(
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            meta,
            self.kv,
            torch.tensor(logit_rows, dtype=torch.long, device=dev),
            (torch.cat(over_rows).to(dev), torch.cat(over_vals)) if over_rows else None,
        )  # [num_rows, V]
        return self._sample(seqs, row_of, logits)

    def _rows_to_score(self, seq: ScheduledSeq, start: int) -> list[int]:
        """Batch rows whose logits are needed: every row when the prompt is scored, else the last one."""
        if seq.req.wants_input_logprobs:
            return list(range(start, start + seq.num_new_tokens))
        return [start + seq.num_new_tokens - 1] if seq.samples else []

    def _sample(self, seqs: list[ScheduledSeq], row_of, logits: torch.Tensor) -> list[SampledToken | None]:
        results: list[SampledToken | None] = [None] * len(seqs)
        sample_idx, rows = [], []
        for i, seq in enumerate(seqs):
            if row_of[i] is None:
                continue
            first, count = row_of[i]
            req = seq.req
            if req.wants_input_logprobs:
                results[i] = SampledToken(None, input_logprobs=self._input_logprobs(seq, logits[first : first + count]))
            if seq.samples and req.sampling.max_new_tokens > 0:
                sample_idx.append((i, first + count - 1))
                rows.append(SampleRow(req.sampling, req.prompt_ids, req.output_ids, req.top_logprobs_num, req.return_logprob))
        if sample_idx:
            picked = logits[torch.tensor([r for _, r in sample_idx], device=logits.device)]
            tokens, lps = self.sampler(picked, rows)
            for (i, _), tok, lp in zip(sample_idx, tokens, lps):
                prev = results[i]
                results[i] = SampledToken(tok, lp, prev.input_logprobs if prev else None)
        return results

    def _input_logprobs(self, seq: ScheduledSeq, logits: torch.Tensor) -> list[TokenLogprob | None]:
        """Logprobs of prompt tokens in [logprob_start_len, prompt_len) that this chunk's logits predict."""
        req = seq.req
        c, n, prompt_len = req.num_computed_tokens, seq.num_new_tokens, len(req.prompt_ids)
        out: list[TokenLogprob | None] = []
        if c == 0 and req.logprob_start_len == 0:
            out.append(None)  # the first prompt token has no context to score it
        lp = torch.log_softmax(logits, dim=-1)  # [n, V]; row j predicts token c + j + 1
        for t in range(max(c + 1, req.logprob_start_len, 1), min(c + n, prompt_len - 1) + 1):
            out.append(token_logprob(lp[t - c - 1], req.prompt_ids[t], req.top_logprobs_num))
        return out
