"""The load-time self-check of the CPU kernels: which op runs the kernel, which runs torch.

Every kernel is first checked against the torch op it replaces on small random inputs; a wrong result refuses
that kernel (torch runs the op, and a log line says why). Each correct kernel is then timed against torch's
own op on the model's real shapes, for decode (1, 8 and 32 rows) and prefill (512 rows), interleaved, the best
of a few runs each: a row count where the kernel is slower runs torch. The outcome is a `KernelPlan`, logged at
load and reported by `/server_info` as `cpu_kernels`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from pdserve.model.host_memory import host_zeros
from pdserve.model.kernel_plan import KernelPlan, OpChoice, OpTiming

if TYPE_CHECKING:
    from pdserve.model.cpu_kernels import CpuKernels
    from pdserve.model.llama import LlamaArch
    from pdserve.model.ops import TorchOps

logger = logging.getLogger(__name__)

DECODE_ROWS = (1, 8, 32)
PREFILL_ROWS = 512
ATTENTION_CONTEXT_LEN = 512  # tokens of context per sequence when decode attention is timed
LINEAR_OPS = ("linear.qkv", "linear.o", "linear.gate_up", "linear.down", "linear.lm_head")
OTHER_OPS = ("rmsnorm", "silu_mul", "rope_store", "decode_attention")
_REPEATS = {True: 5, False: 3}  # decode-sized, prefill-sized


# ---- correctness -------------------------------------------------------------------------------------

def _mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    """"" when got matches want to fp32 rounding, else what differs."""
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not bool(torch.isfinite(got).all()):
        return "non-finite values"
    err = (got - want).abs().max().item()
    limit = 1e-3 * max(1.0, want.abs().max().item())
    return "" if err <= limit else f"max abs error {err:.3g} > {limit:.3g}"


def _check_correct(kernels: CpuKernels, ref: TorchOps, arch: LlamaArch, gen: torch.Generator) -> dict[str, str]:
    """Each kernel on small random inputs against the torch op: {op: why it is wrong} for the wrong ones."""
    from pdserve.model.ops import KernelOps

    kops = KernelOps(kernels, None, ref.cos, ref.sin)
    nh, nkv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    rows = 5

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    k_in, n_out = 40, kernels.panel_width * 2 + 3  # a partial last panel
    x, w_t, bias, add = randn(rows, k_in), randn(k_in, n_out), randn(n_out), randn(rows, n_out)
    linear = _mismatch(kernels.linear(x, kernels.pack(w_t), bias, add.clone()), ref.linear(x, w_t, bias, add))
    h = randn(rows, 48)
    norm_w = randn(48)
    gate_up = randn(rows, 2 * 40)
    results = {op: linear for op in LINEAR_OPS}
    results["rmsnorm"] = _mismatch(kops.rmsnorm(h, norm_w, 1e-5), ref.rmsnorm(h, norm_w, 1e-5))
    results["silu_mul"] = _mismatch(kops.silu_mul(gate_up), ref.silu_mul(gate_up))

    qkv = randn(rows, (nh + 2 * nkv) * d)
    positions = torch.randint(0, ref.cos.shape[0], (rows,), generator=gen)
    slots = torch.randperm(rows + 3, generator=gen)[:rows]
    outs = []
    for o in (ref, kops):
        k_pool, v_pool = torch.zeros(rows + 3, nkv, d), torch.zeros(rows + 3, nkv, d)
        q = o.rope_store(qkv, o.rope_inputs(positions), nh, nkv, d, slots, k_pool, v_pool)
        outs.append(torch.cat([q.flatten(), k_pool.flatten(), v_pool.flatten()]))
    results["rope_store"] = _mismatch(outs[1], outs[0])

    lens = torch.tensor([1, 17, 300])  # 300: two attention chunks merged
    k_pool, v_pool = randn(301, nkv, d), randn(301, nkv, d)
    table = torch.zeros(3, 300, dtype=torch.long)
    for b, n in enumerate(lens.tolist()):
        table[b, :n] = torch.randperm(300, generator=gen)[:n] + 1
    q = randn(3, nh, d) * 3
    scale = d**-0.5
    results["decode_attention"] = _mismatch(kops.decode_attention(q, k_pool, v_pool, table, lens, scale),
                                            ref.decode_attention(q, k_pool, v_pool, table, lens, scale))
    return {op: why for op, why in results.items() if why}


# ---- timing ------------------------------------------------------------------------------------------

def _best_ms(kernel_fn: Callable[[], object], torch_fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    kernel_fn(), torch_fn()  # untimed: first touches, lazy initialisation
    best_kernel = best_torch = float("inf")
    for _ in range(repeats):  # interleaved: a slow phase of the machine hits both
        t0 = time.perf_counter()
        kernel_fn()
        t1 = time.perf_counter()
        torch_fn()
        t2 = time.perf_counter()
        best_kernel, best_torch = min(best_kernel, t1 - t0), min(best_torch, t2 - t1)
    return best_kernel * 1e3, best_torch * 1e3


def _linear_shapes(arch: LlamaArch) -> dict[str, tuple[int, int]]:
    h, d = arch.hidden_size, arch.head_dim
    return {
        "linear.qkv": (h, (arch.num_heads + 2 * arch.num_kv_heads) * d),
        "linear.o": (arch.num_heads * d, h),
        "linear.gate_up": (h, 2 * arch.intermediate_size),
        "linear.down": (arch.intermediate_size, h),
        "linear.lm_head": (h, arch.vocab_size),
    }


def _uniform(*shape: int) -> torch.Tensor:
    return torch.empty(shape).uniform_(-0.05, 0.05)


def _time_linear(kernels: CpuKernels, ref: TorchOps, k_in: int, n_out: int, row_counts: tuple[int, ...]):
    w_t = _uniform(k_in, n_out)
    packed, plain = kernels.pack(w_t), ref.pack(w_t)  # both as the model holds them (huge pages)
    del w_t
    timings = []
    for rows in row_counts:
        x = _uniform(rows, k_in)
        out = torch.empty(rows, n_out)
        ms = _best_ms(lambda: kernels.linear(x, packed, out=out), lambda: ref.linear(x, plain),
                      _REPEATS[rows <= DECODE_ROWS[-1]])
        timings.append(OpTiming(rows, *ms))
    return tuple(timings)


def _time_other(op: str, kops, ref: TorchOps, arch: LlamaArch, rows: int) -> tuple[float, float]:
    nh, nkv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    repeats = _REPEATS[rows <= DECODE_ROWS[-1]]
    if op == "rmsnorm":
        x, w = _uniform(rows, arch.hidden_size), _uniform(arch.hidden_size)
        return _best_ms(lambda: kops.rmsnorm(x, w, 1e-5), lambda: ref.rmsnorm(x, w, 1e-5), repeats)
    if op == "silu_mul":
        gu = _uniform(rows, 2 * arch.intermediate_size)
        return _best_ms(lambda: kops.silu_mul(gu), lambda: ref.silu_mul(gu), repeats)
    if op == "rope_store":
        qkv = _uniform(rows, (nh + 2 * nkv) * d)
        positions = torch.arange(rows) % ref.cos.shape[0]
        slots = torch.arange(1, rows + 1)
        k_pool, v_pool = host_zeros((rows + 1, nkv, d), torch.float32), host_zeros((rows + 1, nkv, d), torch.float32)
        return _best_ms(
            lambda: kops.rope_store(qkv, kops.rope_inputs(positions), nh, nkv, d, slots, k_pool, v_pool),
            lambda: ref.rope_store(qkv, ref.rope_inputs(positions), nh, nkv, d, slots, k_pool, v_pool), repeats)
    # decode_attention: `rows` sequences of ATTENTION_CONTEXT_LEN tokens each, in a pool of that many slots
    ctx = ATTENTION_CONTEXT_LEN
    k_pool, v_pool = (host_zeros((rows * ctx + 1, nkv, d), torch.float32) for _ in range(2))
    k_pool.uniform_(-1, 1), v_pool.uniform_(-1, 1)
    table = torch.arange(1, rows * ctx + 1).view(rows, ctx)
    lens = torch.full((rows,), ctx)
    q = _uniform(rows, nh, d)
    return _best_ms(lambda: kops.decode_attention(q, k_pool, v_pool, table, lens, d**-0.5),
                    lambda: ref.decode_attention(q, k_pool, v_pool, table, lens, d**-0.5), repeats)


def check_kernels(kernels: CpuKernels, ref: TorchOps, arch: LlamaArch) -> KernelPlan:
    """Check every kernel, time the correct ones, and log the path each op takes."""
    from pdserve.model.cpu_kernels import ATT_MAX_HEADS, cpu_isas
    from pdserve.model.ops import KernelOps

    t_start = time.perf_counter()
    wrong = _check_correct(kernels, ref, arch, torch.Generator().manual_seed(0))
    kops = KernelOps(kernels, None, ref.cos, ref.sin)
    every_rows = (*DECODE_ROWS, PREFILL_ROWS)
    choices = []
    for op, (k_in, n_out) in _linear_shapes(arch).items():
        if op in wrong:
            choices.append(OpChoice(op, refused=wrong[op]))
            continue
        row_counts = DECODE_ROWS if op == "linear.lm_head" else every_rows  # logits: one row per sequence
        choices.append(OpChoice(op, _time_linear(kernels, ref, k_in, n_out, row_counts)))
    for op in OTHER_OPS:
        if op == "decode_attention" and arch.num_heads > ATT_MAX_HEADS:
            choices.append(OpChoice(op, refused=f"{arch.num_heads} heads > {ATT_MAX_HEADS}"))
        elif op in wrong:
            choices.append(OpChoice(op, refused=wrong[op]))
        else:
            row_counts = DECODE_ROWS if op == "decode_attention" else every_rows
            choices.append(OpChoice(op, tuple(OpTiming(r, *_time_other(op, kops, ref, arch, r))
                                              for r in row_counts)))
    plan = KernelPlan(kernels.isa, cpu_isas(), tuple(choices))
    logger.info("CPU kernels: %s path (this CPU runs %s), %d threads, checked in %.1f s", kernels.isa,
                "/".join(plan.cpu_isas), torch.get_num_threads(), time.perf_counter() - t_start)
    for c in choices:
        if c.refused:
            logger.warning("CPU kernel %s refused, torch runs it: %s", c.op, c.refused)
        logger.info("  %-16s %s", c.op, c.describe())
    return plan
