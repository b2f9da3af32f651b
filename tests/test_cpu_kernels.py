"""The fp32 CPU kernels (pdserve/model/cpu_kernels.c) against the plain torch ops they replace, on every ISA
path this CPU can run (an AVX-512 machine also runs the AVX2 and portable builds; an AVX2 one, two of them)."""

import shutil

import pytest
import torch

from pdserve.envs import ENVS

from pdserve.model import cpu_kernels
from pdserve.model.ops import KernelOps, TorchOps

HAS_CC = shutil.which(ENVS.cc) is not None or shutil.which("cc") is not None
pytestmark = [pytest.mark.skipif(not HAS_CC, reason="no C compiler: the torch path runs instead"),
              pytest.mark.skipif(ENVS.disable_cpu_kernels, reason="PDSERVE_DISABLE_CPU_KERNELS is set")]
ISAS = cpu_kernels.cpu_isas()


def test_every_path_builds_where_a_compiler_exists():
    for isa in ISAS:
        kernels = cpu_kernels.load(isa)
        assert kernels is not None, f"a C compiler is present but the {isa} kernels did not build (see the warning)"
        assert kernels.isa == isa and kernels.panel_width in (8, 16, 32)
    assert ISAS[-1] == "portable"
    assert cpu_kernels.default_isa() in ISAS

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, MAX_POS = 6, 2, 64, 256


@pytest.fixture(scope="module", params=ISAS)
def ops(request) -> tuple[TorchOps, KernelOps]:
    g = torch.Generator().manual_seed(0)
    cos, sin = torch.rand(MAX_POS, HEAD_DIM, generator=g), torch.rand(MAX_POS, HEAD_DIM, generator=g)
    return TorchOps(cos, sin, torch.float32), KernelOps(cpu_kernels.load(request.param), None, cos, sin)


@pytest.mark.parametrize("m", [1, 3, 8, 9, 33])
@pytest.mark.parametrize("k,n", [(64, 96), (100, 70), (576, 960)])  # 70: a partial last panel
def test_linear_matches_matmul(ops, m, k, n):
    ref_ops, kern = ops
    x, w_t, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
    packed = kern.pack(w_t)
    torch.testing.assert_close(kern.linear(x, packed), x @ w_t, rtol=1e-4, atol=1e-4)
    add = torch.randn(m, n)
    want = ref_ops.linear(x, w_t, bias, add.clone())
    got = kern.linear(x, packed, bias, add)  # in place into add
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.data_ptr() == add.data_ptr()


def test_linear_is_batch_invariant(ops):
    """A row's result does not depend on which other rows share the batch (same k order for any M)."""
    _, kern = ops
    x, packed = torch.randn(11, 576), kern.pack(torch.randn(576, 320))
    alone = torch.cat([kern.linear(x[i : i + 1], packed) for i in range(11)])
    assert torch.equal(kern.linear(x, packed), alone)


