"""Which path each op of the CPU forward takes (the outcome of kernel_check.py): plain data, no torch, so it
crosses the engine's pipe in EngineReady and becomes `cpu_kernels` in /server_info."""

from __future__ import annotations

from dataclasses import dataclass

KERNEL_TIE_MARGIN = 1.02  # a kernel within 2% of torch (timing noise) keeps the op: one weight form, not two


@dataclass(frozen=True)
class OpTiming:
    rows: int
    kernel_ms: float
    torch_ms: float

    @property
    def kernel_wins(self) -> bool:
        return self.kernel_ms <= self.torch_ms * KERNEL_TIE_MARGIN


@dataclass(frozen=True)
class OpChoice:
    """One op's outcome: refused (wrong result), or timed at ascending row counts. A batch of `rows` takes
    the choice of the first timed row count >= rows (the largest one beyond it)."""

    op: str
    timings: tuple[OpTiming, ...] = ()
    refused: str = ""  # why the kernel's result was wrong; "" when it was right

    def kernel_for(self, rows: int) -> bool:
        if self.refused or not self.timings:
            return False
        for t in self.timings:
            if rows <= t.rows:
                return t.kernel_wins
        return self.timings[-1].kernel_wins

    @property
    def path(self) -> str:
        wins = {t.kernel_wins for t in self.timings} if not self.refused else {False}
        return "mixed" if len(wins) == 2 else ("kernel" if wins == {True} else "torch")

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"path": self.path}
        if self.refused:
            out["refused"] = self.refused
        out["rows"] = {str(t.rows): {"path": "kernel" if t.kernel_wins else "torch",
                                     "kernel_ms": round(t.kernel_ms, 4), "torch_ms": round(t.torch_ms, 4)}
                       for t in self.timings}
        return out

    def describe(self) -> str:
        if self.refused:
            return f"torch (kernel refused: {self.refused})"
        parts = [f"{t.rows}:{'kernel' if t.kernel_wins else 'torch'} ({t.kernel_ms:.3f} vs {t.torch_ms:.3f} ms)"
                 for t in self.timings]
        return f"{self.path} [rows {', '.join(parts)}]"


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
