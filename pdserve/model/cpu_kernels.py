"""fp32 CPU kernels (cpu_kernels.c), compiled with the system C compiler at first use and cached.

The one source builds one library per ISA path: `avx512` (16-lane vectors, 8-row tiles), `avx2` (AVX2 + FMA,
8 lanes, 6-row tiles fitted to 16 registers) and `portable` (4-lane vectors the compiler maps to SSE2 on x86 or
NEON on aarch64; no ISA flags). `cpu_isas()` lists the paths this CPU can run, from what it reports;
`default_isa()` is the best of them, or the one PDSERVE_CPU_ISA caps it to (envs.py caps torch the same way).
Which op then runs the kernel and which runs torch is decided at model load by kernel_check.py.

A library is keyed by the source, the compiler, its flags and the machine, built into a temporary file and
renamed into place (several servers may start at once). It links the OpenMP runtime torch has already loaded
(same soname), so kernels and torch share one thread pool sized by torch.set_num_threads(). `load()` returns
None when no compiler is found, the build fails or PDSERVE_DISABLE_CPU_KERNELS=1; the model then runs its plain
torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
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
ATT_MAX_HEADS = 64  # ATT_MAX_HEADS in cpu_kernels.c
ISAS = ("avx512", "avx2", "portable")  # best first
# PD_ISA in cpu_kernels.c, the compiler flags, and the CPU flags (x86 /proc/cpuinfo) each path needs.
_ISA_BUILD = {
    "avx512": (3, ("-mavx512f", "-mavx2", "-mfma"), frozenset({"avx512f", "avx2", "fma"})),
    "avx2": (2, ("-mavx2", "-mfma"), frozenset({"avx2", "fma"})),
    "portable": (1, (), frozenset()),
}
_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
_I64, _F32, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "pd_pack": [_P, _I64, _I64, _I64, _P],
    "pd_linear": [_P, _I64, _I64, _I64, _P, _I64, _P, _I64, _P, _P, _I64],
    "pd_rmsnorm": [_P, _I64, _I64, _I64, _P, _F32, _P],
    "pd_silu_mul": [_P, _I64, _I64, _P],
    "pd_rope_store": [_P, _I64, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P],
    "pd_decode_attention": [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _I64, _P, _F32, _P],
    "pd_decode_layers": [_P, _I64, _P, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _P, _P, _P, _P, _P, _I64, _P,
                         _F32, _P],
}


class PdLayer(ctypes.Structure):
    """pd_layer in cpu_kernels.c: one layer's packed weights, norm weights and KV pools (addresses)."""

    _fields_ = [(name, _P) for name in ("in_norm", "qkv", "qkv_bias", "o", "post_norm", "gate_up", "down",
                                        "k_pool", "v_pool")]


@dataclass(frozen=True)
class PackedLinear:
    """A linear layer's weight in panels [ceil(N / PW), K, PW] for pd_linear."""

    panels: torch.Tensor
    in_features: int  # K
    out_features: int  # N


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` of /proc/cpuinfo (None: no such line, or no /proc)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(name)), None)
    except OSError:
        return None
    return None if line is None else line.partition(":")[2].strip()


def _cpu_flags() -> frozenset[str]:
    return frozenset((_cpuinfo_field("flags") or "").split())


def cpu_model_name() -> str:
    """The CPU's model name, for benchmark reports."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_isas() -> tuple[str, ...]:
    """The kernel paths this CPU can run, best first (the portable one always)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("portable",)
    flags = _cpu_flags()
    return tuple(isa for isa in ISAS if _ISA_BUILD[isa][2] <= flags)


def default_isa() -> str:
    """The best path this CPU runs, capped by PDSERVE_CPU_ISA."""
    available = cpu_isas()
    want = ENVS.cpu_isa
    if want in ("", "auto"):
        return available[0]
    if want not in ISAS:
        raise ValueError(f"PDSERVE_CPU_ISA must be auto|{'|'.join(ISAS)}, got {want!r}")
    if want not in available:
        logger.warning("PDSERVE_CPU_ISA=%s: this CPU cannot run it; using %s", want, available[0])
        return available[0]
    return want


def _build(cc: str, isa: str) -> str:
    with open(_SRC, "rb") as f:
        src = f.read()
    level, isa_flags, _ = _ISA_BUILD[isa]
    flags = [*_FLAGS, f"-DPD_ISA={level}", *isa_flags]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(src + repr((version, flags, platform.machine())).encode()).hexdigest()[:16]
    out_dir = os.path.join(ENVS.cache_dir, "kernels")
    path = os.path.join(out_dir, f"cpu_kernels-{isa}-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, _SRC, "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@lru_cache(maxsize=None)
def load(isa: str | None = None) -> CpuKernels | None:
    """The kernels of one ISA path (default: default_isa()); None where they cannot run here."""
    if ENVS.disable_cpu_kernels:
        return None
    isa = isa or default_isa()
    if isa not in cpu_isas():
        raise ValueError(f"this CPU cannot run the {isa} kernels (it runs {', '.join(cpu_isas())})")
    cc = shutil.which(ENVS.cc) or shutil.which("cc")  # GCC or Clang: the source uses their vector extensions
    if cc is None:
        logger.warning("no C compiler found: CPU kernels off, the torch path runs instead (slower decode)")
        return None
    try:
        lib = ctypes.CDLL(_build(cc, isa))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("CPU kernels (%s) failed to build (%s): the torch path runs instead", isa, detail)
        return None
    return CpuKernels(lib, isa)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuKernels:
    """Thin typed wrappers; every tensor is fp32 (int64 for indices), on CPU, with a unit inner stride."""

    def __init__(self, lib: ctypes.CDLL, isa: str):
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, None
        if lib.pd_isa() != _ISA_BUILD[isa][0]:
            raise ValueError(f"kernel library built for PD_ISA={lib.pd_isa()}, expected {isa}")
        self.lib, self.isa = lib, isa
        self.panel_width = lib.pd_panel_width()  # PW in cpu_kernels.c

    def pack(self, w_t: torch.Tensor) -> PackedLinear:
        k, n = w_t.shape  # [K, N]
        w_t = w_t.contiguous()
        pw = self.panel_width
        panels = host_zeros(((n + pw - 1) // pw, k, pw), torch.float32)
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

    def decode_layers(self, layers: ctypes.Array, x: torch.Tensor, num_heads: int, num_kv_heads: int,
                      head_dim: int, intermediate_size: int, eps: float, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, out_slots: torch.Tensor, slot_table: torch.Tensor,
                      lens: torch.Tensor, scale: float) -> torch.Tensor:
        """Every layer for a batch of decode rows only: x [B, H] contiguous, updated in place and returned.
        layers: a PdLayer array (whose tensors the caller keeps alive); the rest as for the single ops."""
        b, h = x.shape
        work = torch.empty(b * (h + (num_heads + 2 * num_kv_heads) * head_dim + 2 * num_heads * head_dim
                                + 3 * intermediate_size), dtype=torch.float32)
        self.lib.pd_decode_layers(ctypes.addressof(layers), len(layers), x.data_ptr(), b, h, num_heads,
                                  num_kv_heads, head_dim, intermediate_size, eps, positions.data_ptr(),
                                  cos.data_ptr(), sin.data_ptr(), out_slots.data_ptr(), slot_table.data_ptr(),
                                  slot_table.stride(0), lens.data_ptr(), scale, work.data_ptr())
        return x
