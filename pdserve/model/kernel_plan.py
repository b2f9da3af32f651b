"""Which path each op of the CPU forward takes (the outcome of kernel_check.py): plain data, no torch, so it
crosses the engine's pipe in EngineReady and becomes `cpu_kernels` in /server_info.

An op has two decisions, one per kind of row: decode rows (one token per sequence; timed at 1, 8 and 32 rows)
and prefill rows (prompt tokens; timed at 512 rows). Every row of a kind takes the same path whatever the batch,
so a request's numbers do not depend on the size of the batch it runs in where the kernels run (the kernels
are batch-invariant; torch's GEMM is not, from one row count to another).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KERNEL_TIE_MARGIN = 1.02  # a kernel within 2% of torch (timing noise) keeps the op: one weight form, not two
PREFILL_MIN_ROWS = 64  # timings at fewer rows are decode-sized, at this many or more prefill-sized


@dataclass(frozen=True)
class OpTiming:
    rows: int
    kernel_ms: float
    torch_ms: float

    @property
    def kernel_wins(self) -> bool:
        return self.kernel_ms <= self.torch_ms * KERNEL_TIE_MARGIN


def _kernel_wins(timings: list[OpTiming]) -> bool | None:
    """Over several row counts: the geometric mean of kernel/torch time ratios. None: nothing timed."""
    if not timings:
        return None
    log_ratio = sum(math.log(t.kernel_ms / t.torch_ms) for t in timings) / len(timings)
    return math.exp(log_ratio) <= KERNEL_TIE_MARGIN


@dataclass(frozen=True)
class OpChoice:
    """One op's outcome: refused (wrong result), or timed at ascending row counts."""

    op: str
    timings: tuple[OpTiming, ...] = ()
    refused: str = ""  # why the kernel's result was wrong; "" when it was right

    @property
    def decode_kernel(self) -> bool:
        """Decode rows run the kernel."""
        wins = _kernel_wins([t for t in self.timings if t.rows < PREFILL_MIN_ROWS])
        return not self.refused and bool(wins)

    @property
    def prefill_kernel(self) -> bool:
        """Prefill rows run the kernel (ops timed at decode sizes only: as decode rows)."""
        wins = _kernel_wins([t for t in self.timings if t.rows >= PREFILL_MIN_ROWS])
        return self.decode_kernel if wins is None else (not self.refused and wins)

    @property
    def path(self) -> str:
        picks = {self.decode_kernel, self.prefill_kernel}
        return "mixed" if len(picks) == 2 else ("kernel" if picks == {True} else "torch")

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"path": self.path, "decode": "kernel" if self.decode_kernel else "torch",
                                  "prefill": "kernel" if self.prefill_kernel else "torch"}
        if self.refused:
            out["refused"] = self.refused
        out["rows"] = {str(t.rows): {"kernel_ms": round(t.kernel_ms, 4), "torch_ms": round(t.torch_ms, 4)}
                       for t in self.timings}
        return out

    def describe(self) -> str:
        if self.refused:
            return f"torch (kernel refused: {self.refused})"
        times = ", ".join(f"{t.rows}: {t.kernel_ms:.3f} vs {t.torch_ms:.3f}" for t in self.timings)
        return (f"decode {'kernel' if self.decode_kernel else 'torch'}, prefill "
                f"{'kernel' if self.prefill_kernel else 'torch'} (rows: kernel vs torch ms: {times})")


@dataclass(frozen=True)
class KernelPlan:
    """Which path each op takes. isa "none": no kernels run (note says why)."""

    isa: str
    cpu_isas: tuple[str, ...]
    choices: tuple[OpChoice, ...] = ()
    note: str = ""

    def choice(self, op: str) -> OpChoice:
        for c in self.choices:
            if c.op == op:
                return c
        return OpChoice(op, refused="not checked")

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"isa": self.isa, "cpu_isas": list(self.cpu_isas),
                                  "ops": {c.op: c.to_json() for c in self.choices}}
        if self.note:
            out["note"] = self.note
        return out
