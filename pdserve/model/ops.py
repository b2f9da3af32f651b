"""The per-layer operations of the Llama forward, in two interchangeable implementations.

`TorchOps` is plain torch and runs on any device and dtype. On CPU in fp32 the forward uses `KernelOps`:
the same methods through `CpuKernels` (cpu_kernels.py; same results to fp32 rounding; packed-panel GEMV/GEMM,
attention reading K/V in place, fused rope + KV write), op by op and batch size by batch size as the load-time
self-check decided (kernel_check.py): where a kernel was wrong or slower than torch, torch runs it.
`pick_ops` chooses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import ctypes

import torch
import torch.nn.functional as F

from pdserve.model import cpu_kernels
from pdserve.model.host_memory import host_zeros
from pdserve.model.kernel_check import check_kernels
from pdserve.model.kernel_plan import KernelPlan

if TYPE_CHECKING:
    from pdserve.model.llama import AttnMetadata, KVCache, LlamaArch

DECODE_LAYER_OPS = ("rmsnorm", "linear.qkv", "rope_store", "decode_attention", "linear.o", "linear.gate_up",
                    "silu_mul", "linear.down")  # what one layer runs, in order, for decode rows


@dataclass(frozen=True)
class LinearWeight:
    """A linear layer's weight in the forms its op runs: panels for the kernel, W_t [in, out] for torch
    (both where the self-check picked the kernel for one kind of row and torch for the other)."""

    op: str  # e.g. "linear.qkv": its entry in the KernelPlan
    packed: cpu_kernels.PackedLinear | None
    w_t: torch.Tensor | None


class TorchOps:
    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
        self.cos, self.sin, self.dtype = cos, sin, dtype  # [max_pos, D] fp32 tables
        self._mask_lens: torch.Tensor | None = None  # the step's lens the cached decode mask was built from
        self._mask: torch.Tensor | None = None

    def start_rows(self, num_prefill_rows: int) -> None:
        """The coming ops' batch: its first num_prefill_rows rows are prompt tokens, the rest decode tokens."""

    def pack(self, w_t: torch.Tensor, op: str = "linear") -> torch.Tensor:
        # Kept as W_t [in, out]: x @ W_t reads it at about twice the bandwidth of F.linear on CPU; on CPU on
        # huge pages (host_memory.py), which streams a decode step's weights faster.
        if w_t.device.type != "cpu":
            return w_t.contiguous()
        out = host_zeros(tuple(w_t.shape), w_t.dtype)
        out.copy_(w_t)
        return out

    def decode_layers(self, x: torch.Tensor, layers: list[dict], kv: KVCache, positions: torch.Tensor,
                      meta: AttnMetadata, arch: LlamaArch, scale: float) -> torch.Tensor | None:
        """Every layer in one call for a batch of decode rows only, where a fused path exists (the same ops,
        the same numbers); None: the caller runs the layers op by op."""
        return None

    kernel_note = "torch runs every op"  # why no CPU kernel runs (pick_ops says more)

    @property
    def plan(self) -> KernelPlan:
        return KernelPlan("none", cpu_kernels.cpu_isas(), (), self.kernel_note)

    def linear(self, x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None,
               add: torch.Tensor | None = None) -> torch.Tensor:
        y = x @ w_t
        if bias is not None:
            y = y + bias
        return y if add is None else add + y

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
        return F.silu(gate) * up

    def rope_inputs(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].to(self.dtype).unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].to(self.dtype).unsqueeze(1)
        return cos, sin

    def rope_store(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], num_heads: int,
                   num_kv_heads: int, head_dim: int, out_slots: torch.Tensor, k_pool: torch.Tensor,
                   v_pool: torch.Tensor) -> torch.Tensor:
        cos, sin = rope
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = _rope(q.view(-1, num_heads, head_dim), cos, sin)  # [T, nH, D]
        k = _rope(k.view(-1, num_kv_heads, head_dim), cos, sin)  # [T, nKV, D]
        k_pool.index_copy_(0, out_slots, k)
        v_pool.index_copy_(0, out_slots, v.view(-1, num_kv_heads, head_dim))
        return q

    def decode_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                         slot_table: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, nH, D]; slot_table [B, S] (padded with slot 0); lens [B] -> [B, nH * D]."""
        b, s = slot_table.shape
        nkv, d = k_pool.shape[1], k_pool.shape[2]
        if self._mask_lens is not lens or self._mask.shape[-1] != s:  # once per step, not per layer
            self._mask_lens = lens
            self._mask = (torch.arange(s, device=q.device)[None, :] < lens[:, None])[:, None, None, :]  # [B,1,1,S]
        mask = self._mask
        kd = k_pool.index_select(0, slot_table.view(-1)).view(b, s, nkv, d).transpose(1, 2)  # [B, nKV, S, D]
        vd = v_pool.index_select(0, slot_table.view(-1)).view(b, s, nkv, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=mask, scale=scale,
                                           enable_gqa=True)  # [B, nH, 1, D]
        return o.reshape(b, -1)


class KernelOps(TorchOps):
    """fp32 on CPU through cpu_kernels where the plan says so, per op and per kind of row (prompt tokens or
    decode tokens, never by batch size: see kernel_plan.py); prefill attention stays torch's (inherited).
    plan None: every op runs its kernel (the self-check and the kernel tests use this)."""

    def __init__(self, kernels: cpu_kernels.CpuKernels, plan: KernelPlan | None, cos: torch.Tensor,
                 sin: torch.Tensor):
        super().__init__(cos.contiguous(), sin.contiguous(), torch.float32)
        self.k = kernels
        self._plan = plan
        self._num_prefill_rows = 0
        self._paths: dict[str, tuple[bool, bool]] = {}  # op -> (prefill rows run the kernel, decode rows do)
        self._layer_table: tuple[tuple, ctypes.Array] | None = None  # (what it was built from, PdLayer array)

    @property
    def plan(self) -> KernelPlan:
        return self._plan if self._plan is not None else KernelPlan(self.k.isa, cpu_kernels.cpu_isas(), (),
                                                                    "every op runs its kernel (unchecked)")

    def start_rows(self, num_prefill_rows: int) -> None:
        self._num_prefill_rows = num_prefill_rows

    def _op_paths(self, op: str) -> tuple[bool, bool]:
        paths = self._paths.get(op)
        if paths is None:
            choice = self._plan.choice(op) if self._plan is not None else None
            paths = (True, True) if choice is None else (choice.prefill_kernel, choice.decode_kernel)
            self._paths[op] = paths
        return paths

    def _split(self, op: str, rows: int) -> list[tuple[slice, bool]]:
        """The batch's row ranges and whether each runs the kernel: one range unless the kinds differ."""
        prefill_kernel, decode_kernel = self._op_paths(op)
        num_prefill = min(self._num_prefill_rows, rows)
        if num_prefill == 0 or prefill_kernel == decode_kernel:
            return [(slice(0, rows), decode_kernel if num_prefill == 0 else prefill_kernel)]
        if num_prefill == rows:
            return [(slice(0, rows), prefill_kernel)]
        return [(slice(0, num_prefill), prefill_kernel), (slice(num_prefill, rows), decode_kernel)]

    def pack(self, w_t: torch.Tensor, op: str = "linear") -> LinearWeight:
        paths = set(self._op_paths(op))
        return LinearWeight(op, self.k.pack(w_t) if True in paths else None,
                            super().pack(w_t) if False in paths else None)

    def _linear_rows(self, x, w: LinearWeight, bias, add, kernel: bool, out=None):
        if kernel:  # the residual add happens in place: `add` is the residual stream, not read again
            return self.k.linear(x.contiguous(), w.packed, bias, add, out=add if out is None else out)
        y = super().linear(x, w.w_t, bias, add)
        return y if out is None else out.copy_(y)

    def linear(self, x, w: LinearWeight, bias=None, add=None):
        parts = self._split(w.op, x.shape[0])
        if len(parts) == 1:
            return self._linear_rows(x, w, bias, add, parts[0][1])
        out = add if add is not None else torch.empty((x.shape[0], w.w_t.shape[1]), dtype=torch.float32)
        for rows, kernel in parts:
            self._linear_rows(x[rows], w, bias, None if add is None else add[rows], kernel, out[rows])
        return out

    def _rowwise(self, op: str, x: torch.Tensor, kernel_fn, torch_fn) -> torch.Tensor:
        parts = self._split(op, x.shape[0])
        outs = [(kernel_fn if kernel else torch_fn)(x[rows]) for rows, kernel in parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def rmsnorm(self, x, weight, eps):
        return self._rowwise("rmsnorm", x, lambda rows: self.k.rmsnorm(rows.contiguous(), weight, eps),
                             lambda rows: super(KernelOps, self).rmsnorm(rows, weight, eps))

    def silu_mul(self, gate_up):
        return self._rowwise("silu_mul", gate_up, lambda rows: self.k.silu_mul(rows.contiguous()),
                             lambda rows: super(KernelOps, self).silu_mul(rows))

    def rope_inputs(self, positions):
        return positions

    def rope_store(self, qkv, rope, num_heads, num_kv_heads, head_dim, out_slots, k_pool, v_pool):
        positions = rope
        qs = []
        for rows, kernel in self._split("rope_store", qkv.shape[0]):
            if kernel:
                qs.append(self.k.rope_store(qkv[rows].contiguous(), positions[rows], self.cos, self.sin,
                                            num_heads, num_kv_heads, head_dim, out_slots[rows], k_pool, v_pool))
            else:
                qs.append(super().rope_store(qkv[rows], super().rope_inputs(positions[rows]), num_heads,
                                             num_kv_heads, head_dim, out_slots[rows], k_pool, v_pool))
        return qs[0] if len(qs) == 1 else torch.cat(qs)

    def decode_layers(self, x, layers, kv, positions, meta, arch, scale):
        if (meta.prefills or meta.decode_start != 0 or arch.num_heads > cpu_kernels.ATT_MAX_HEADS
                or not all(self._op_paths(op)[1] for op in DECODE_LAYER_OPS)):
            return None
        return self.k.decode_layers(self._layers_of(layers, kv), x.contiguous(), arch.num_heads, arch.num_kv_heads,
                                    arch.head_dim, arch.intermediate_size, arch.rms_norm_eps, positions,
                                    self.cos, self.sin, meta.out_slots, meta.decode_slot_table.contiguous(),
                                    meta.decode_lens, scale)

    def _layers_of(self, layers: list[dict], kv: KVCache) -> ctypes.Array:
        """The PdLayer array for these layers and pools, built once (the model keeps both alive)."""
        key = (id(layers), len(layers), kv.k[0].data_ptr(), kv.v[0].data_ptr())
        if self._layer_table is None or self._layer_table[0] != key:
            table = (cpu_kernels.PdLayer * len(layers))()
            for entry, layer, k_pool, v_pool in zip(table, layers, kv.k, kv.v):
                for name in ("in_norm", "qkv_bias", "post_norm"):
                    setattr(entry, name, None if layer[name] is None else layer[name].data_ptr())
                for name in ("qkv", "o", "gate_up", "down"):
                    setattr(entry, name, layer[name].packed.panels.data_ptr())
                entry.k_pool, entry.v_pool = k_pool.data_ptr(), v_pool.data_ptr()
            self._layer_table = (key, table)
        return self._layer_table[1]

    def decode_attention(self, q, k_pool, v_pool, slot_table, lens, scale):
        if q.shape[1] > cpu_kernels.ATT_MAX_HEADS or not self._op_paths("decode_attention")[1]:
            return super().decode_attention(q, k_pool, v_pool, slot_table, lens, scale)
        return self.k.decode_attention(q.contiguous(), k_pool, v_pool, slot_table, lens, scale)


def pick_ops(device: torch.device, dtype: torch.dtype, cos: torch.Tensor, sin: torch.Tensor,
             arch: LlamaArch) -> TorchOps:
    """KernelOps on CPU in fp32 where kernels build here (each op as the self-check decides), else TorchOps."""
    ops = TorchOps(cos, sin, dtype)
    if device.type != "cpu" or dtype != torch.float32:
        ops.kernel_note = f"CPU kernels serve fp32 on CPU only (here {dtype} on {device.type})"
        return ops
    kernels = cpu_kernels.load()
    if kernels is None:
        ops.kernel_note = "CPU kernels off (PDSERVE_DISABLE_CPU_KERNELS, or no C compiler / build failed)"
        return ops
    return KernelOps(kernels, check_kernels(kernels, ops, arch), cos, sin)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