def test_rmsnorm_and_silu_mul(ops):
    ref_ops, kern = ops
    x, w = torch.randn(5, 576), torch.randn(576)
    torch.testing.assert_close(kern.rmsnorm(x, w, 1e-5), ref_ops.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    gu = torch.randn(5, 2 * 1539) * 8  # 1539: a tail past the last full vector; * 8: both signs far from 0
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    torch.testing.assert_close(kern.silu_mul(gu), ref_ops.silu_mul(gu), rtol=1e-5, atol=1e-5)


def _pools(num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(num_slots, NUM_KV_HEADS, HEAD_DIM), torch.zeros(num_slots, NUM_KV_HEADS, HEAD_DIM))


def test_rope_store_writes_the_same_pool(ops):
    ref_ops, kern = ops
    t = 7
    qkv = torch.randn(t, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM)
    positions, slots = torch.tensor([0, 1, 2, 50, 51, 200, 255]), torch.tensor([3, 9, 4, 12, 1, 7, 15])
    results = []
    for o in (ref_ops, kern):
        k_pool, v_pool = _pools(16)
        q = o.rope_store(qkv, o.rope_inputs(positions), NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, slots, k_pool, v_pool)
        results.append((q, k_pool, v_pool))
    for want, got in zip(results[0], results[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_attention_reads_the_pool_in_place(ops):
    ref_ops, kern = ops
    k_pool, v_pool = torch.randn(800, NUM_KV_HEADS, HEAD_DIM), torch.randn(800, NUM_KV_HEADS, HEAD_DIM)
    lens = torch.tensor([1, 5, 17, 600])  # 600: several 256-token chunks merged
    table = torch.zeros(4, 600, dtype=torch.long)  # padded with slot 0
    for b, n in enumerate(lens.tolist()):
        table[b, :n] = torch.randperm(799)[:n] + 1
    q = torch.randn(4, NUM_HEADS, HEAD_DIM) * 3  # peaked softmaxes too
    want = ref_ops.decode_attention(q, k_pool, v_pool, table, lens, HEAD_DIM**-0.5)
    got = kern.decode_attention(q, k_pool, v_pool, table, lens, HEAD_DIM**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    from tests.engine_helpers import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))  # qwen2: q/k/v biases


@pytest.mark.parametrize("isa", ISAS)
def test_fused_decode_layers_match_op_by_op(isa, tiny_model_dir, monkeypatch):
    """A decode-only batch runs every layer in one call (pd_decode_layers): the same logits, bit for bit, as
    the ops one by one, and the same K/V written to the pools."""
    from pdserve.model import ops as ops_module
    from pdserve.model.llama import AttnMetadata, KVCache, LlamaForCausalLM, PrefillSegment

    kernels = cpu_kernels.load(isa)
    monkeypatch.setattr(cpu_kernels, "load", lambda isa=None: kernels)
    monkeypatch.setattr(ops_module, "check_kernels", lambda kernels, ops, arch: None)  # every op its kernel
    cpu = torch.device("cpu")
    model = LlamaForCausalLM(tiny_model_dir, torch.float32, cpu)
    assert isinstance(model.ops, KernelOps) and model.ops.k.isa == isa
    prompt_lens = [5, 9, 2]
    caches, fused_calls = [], []
    fused_layers = model.ops.decode_layers
    for fused in (True, False):
        if fused:
            monkeypatch.setattr(model.ops, "decode_layers",
                                lambda *args: fused_calls.append(fused_layers(*args)) or fused_calls[-1])
        else:
            monkeypatch.setattr(model.ops, "decode_layers", lambda *args: None)
        kv = KVCache(model.arch, 64, torch.float32, cpu)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 1000, (sum(prompt_lens),), generator=g)
        positions = torch.cat([torch.arange(n) for n in prompt_lens])
        slots = torch.arange(1, sum(prompt_lens) + 1)  # slot 0 stays the padding slot
        starts = [sum(prompt_lens[:i]) for i in range(len(prompt_lens))]
        segs = [PrefillSegment(s, n, slots[s : s + n], 0) for s, n in zip(starts, prompt_lens)]
        model.forward(ids, positions, AttnMetadata(slots, segs, len(ids), None, None), kv,
                      torch.tensor([s + n - 1 for s, n in zip(starts, prompt_lens)]))
        logits = []
        for step in range(2):  # two decode steps for the three sequences
            new_slots = torch.arange(40 + 3 * step, 43 + 3 * step)
            lens = torch.tensor([n + step + 1 for n in prompt_lens])
            table = torch.zeros(3, int(lens.max()), dtype=torch.long)
            for b, (s, n) in enumerate(zip(starts, prompt_lens)):
                row = [*slots[s : s + n].tolist(), *[40 + 3 * i + b for i in range(step + 1)]]
                table[b, : len(row)] = torch.tensor(row)
            meta = AttnMetadata(new_slots, [], 0, table, lens)
            logits.append(model.forward(torch.randint(0, 1000, (3,), generator=g), lens - 1, meta, kv,
                                        torch.arange(3)))
        caches.append((torch.stack(logits), torch.stack(kv.k), torch.stack(kv.v)))
    assert [call is None for call in fused_calls] == [True, False, False]  # the prefill step runs op by op
    for fused, unfused in zip(*caches):
        assert torch.equal(fused, unfused)
