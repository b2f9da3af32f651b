"""fp32 CPU kernels (cpu_kernels.c), compiled with the system C compiler at first use and cached.

The shared library is keyed by the source, the compiler and this CPU's flags, built into a temporary file and
renamed into place (several servers may start at once). It links the OpenMP runtime torch has already
loaded (same soname), so kernels and torch share one thread pool sized by torch.set_num_threads().
`load()` returns None when no compiler is found or PDSERVE_DISABLE_CPU_KERNELS=1; the model then runs
its plain torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import torch

from pdserve.envs import ENVS
from pdserve.model.host_memory import host_zeros

logger = logging.getLogger(__name__)

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.c")
PANEL_WIDTH = 32  # PW in cpu_kernels.c
ATT_MAX_HEADS = 64  # ATT_MAX_HEADS in cpu_kernels.c
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_I64, _F32, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "pd_pack": [_P, _I64, _I64, _I64, _P],
    "pd_linear": [_P, _I64, _I64, _I64, _P, _I64, _P, _I64, _P, _P, _I64],
    "pd_rmsnorm": [_P, _I64, _I64, _I64, _P, _F32, _P],
    "pd_silu_mul": [_P, _I64, _I64, _P],
    "pd_rope_store": [_P, _I64, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P],
    "pd_decode_attention": [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _I64, _P, _F32, _P],
}


@dataclass(frozen=True)
class PackedLinear:
    """A linear layer's weight in panels [ceil(N / PW), K, PW] for pd_linear."""

    panels: torch.Tensor
    in_features: int  # K
    out_features: int  # N


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(cc: str) -> str:
    with open(_SRC, "rb") as f:
        src = f.read()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(src + repr((version, _FLAGS, _cpu_flags())).encode()).hexdigest()[:16]
    out_dir = os.path.join(ENVS.cache_dir, "kernels")
    path = os.path.join(out_dir, f"cpu_kernels-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, _SRC, "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@lru_cache(maxsize=1)
def load() -> CpuKernels | None:
    if ENVS.disable_cpu_kernels:
        return None
    cc = shutil.which(ENVS.cc) or shutil.which("cc")  # GCC: the source uses GCC vector builtins
    if cc is None:
        logger.warning("no C compiler found: CPU kernels off, the torch path runs instead (slower decode)")
        return None
    try:
        lib = ctypes.CDLL(_build(cc))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("CPU kernels failed to build (%s): the torch path runs instead", detail)
        return None
    return CpuKernels(lib)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuKernels:
    """Thin typed wrappers; every tensor is fp32 (int64 for indices), on CPU, with a unit inner stride."""

    def __init__(self, lib: ctypes.CDLL):
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, None
        self.lib = lib

    def pack(self, w_t: torch.Tensor) -> PackedLinear:
        k, n = w_t.shape  # [K, N]
        w_t = w_t.contiguous()
        panels = host_zeros(((n + PANEL_WIDTH - 1) // PANEL_WIDTH, k, PANEL_WIDTH), torch.float32)
        self.lib.pd_pack(w_t.data_ptr(), k, n, n, panels.data_ptr())
        return PackedLinear(panels, k, n)

    def linear(self, x: torch.Tensor, w: PackedLinear, bias: torch.Tensor | None = None,
               add: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] -> [M, N] (+ bias [N]) (+ add [M, N]); out may be `add` itself (in-place residual)."""
        m = x.shape[0]
        if out is None:
            out = torch.empty((m, w.out_features), dtype=torch.float32)
        self.lib.pd_linear(x.data_ptr(), m, w.in_features, x.stride(0), w.panels.data_ptr(), w.out_features,
                           out.data_ptr(), out.stride(0), _ptr(bias), _ptr(add),
                           add.stride(0) if add is not None else 0)
        return out

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        m, h = x.shape
        out = torch.empty((m, h), dtype=torch.float32)
        self.lib.pd_rmsnorm(x.data_ptr(), m, h, x.stride(0), weight.data_ptr(), eps, out.data_ptr())
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        m, two_i = gate_up.shape  # [M, 2I] contiguous
        out = torch.empty((m, two_i // 2), dtype=torch.float32)
        self.lib.pd_silu_mul(gate_up.data_ptr(), m, two_i // 2, out.data_ptr())
        return out

    def rope_store(self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   num_heads: int, num_kv_heads: int, head_dim: int, out_slots: torch.Tensor,
                   k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """Rotated q [T, nH, D]; rotated k and v written to the pools at out_slots [T]."""
        t = qkv.shape[0]  # qkv [T, (nH + 2 nKV) * D] contiguous
        q = torch.empty((t, num_heads, head_dim), dtype=torch.float32)
        self.lib.pd_rope_store(qkv.data_ptr(), t, positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), num_heads,
                               num_kv_heads, head_dim, out_slots.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(),
                               q.data_ptr())
        return q

    def decode_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                         slot_table: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, nH, D] contiguous; slot_table [B, S] int64; lens [B] int64 -> [B, nH * D]."""
        b, nh, d = q.shape
        out = torch.empty((b, nh * d), dtype=torch.float32)
        self.lib.pd_decode_attention(q.data_ptr(), b, nh, k_pool.shape[1], d, k_pool.data_ptr(), v_pool.data_ptr(),
                                     slot_table.data_ptr(), slot_table.stride(0), lens.data_ptr(), scale,
                                     out.data_ptr())
        return out
