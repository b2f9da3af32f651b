"""Llama-family forward (Llama, SmolLM2, Mistral, Qwen2) over an engine-owned KV pool.

The runner hands in a flat token batch and an `AttnMetadata`; attention writes each new token's K/V into
its pool slot and reads every request's context through its slot list. No scheduling happens here.
The per-layer ops (matmuls, norms, rope + KV write, decode attention) come from pdserve/model/ops.py: fp32 CPU
kernels where they apply, plain torch elsewhere; linear weights are held in whatever form those ops pack.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from safetensors import safe_open

from pdserve.epd.vlm import language_weight_name, text_config_of
from pdserve.model.host_memory import host_zeros
from pdserve.model.ops import pick_ops
from pdserve.model.parallel import TPGroup, check_model_fits, vocab_shard
from pdserve.model.tp_layout import kv_heads_of_rank


@dataclass(frozen=True)
class LlamaArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "LlamaArch":
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)),
        )


@dataclass
class PrefillSegment:
    """One request's run of >=1 query tokens that attends to a (possibly longer) slot list."""

    q_start: int  # offset in the flat batch
    q_len: int
    kv_slots: torch.Tensor  # [kv_len] int64, context incl. the new tokens
    prefix_len: int  # kv_len - q_len tokens already in the pool before this step


@dataclass
class AttnMetadata:
    out_slots: torch.Tensor  # [num_tokens] int64: pool slot each new token's K/V goes to
    prefills: list[PrefillSegment]
    # Batched single-token decodes occupy the flat batch's tail [decode_start:].
    decode_start: int
    decode_slot_table: torch.Tensor | None  # [num_decodes, max_kv_len] int64, padded with slot 0
    decode_lens: torch.Tensor | None  # [num_decodes] int64: context length incl. the new token


class KVCache:
    """Per-layer K and V pools: [num_slots, num_kv_heads, head_dim], allocated once."""

    def __init__(self, arch: LlamaArch, num_slots: int, dtype: torch.dtype, device: torch.device):
        shape = (num_slots, arch.num_kv_heads, arch.head_dim)

        def zeros() -> torch.Tensor:
            if device.type == "cpu":
                return host_zeros(shape, dtype)  # huge pages where the kernel allows them
            return torch.zeros(shape, dtype=dtype, device=device)

        self.k = [zeros() for _ in range(arch.num_layers)]
        self.v = [zeros() for _ in range(arch.num_layers)]
        self.num_slots = num_slots

    def bytes_per_token(self) -> int:
        t = self.k[0]
        return 2 * len(self.k) * t.shape[1] * t.shape[2] * t.element_size()


