"""Engine throughput on every CPU kernel path this machine has, beside torch ops and transformers generate().

    .venv/bin/python benchmarks/engine_throughput.py [--model-path P] [--threads 2] [--isas avx512,avx2,portable]
                                                     [--skip-hf] [--dtypes float32,bfloat16]

For each ISA path (default: every path this CPU runs) one child process runs with PDSERVE_CPU_ISA set to it,
which caps torch's own kernels (MKL, oneDNN, ATen) to the same ISA, as on a machine of that kind; in it:
pdserve with its kernels (each op as the load-time self-check chose), pdserve with torch ops only, and
transformers generate(). It prints prefill tokens/s (512-token prompt; median of 3 after one untimed run),
single-stream decode tokens/s (128 new tokens, median of 3) and total tokens/s for 32 concurrent requests with 128 new tokens
each, the machine's read bandwidth (2 threads) and the single-stream floor it sets (bandwidth / the fp32 weight
bytes a decode step streams), and the ops the self-check gave to torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

BATCH_PROMPTS = [f"Write a short note number {i} about {topic}."
                 for i, topic in enumerate(["the sea", "mountains", "coffee", "trains", "bees", "rain", "chess",
                                            "music"] * 4)]


def long_prompt(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode("The history of computing is long and full of surprises. " * 200)
    return ids[:n]


def median_rate(num_tokens: int, run, repeats: int = 3) -> float:
    """Tokens/s of the median of `repeats` timed runs, after one untimed run (first-touch allocations)."""
    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return num_tokens / sorted(times)[len(times) // 2]


def read_bandwidth_gbs(threads: int) -> float:
    """Best of 3 reads of a 1 GiB fp32 buffer on huge pages (as the weights are held), `threads` numpy sums in
    parallel (numpy releases the GIL; unlike torch's sum it is not capped by PDSERVE_CPU_ISA), in GB/s."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from pdserve.model.host_memory import host_zeros

    buf = host_zeros((256 << 20,), torch.float32)
    buf.fill_(1.0)
    parts = buf.numpy().reshape(threads, -1)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            t = time.perf_counter()
            list(pool.map(lambda part: part.sum(), parts))
            best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


def single_stream(threads: int, run) -> tuple[float, float]:
    """(tokens/s of `run`, the read bandwidth measured just before and after it, averaged): this machine's
    bandwidth drifts with its neighbours' load, so each row's floor comes from its own minute."""
    before = read_bandwidth_gbs(threads)
    rate = run()
    return rate, (before + read_bandwidth_gbs(threads)) / 2


def bench_pdserve(args, dtype: str) -> dict[str, object]:
    """PDSERVE_DISABLE_CPU_KERNELS=1 in the environment makes this the torch-ops row."""
    from pdserve.config import EngineConfig, ModelConfig
    from pdserve.engine.engine import Engine
    from pdserve.sampling_params import SamplingParams

    eng = Engine(EngineConfig(model=ModelConfig(model_path=args.model_path, dtype=dtype), max_total_tokens=16384,
                              chunked_prefill_size=-1, max_prefill_tokens=8192, disable_radix_cache=True,
                              num_threads=args.threads, max_running_requests=64))
    tok = eng.tokenizer
    eng.generate(["warm up"], SamplingParams(max_new_tokens=4, temperature=0))
    prompt = long_prompt(tok, 512)
    one = SamplingParams(max_new_tokens=1, temperature=0)
    prefill = median_rate(512, lambda: eng.generate([prompt], one))
    sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    single, bandwidth = single_stream(args.threads, lambda: median_rate(
        args.new_tokens, lambda: eng.generate(["Once upon a time"], sp)))
    t = time.perf_counter()
    outs = eng.generate(BATCH_PROMPTS[: args.batch], sp)
    batch = sum(len(o.new_token_ids) for o in outs) / (time.perf_counter() - t)
    model = eng.runner.model
    a = model.arch
    step_bytes = 4 * (a.num_layers * (a.hidden_size * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
                                      + a.num_heads * a.head_dim * a.hidden_size
                                      + 3 * a.hidden_size * a.intermediate_size) + a.hidden_size * a.vocab_size)
    plan = eng.kernel_plan
    on_torch = []
    for c in plan.choices:
        kinds = [kind for kind, kernel in (("decode", c.decode_kernel), ("prefill", c.prefill_kernel)) if not kernel]
        if kinds:
            on_torch.append(f"{c.op} ({'/'.join(kinds)})")
    return {"prefill": prefill, "single": single, "batch": batch, "step_bytes": step_bytes, "isa": plan.isa,
            "on_torch": on_torch, "bandwidth_gbs": bandwidth}


def bench_hf(args) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from pdserve.model.loader import load_tokenizer, resolve_model

    hf_dir = resolve_model(args.model_path).hf_dir
    tok = load_tokenizer(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        model.generate(torch.tensor([tok.encode("warm up")]), max_new_tokens=4, **kw)
        ids = torch.tensor([long_prompt(tok, 512)])
        prefill = median_rate(512, lambda: model(ids))
        ids = torch.tensor([tok.encode("Once upon a time")])
        single, bandwidth = single_stream(args.threads, lambda: median_rate(
            args.new_tokens, lambda: model.generate(ids, max_new_tokens=args.new_tokens,
                                                    min_new_tokens=args.new_tokens, **kw)))
        tok.padding_side = "left"
        enc = tok(BATCH_PROMPTS[: args.batch], return_tensors="pt", padding=True)
        t = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        batch = (out.shape[1] - enc.input_ids.shape[1]) * args.batch / (time.perf_counter() - t)
    return {"prefill": prefill, "single": single, "batch": batch, "bandwidth_gbs": bandwidth}


def child(args) -> None:
    """One row set, in this process: PDSERVE_CPU_ISA / PDSERVE_DISABLE_CPU_KERNELS come from the parent."""
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="    %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    if args.child == "hf":
        out: dict[str, object] = bench_hf(args)
    else:
        out = bench_pdserve(args, args.child)
    out["torch_isa"] = torch.backends.cpu.get_cpu_capability()
    print("RESULT " + json.dumps(out), flush=True)


def run_child(args, isa: str, what: str, kernels: bool = True) -> dict[str, object]:
    env = dict(os.environ, PDSERVE_CPU_ISA=isa)
    for name in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        env.pop(name, None)  # pdserve sets them from PDSERVE_CPU_ISA
    if not kernels:
        env["PDSERVE_DISABLE_CPU_KERNELS"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", what, "--threads", str(args.threads),
           "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
    if args.model_path:
        cmd += ["--model-path", args.model_path]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{isa} {what} failed:\n{proc.stderr[-4000:]}")
    if args.verbose:
        print(proc.stderr, file=sys.stderr)
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-torch-ops", action="store_true")
    ap.add_argument("--isas", default="", help="comma-separated ISA paths (default: every one this CPU runs)")
    ap.add_argument("--dtypes", default="float32", help="pdserve kernel rows, e.g. float32,bfloat16")
    ap.add_argument("--verbose", action="store_true", help="print each child's log (the self-check's table)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from pdserve.model.cpu_kernels import cpu_isas, cpu_model_name

    isas = args.isas.split(",") if args.isas else list(cpu_isas())
    print(f"CPU: {cpu_model_name()} ({platform.machine()}); kernel paths it runs: {', '.join(cpu_isas())}; "
          f"{args.threads} threads; {os.cpu_count()} cores")
    header = (f"{'path':<10}{'engine':<28}{'prefill tok/s':>14}{'1 stream tok/s':>16}{'GB/s':>8}{'floor':>8}{'% floor':>9}"
              f"{f'{args.batch} streams tok/s':>19}{'x HF prefill':>14}{f'x HF {args.batch}':>10}")
    sections = []
    for isa in isas:
        rows: dict[str, dict[str, object]] = {}
        for dt in args.dtypes.split(","):
            rows[f"pdserve kernels {dt}"] = run_child(args, isa, dt)
        if not args.skip_torch_ops:
            rows["pdserve torch ops"] = run_child(args, isa, "float32", kernels=False)
        if not args.skip_hf:
            rows["transformers generate()"] = run_child(args, isa, "hf")
        sections.append((isa, rows))
        print_section(isa, rows, header)
    print("\nAll paths:\n" + header)
    for isa, rows in sections:
        print_rows(isa, rows)


def print_section(isa: str, rows: dict[str, dict[str, object]], header: str) -> None:
    first = next(iter(rows.values()))
    print(f"\n[{isa}] torch capability {first['torch_isa']}; a decode step streams "
          f"{float(first['step_bytes']) / 1e6:.0f} MB of fp32 weights; floor = read bandwidth "
          "(GB/s, measured just before and after each row's single stream) / those bytes")
    for name, r in rows.items():
        if r.get("on_torch"):
            print(f"  {name}: torch runs {'; '.join(r['on_torch'])} (rows of that kind; the rest run the {r['isa']} kernels)")
    print(header)
    print_rows(isa, rows)


def print_rows(isa: str, rows: dict[str, dict[str, object]]) -> None:
    hf = rows.get("transformers generate()")
    step_bytes = float(next(iter(rows.values()))["step_bytes"])
    for name, r in rows.items():
        bandwidth = float(r["bandwidth_gbs"])
        floor = bandwidth * 1e9 / step_bytes
        vs = (f"{float(r['prefill']) / float(hf['prefill']):>14.2f}{float(r['batch']) / float(hf['batch']):>10.2f}"
              if hf else "")
        print(f"{isa:<10}{name:<28}{float(r['prefill']):>14.1f}{float(r['single']):>16.1f}{bandwidth:>8.1f}"
              f"{floor:>8.1f}{100 * float(r['single']) / floor:>8.0f}%{float(r['batch']):>19.1f}{vs}")


if __name__ == "__main__":
    main()
