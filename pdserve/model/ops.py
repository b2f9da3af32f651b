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

import torch
import torch.nn.functional as F

from pdserve.model import cpu_kernels
from pdserve.model.host_memory import host_zeros
from pdserve.model.kernel_check import check_kernels
from pdserve.model.kernel_plan import KernelPlan, OpChoice

if TYPE_CHECKING:
    from pdserve.model.llama import LlamaArch


@dataclass(frozen=True)
class LinearWeight:
    """A linear layer's weight in the forms its op runs: panels for the kernel, W_t [in, out] for torch
    (both where the self-check picked the kernel for some batch sizes and torch for others)."""

    choice: OpChoice | None  # None: the kernel for every batch size
    packed: cpu_kernels.PackedLinear | None
    w_t: torch.Tensor | None


class TorchOps:
    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
        self.cos, self.sin, self.dtype = cos, sin, dtype  # [max_pos, D] fp32 tables
        self._mask_lens: torch.Tensor | None = None  # the step's lens the cached decode mask was built from
        self._mask: torch.Tensor | None = None

    def pack(self, w_t: torch.Tensor, op: str = "linear") -> torch.Tensor:
        # Kept as W_t [in, out]: x @ W_t reads it at about twice the bandwidth of F.linear on CPU; on CPU on
        # huge pages (host_memory.py), which streams a decode step's weights faster.
        if w_t.device.type != "cpu":
            return w_t.contiguous()
        out = host_zeros(tuple(w_t.shape), w_t.dtype)
        out.copy_(w_t)
        return out

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
    """fp32 on CPU through cpu_kernels where the plan says so; prefill attention stays torch's (inherited).
    plan None: every op runs its kernel (the self-check and the kernel tests use this)."""

    def __init__(self, kernels: cpu_kernels.CpuKernels, plan: KernelPlan | None, cos: torch.Tensor,
                 sin: torch.Tensor):
        super().__init__(cos.contiguous(), sin.contiguous(), torch.float32)
        self.k = kernels
        self._plan = plan

    @property
    def plan(self) -> KernelPlan:
        return self._plan if self._plan is not None else KernelPlan(self.k.isa, cpu_kernels.cpu_isas(), (),
                                                                    "every op runs its kernel (unchecked)")

    def _kernel(self, op: str, rows: int) -> bool:
        return self._plan is None or self._plan.choice(op).kernel_for(rows)

    def pack(self, w_t: torch.Tensor, op: str = "linear") -> LinearWeight:
        if self._plan is None:
            return LinearWeight(None, self.k.pack(w_t), None)
        choice = self._plan.choice(op)
        picks = {choice.kernel_for(t.rows) for t in choice.timings} or {False}  # refused: {False}
        return LinearWeight(choice, self.k.pack(w_t) if True in picks else None,
                            super().pack(w_t) if False in picks else None)

    def linear(self, x, w: LinearWeight, bias=None, add=None):
        if w.choice is None or w.choice.kernel_for(x.shape[0]):
            # The residual add happens in place: `add` is the residual stream, not read again before this returns.
            return self.k.linear(x.contiguous(), w.packed, bias, add, out=add)
        return super().linear(x, w.w_t, bias, add)

    def rmsnorm(self, x, weight, eps):
        if self._kernel("rmsnorm", x.shape[0]):
            return self.k.rmsnorm(x.contiguous(), weight, eps)
        return super().rmsnorm(x, weight, eps)

    def silu_mul(self, gate_up):
        if self._kernel("silu_mul", gate_up.shape[0]):
            return self.k.silu_mul(gate_up.contiguous())
        return super().silu_mul(gate_up)

    def rope_inputs(self, positions):
        return positions

    def rope_store(self, qkv, rope, num_heads, num_kv_heads, head_dim, out_slots, k_pool, v_pool):
        positions = rope
        if self._kernel("rope_store", qkv.shape[0]):
            return self.k.rope_store(qkv.contiguous(), positions, self.cos, self.sin, num_heads, num_kv_heads,
                                     head_dim, out_slots, k_pool, v_pool)
        return super().rope_store(qkv, super().rope_inputs(positions), num_heads, num_kv_heads, head_dim,
                                  out_slots, k_pool, v_pool)

    def decode_attention(self, q, k_pool, v_pool, slot_table, lens, scale):
        if q.shape[1] > cpu_kernels.ATT_MAX_HEADS or not self._kernel("decode_attention", q.shape[0]):
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