class LlamaForCausalLM:
    """One rank's part of the model: the whole model when tp is None, else its tensor-parallel shard
    (pdserve/model/parallel.py says how layers are cut). `arch` is what this rank computes (its heads, its
    slice of the intermediate size and vocab); `full_arch` is the model's."""

    def __init__(self, hf_dir: str, dtype: torch.dtype, device: torch.device, tp: TPGroup | None = None):
        with open(os.path.join(hf_dir, "config.json")) as f:
            self.config = text_config_of(json.load(f))  # a vision-language checkpoint: its language model
        self.full_arch = full = LlamaArch.from_config(self.config)
        self.tp = tp if tp is not None and tp.size > 1 else None
        tp_size, rank = (tp.size, tp.rank) if self.tp else (1, 0)
        check_model_fits(full.num_heads, full.num_kv_heads, full.intermediate_size, tp_size)
        num_local_heads = full.num_heads // tp_size
        kv_heads = kv_heads_of_rank(full.num_kv_heads, tp_size, rank)
        self.vocab_start, vocab_end = vocab_shard(full.vocab_size, tp_size, rank)
        self.vocab_rows = -(-full.vocab_size // tp_size)  # padded shard height
        self.arch = a = replace(full, num_heads=num_local_heads, num_kv_heads=len(kv_heads),
                                intermediate_size=full.intermediate_size // tp_size, vocab_size=self.vocab_rows)
        self.dtype, self.device = dtype, device
        reader = ShardReader(hf_dir)

        def w(name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
            return reader.read(name, rows, cols).to(device=device, dtype=dtype).contiguous()

        def vocab_rows(name: str) -> torch.Tensor:  # [vocab_rows, H], zero rows past the vocab
            part = w(name, (self.vocab_start, vocab_end))
            if part.shape[0] == self.vocab_rows:
                return part
            return torch.cat([part, part.new_zeros(self.vocab_rows - part.shape[0], part.shape[1])])

        D = full.head_dim
        q_rows = (rank * num_local_heads * D, (rank + 1) * num_local_heads * D)
        kv_rows = (kv_heads.start * D, kv_heads.stop * D)
        ffn = (rank * a.intermediate_size, (rank + 1) * a.intermediate_size)
        self.cos, self.sin = _rope_tables(self.config, a, device)  # [max_pos, D] float32
        self.ops = pick_ops(device, dtype, self.cos, self.sin, a)
        pack = self.ops.pack  # takes W_t [in, out] and the op's name (the self-check chose per op)
        self.embed = vocab_rows("model.embed_tokens.weight")  # [V or vocab_rows, H]
        self.norm = w("model.norm.weight")
        tied = a.tie_word_embeddings and not reader.has("lm_head.weight")
        self.lm_head = pack((self.embed if tied else vocab_rows("lm_head.weight")).t(), "linear.lm_head")  # [H, V]
        self.layers = []
        for i in range(a.num_layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            qkv_w = torch.cat([w(attn + "q_proj.weight", q_rows), w(attn + "k_proj.weight", kv_rows),
                               w(attn + "v_proj.weight", kv_rows)])  # [(nH+2nKV)*D, H] (this rank's heads)
            qkv = pack(qkv_w.t(), "linear.qkv")
            bias = torch.cat([w(attn + "q_proj.bias", q_rows), w(attn + "k_proj.bias", kv_rows),
                              w(attn + "v_proj.bias", kv_rows)]) if a.qkv_bias else None
            gate_up_w = torch.cat([w(p + "mlp.gate_proj.weight", ffn), w(p + "mlp.up_proj.weight", ffn)])  # [2I, H]
            gate_up = pack(gate_up_w.t(), "linear.gate_up")
            self.layers.append(
                dict(
                    in_norm=w(p + "input_layernorm.weight"),
                    qkv=qkv,
                    qkv_bias=bias,
                    o=pack(w(attn + "o_proj.weight", cols=q_rows).t(), "linear.o"),  # [nH*D, H]
                    post_norm=w(p + "post_attention_layernorm.weight"),
                    gate_up=gate_up,
                    down=pack(w(p + "mlp.down_proj.weight", cols=ffn).t(), "linear.down"),  # [I, H]
                )
            )
        self.scale = a.head_dim**-0.5
        self._sliced_hidden: torch.Tensor | None = None  # [T, H] between the layer slices of one step

    # ---- forward ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata, kv: KVCache,
                logits_idx: torch.Tensor,
                embeds_override: tuple[torch.Tensor, torch.Tensor] | None = None,
                layers: tuple[int, int] | None = None) -> torch.Tensor | None:
        """input_ids, positions: [T]; logits_idx: [N] rows of the batch to score. Returns logits [N, V] fp32.

        embeds_override: optional (rows [K] int64, embeddings [K, H]): those rows of the flat batch take the
        given input embeddings instead of their token's (image placeholder tokens of multimodal prompts).
        layers: (start, end): run only those layers of the step (a step in layer slices, called in order with
        the same batch); the hidden state [T, H] waits here between slices, and only the last returns logits."""
        a = self.arch
        start, end = layers if layers is not None else (0, len(self.layers))
        if start == 0:
            x = self._embed(input_ids)  # [T, H]
            if embeds_override is not None:
                rows, values = embeds_override
                x.index_copy_(0, rows, values.to(device=x.device, dtype=x.dtype))  # [K, H] into [T, H]
        else:
            if self._sliced_hidden is None:
                raise RuntimeError(f"layer slice [{start}, {end}) without the slices before it")
            x, self._sliced_hidden = self._sliced_hidden, None
        ops = self.ops
        ops.start_rows(meta.decode_start)  # prompt-token rows first, then one row per decoding sequence
        whole = (start, end) == (0, len(self.layers))
        fused = ops.decode_layers(x, self.layers, kv, positions, meta, a, self.scale) if whole and not self.tp else None
        x = x if fused is None else fused
        rope = ops.rope_inputs(positions)
        for li, L in ([] if fused is not None else zip(range(start, end), self.layers[start:end])):
            h = ops.rmsnorm(x, L["in_norm"], a.rms_norm_eps)
            qkv = ops.linear(h, L["qkv"], L["qkv_bias"])  # [T, (nH+2nKV)*D]
            q = ops.rope_store(qkv, rope, a.num_heads, a.num_kv_heads, a.head_dim, meta.out_slots, kv.k[li],
                               kv.v[li])  # [T, nH, D]; k, v written to the pool
            o = self._attention(q, kv.k[li], kv.v[li], meta)  # [T, nH*D]
            x = self._row_parallel(o, L["o"], x)
            h = ops.rmsnorm(x, L["post_norm"], a.rms_norm_eps)
            x = self._row_parallel(ops.silu_mul(ops.linear(h, L["gate_up"])), L["down"], x)  # gate_up: [T, 2I]
        if end < len(self.layers):
            self._sliced_hidden = x  # [T, H] for the next slice
            return None
        x = x.index_select(0, logits_idx)
        ops.start_rows(0)  # one row per sequence to score: these take the decode rows' path
        x = ops.rmsnorm(x, self.norm, a.rms_norm_eps)
        logits = ops.linear(x, self.lm_head).float()  # [N, V] (a rank: [N, vocab_rows])
        if self.tp is None:
            return logits
        full = self.tp.gather_columns(logits)  # rank 0: [N, vocab_rows * tp]; others: None
        return full[:, : self.full_arch.vocab_size] if full is not None else None

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, H]; vocab-parallel: each rank looks up the ids in its rows, the sum has every row."""
        if self.tp is None:
            return F.embedding(input_ids, self.embed)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_rows)
        x = F.embedding(local.clamp(0, self.vocab_rows - 1), self.embed)
        x[outside] = 0
        return self.tp.all_reduce(x)

    def _row_parallel(self, x: torch.Tensor, weight, residual: torch.Tensor) -> torch.Tensor:
        """residual + x @ W; with TP the partial products are summed over the ranks first."""
        if self.tp is None:
            return self.ops.linear(x, weight, add=residual)
        return residual + self.tp.all_reduce(self.ops.linear(x, weight))

    def _attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: AttnMetadata):
        a = self.arch
        out = torch.empty_like(q)  # [T, nH, D]
        for seg in meta.prefills:
            qs = q[seg.q_start : seg.q_start + seg.q_len].transpose(0, 1).unsqueeze(0)  # [1, nH, q, D]
            ks = k_pool.index_select(0, seg.kv_slots).transpose(0, 1).unsqueeze(0)  # [1, nKV, kv, D]
            vs = v_pool.index_select(0, seg.kv_slots).transpose(0, 1).unsqueeze(0)
            if seg.prefix_len == 0:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
            else:
                kv_len = seg.prefix_len + seg.q_len
                qpos = torch.arange(seg.prefix_len, kv_len, device=q.device).unsqueeze(1)
                mask = torch.arange(kv_len, device=q.device).unsqueeze(0) <= qpos  # [q, kv]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[seg.q_start : seg.q_start + seg.q_len] = o.squeeze(0).transpose(0, 1)
        if meta.decode_slot_table is not None:
            o = self.ops.decode_attention(q[meta.decode_start :], k_pool, v_pool, meta.decode_slot_table,
                                          meta.decode_lens, self.scale)  # [B, nH*D]
            out[meta.decode_start :] = o.view(-1, a.num_heads, a.head_dim)
        return out.view(q.shape[0], -1)


def _rope_tables(cfg: dict, a: LlamaArch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_pos, D] computed by transformers' own rotary embedding, so scaling variants match."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = AutoConfig.for_model(**cfg)
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if rope_type == "default":
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0)) if isinstance(params, dict) else 10000.0
        inv_freq = 1.0 / (theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.int64).float() / a.head_dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, torch.device("cpu"))
    pos = torch.arange(a.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(device), (emb.sin() * scaling).to(device)


class ShardReader:
    """Reads the language model's weights (plain causal-LM names; a VLM's vision tower is skipped), each
    as a whole tensor or just the rows / columns a tensor-parallel rank needs (safetensors slices: a rank
    never reads another rank's shard)."""

    def __init__(self, hf_dir: str):
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"no .safetensors weights in {hf_dir}")
        self.hf_dir = hf_dir
        self._where: dict[str, tuple[str, str]] = {}  # causal-LM name -> (file, name in the file)
        for f in files:
            try:
                with safe_open(os.path.join(hf_dir, f), "pt") as st:
                    for k in st.keys():
                        name = language_weight_name(k)
                        if name is not None:
                            self._where[name] = (f, k)
            except Exception as e:
                raise ValueError(f"cannot read weights {f}: {e}") from None
        self._open: dict[str, object] = {}

    def has(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None):
        if name not in self._where:
            raise ValueError(f"weight {name} missing from {self.hf_dir}")
        f, key = self._where[name]
        st = self._open.get(f)
        if st is None:
            st = self._open[f] = safe_open(os.path.join(self.hf_dir, f), "pt")
        if rows is None and cols is None:
            return st.get_tensor(key)
        part = st.get_slice(key)
        if cols is None:
            return part[rows[0]:rows[1]]
        return part[:, cols[0]:cols[1]]
