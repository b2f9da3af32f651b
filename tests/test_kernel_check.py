"""The load-time self-check (pdserve/model/kernel_check.py): a wrong kernel is refused, a slower one gives its
op to torch, the model holds each weight in the forms its op runs, and a forced lower ISA path is taken."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from pdserve.envs import ENVS
from pdserve.model import cpu_kernels
from pdserve.model.kernel_check import DECODE_ROWS, LINEAR_OPS, OTHER_OPS, PREFILL_ROWS, check_kernels
from pdserve.model.kernel_plan import KernelPlan, OpChoice, OpTiming
from pdserve.model.llama import LlamaArch, LlamaForCausalLM
from pdserve.model.ops import KernelOps, LinearWeight, TorchOps
from tests.conftest import REPO_ROOT
from tests.engine_helpers import build_tiny_model

KERNELS = cpu_kernels.load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="no CPU kernels here (no compiler, or disabled)")

ARCH = LlamaArch(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=2,
                 head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False,
                 qkv_bias=False)
SLOW_S = 0.05  # a deliberately slow kernel: tens of ms where torch takes microseconds at these shapes


def _ref() -> TorchOps:
    g = torch.Generator().manual_seed(0)
    return TorchOps(torch.rand(64, 16, generator=g), torch.rand(64, 16, generator=g), torch.float32)


class WrongRmsnorm(cpu_kernels.CpuKernels):
    def __init__(self, base: cpu_kernels.CpuKernels):
        super().__init__(base.lib, base.isa)

    def rmsnorm(self, x, weight, eps):
        return super().rmsnorm(x, weight, eps) * 1.01


class SlowLmHead(WrongRmsnorm):
    rmsnorm = cpu_kernels.CpuKernels.rmsnorm

    def linear(self, x, w, bias=None, add=None, out=None):
        if w.out_features == ARCH.vocab_size:
            time.sleep(SLOW_S)
        return super().linear(x, w, bias, add, out)


def test_every_op_is_checked_and_timed():
    plan = check_kernels(KERNELS, _ref(), ARCH)
    assert plan.isa == KERNELS.isa and plan.isa in plan.cpu_isas
    assert [c.op for c in plan.choices] == [*LINEAR_OPS, *OTHER_OPS]
    for c in plan.choices:
        assert not c.refused, c
        want_rows = DECODE_ROWS if c.op in ("linear.lm_head", "decode_attention") else (*DECODE_ROWS, PREFILL_ROWS)
        assert tuple(t.rows for t in c.timings) == want_rows
        assert all(t.kernel_ms > 0 and t.torch_ms > 0 for t in c.timings)
    info = json.loads(json.dumps(plan.to_json()))  # what /server_info serves
    assert info["isa"] == KERNELS.isa and set(info["ops"]) == {*LINEAR_OPS, *OTHER_OPS}
    assert all(o["path"] in ("kernel", "torch", "mixed") and o["rows"] for o in info["ops"].values())
    assert all({o["decode"], o["prefill"]} <= {"kernel", "torch"} for o in info["ops"].values())


def test_a_wrong_kernel_is_refused_and_torch_runs_it(caplog):
    with caplog.at_level(logging.WARNING, logger="pdserve.model.kernel_check"):
        plan = check_kernels(WrongRmsnorm(KERNELS), _ref(), ARCH)
    choice = plan.choice("rmsnorm")
    assert choice.refused.startswith("max abs error") and choice.path == "torch" and not choice.timings
    assert plan.to_json()["ops"]["rmsnorm"]["refused"] == choice.refused
    assert any("rmsnorm refused" in r.getMessage() for r in caplog.records)
    assert all(not c.refused for c in plan.choices if c.op != "rmsnorm")
    ops = KernelOps(WrongRmsnorm(KERNELS), plan, _ref().cos, _ref().sin)
    x, w = torch.randn(3, 64), torch.randn(64)
    assert torch.equal(ops.rmsnorm(x, w, 1e-6), _ref().rmsnorm(x, w, 1e-6))  # torch's result, not the kernel's


def test_a_slower_kernel_gives_its_op_to_torch():
    plan = check_kernels(SlowLmHead(KERNELS), _ref(), ARCH)
    lm_head = plan.choice("linear.lm_head")
    assert lm_head.path == "torch" and all(t.kernel_ms >= SLOW_S * 1e3 for t in lm_head.timings)
    assert not lm_head.decode_kernel and not lm_head.prefill_kernel
    ops = KernelOps(SlowLmHead(KERNELS), plan, _ref().cos, _ref().sin)
    w_t = torch.randn(64, ARCH.vocab_size)
    weight = ops.pack(w_t, "linear.lm_head")
    assert weight.packed is None and weight.w_t is not None  # one form: torch's
    x = torch.randn(2, 64)
    assert torch.equal(ops.linear(x, weight), x @ weight.w_t)


def test_each_kind_of_row_takes_its_own_path_whatever_the_batch():
    """Decode rows run the kernel and prompt rows torch (as timed): the weight is held in both forms, and a
    decode row's numbers are the same alone or beside prompt rows and other decode rows."""
    mixed = OpChoice("linear.qkv", (OpTiming(1, 1.0, 2.0), OpTiming(32, 1.5, 1.0), OpTiming(512, 3.0, 2.0)))
    kernel_only = OpChoice("linear.o", (OpTiming(1, 1.0, 2.0), OpTiming(512, 1.0, 2.0)))
    assert mixed.path == "mixed" and mixed.decode_kernel and not mixed.prefill_kernel  # decode: geometric mean
    plan = KernelPlan(KERNELS.isa, cpu_kernels.cpu_isas(), (mixed, kernel_only))
    ref = _ref()
    ops = KernelOps(KERNELS, plan, ref.cos, ref.sin)
    w_t, bias = torch.randn(64, 96), torch.randn(96)
    both = ops.pack(w_t, "linear.qkv")
    assert isinstance(both, LinearWeight) and both.packed is not None and both.w_t is not None
    assert ops.pack(w_t, "linear.o").w_t is None and ops.pack(w_t, "linear.o").packed is not None
    unchecked = ops.pack(w_t, "linear.down")  # not in the plan: torch
    assert unchecked.packed is None and unchecked.w_t is not None

    x, residual = torch.randn(7, 64), torch.randn(7, 96)
    ops.start_rows(4)  # rows 0-3: a prompt; rows 4-6: decodes
    got = ops.linear(x, both, bias, add=residual.clone())
    torch.testing.assert_close(got, residual + x @ w_t + bias, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[:4], ref.linear(x[:4], both.w_t, bias, residual[:4]))  # torch's numbers
    for i in range(4, 7):  # the kernel's, the same as a batch of one decode
        ops.start_rows(0)
        assert torch.equal(got[i : i + 1], ops.linear(x[i : i + 1], both, bias, add=residual[i : i + 1].clone()))
    ops.start_rows(0)
    assert torch.equal(ops.linear(x[4:], both, bias, add=residual[4:].clone()), got[4:])


