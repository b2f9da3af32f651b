"""Model runner: turns a SchedulerOutput into tensors, runs the forward, samples. Makes no scheduling
decisions and never mutates requests."""

from __future__ import annotations

import logging

import torch

from pdserve.config import EngineConfig
from pdserve.engine.messages import TokenLogprob
from pdserve.engine.sampler import Sampler, token_logprob
from pdserve.engine.forward_batch import ForwardBatch, InputLogprobSpec, SeqScoring
from pdserve.engine.scheduler import SampledToken
from pdserve.engine.tp_worker import RunForward, TensorRanks, TensorRanksFailed
from pdserve.model.llama import AttnMetadata, KVCache, LlamaForCausalLM, PrefillSegment
from pdserve.model.parallel import TPGroup

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_TOKENS = 16384


def pick_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)


class ModelRunner:
    """Rank 0 of the engine (tp_group None): starts the other tensor-parallel ranks when tp_size > 1 and leads
    them; a TP rank > 0 (pdserve/engine/tp_worker.py) builds one with its group and rank 0's pool size."""

    def __init__(self, config: EngineConfig, hf_dir: str, eos_token_ids: tuple[int, ...],
                 tp_group: TPGroup | None = None, num_slots: int | None = None):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device, self.dtype = pick_device_dtype(config.model.device, config.model.dtype)
        self.tp_link: TensorRanks | None = None
        if tp_group is None and config.tp_size > 1:
            self.tp_link = TensorRanks.start(config, hf_dir, self.device)
            tp_group = self.tp_link.group
        self.tp_group = tp_group
        self.model = LlamaForCausalLM(hf_dir, self.dtype, self.device, tp_group)
        self.num_slots = num_slots if num_slots is not None else self._num_slots(config)
        if self.tp_link is not None:
            self.tp_link.ready(self.num_slots)  # the other ranks size their pools the same
        # + one page: page 0 holds slot 0, the padding of decode tables, and is never allocated.
        self.kv = KVCache(self.model.arch, self.num_slots + config.page_size, self.dtype, self.device)
        self.sampler = Sampler(eos_token_ids, config.seed)
        logger.info("KV pool: %d tokens, %.1f MB", self.num_slots, self.kv.bytes_per_token() * self.num_slots / 1e6)

    @property
    def context_len(self) -> int:
        return self.model.arch.max_position_embeddings

    def _num_slots(self, config: EngineConfig) -> int:
        """KV pool size in tokens, rounded down to whole pages (not counting the reserved page 0)."""
        page = config.page_size
        if config.max_total_tokens:
            num_tokens = config.max_total_tokens
        elif self.device.type == "cuda" and config.mem_fraction_static > 0:
            free, _ = torch.cuda.mem_get_info(self.device)
            a = self.model.arch
            per_tok = 2 * a.num_layers * a.num_kv_heads * a.head_dim * torch.finfo(self.dtype).bits // 8
            num_tokens = int(free * config.mem_fraction_static) // per_tok
        else:
            num_tokens = DEFAULT_CPU_KV_TOKENS
        return num_tokens // page * page

    # ---- one step -----------------------------------------------------------------------------------
    def run(self, batch: ForwardBatch, scoring: list[SeqScoring],
            overrides: list[tuple[int, object]] | None = None) -> list[SampledToken | None]:
        """Rank 0: the forward (every TP rank runs it too), then sampling and prompt scoring. A layer slice
        that is not a step's last (batch.layer_end) returns []."""
        if self.tp_link is None:
            logits = self.forward(batch, overrides)
        else:
            self.tp_link.send(RunForward(batch))
            try:
                logits = self.forward(batch, overrides)
            except Exception as e:  # the other ranks may wait in a collective this rank never reaches: fatal
                raise TensorRanksFailed(f"forward failed on rank 0: {type(e).__name__}: {e}") from e
        if logits is None:  # a layer slice that is not its step's last: nothing to sample yet
            return []
        return self._sample(scoring, logits)

    def forward(self, batch: ForwardBatch, overrides: list[tuple[int, object]] | None = None) -> torch.Tensor | None:
        """Logits [len(batch.logit_rows), V] (None on TP ranks other than 0)."""
        dev = self.device

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=dev)

        table = lens = None
        if batch.decode_contexts:
            width = max(len(c) for c in batch.decode_contexts)
            table = longs([c + [0] * (width - len(c)) for c in batch.decode_contexts])  # [B, S], slot 0 pads
            lens = longs([len(c) for c in batch.decode_contexts])  # [B]
        meta = AttnMetadata(
            out_slots=longs(batch.out_slots),
            prefills=[PrefillSegment(s.q_start, s.q_len, longs(s.kv_slots), s.prefix_len) for s in batch.prefills],
            decode_start=batch.num_tokens - len(batch.decode_contexts),
            decode_slot_table=table,
            decode_lens=lens,
        )
        override = None
        if overrides:  # image embeddings replace placeholder rows: ([K] flat rows, [K, H])
            override = (torch.cat([hit[0] + start for start, hit in overrides]).to(dev),
                        torch.cat([hit[1] for _, hit in overrides]))
        layers = (batch.layer_start, batch.layer_end) if batch.layer_end else None
        return self.model.forward(longs(batch.input_ids), longs(batch.positions), meta, self.kv,
                                  longs(batch.logit_rows), override, layers)  # [num_rows, V] or None

    def keepalive(self) -> None:
        """Idle rank 0: tell the other ranks it is alive (their wait for the next command has a deadline)."""
        if self.tp_link is not None:
            self.tp_link.keepalive()

    def close(self) -> None:
        if self.tp_link is not None:
            self.tp_link.close()
            self.tp_link = None

    def _sample(self, scoring: list[SeqScoring], logits: torch.Tensor) -> list[SampledToken | None]:
        results: list[SampledToken | None] = [None] * len(scoring)
        sample_idx, rows = [], []
        for i, sc in enumerate(scoring):
            if sc.rows is None:
                continue
            first, count = sc.rows
            if sc.input_logprobs is not None:
                results[i] = SampledToken(None, input_logprobs=_input_logprobs(sc.input_logprobs,
                                                                               logits[first : first + count]))
            if sc.sample is not None:
                sample_idx.append((i, first + count - 1))
                rows.append(sc.sample)
        if sample_idx:
            picked = logits[torch.tensor([r for _, r in sample_idx], device=logits.device)]
            tokens, lps = self.sampler(picked, rows)
            for (i, _), tok, lp in zip(sample_idx, tokens, lps):
                prev = results[i]
                results[i] = SampledToken(tok, lp, prev.input_logprobs if prev else None)
        return results


def _input_logprobs(spec: InputLogprobSpec, logits: torch.Tensor) -> list[TokenLogprob | None]:
    """Logprobs of prompt tokens in [logprob_start_len, prompt_len) that this chunk's logits predict."""
    c, n, prompt_len = spec.num_computed_tokens, spec.num_new_tokens, len(spec.prompt_ids)
    out: list[TokenLogprob | None] = []
    if c == 0 and spec.logprob_start_len == 0:
        out.append(None)  # the first prompt token has no context to score it
    lp = torch.log_softmax(logits, dim=-1)  # [n, V]; row j predicts token c + j + 1
    for t in range(max(c + 1, spec.logprob_start_len, 1), min(c + n, prompt_len - 1) + 1):
        out.append(token_logprob(lp[t - c - 1], spec.prompt_ids[t], spec.top_logprobs_num))
    return out