def test_a_near_tie_keeps_the_kernel():
    assert OpTiming(1, 1.01, 1.0).kernel_wins and not OpTiming(1, 1.1, 1.0).kernel_wins


def test_the_model_reports_its_plan(tmp_path):
    model = LlamaForCausalLM(build_tiny_model(str(tmp_path / "tiny")), torch.float32, torch.device("cpu"))
    plan = model.ops.plan
    assert plan.isa == cpu_kernels.default_isa() and len(plan.choices) == len(LINEAR_OPS) + len(OTHER_OPS)


@pytest.mark.skipif(cpu_kernels.cpu_isas() == ("portable",), reason="this CPU runs the portable path only")
def test_a_forced_lower_isa_is_taken_by_pdserve_and_torch(tmp_path):
    """PDSERVE_CPU_ISA=portable: the kernels' portable path, and torch capped too (as on a baseline machine)."""
    path = build_tiny_model(str(tmp_path / "tiny"))
    code = ("import json, os, pdserve, torch; from pdserve.model.llama import LlamaForCausalLM; "
            f"m = LlamaForCausalLM({path!r}, torch.float32, torch.device('cpu')); "
            "print(json.dumps([m.ops.plan.to_json(), os.environ.get('MKL_ENABLE_INSTRUCTIONS'), "
            "torch.backends.cpu.get_cpu_capability()]))")
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")}
    env["PDSERVE_CPU_ISA"] = "portable"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    plan, mkl, aten = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["isa"] == "portable" and mkl == "SSE4_2" and aten == "DEFAULT"
    assert ENVS.cpu_isa in ("", "auto") or ENVS.cpu_isa in cpu_kernels.ISAS
