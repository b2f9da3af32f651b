"""Engine throughput, pdserve vs transformers generate(), side by side in one run.

    .venv/bin/python benchmarks/engine_throughput.py [--model-path P] [--threads 2] [--skip-hf]

Prints prefill tokens/s (512-token prompt; median of 3 after one untimed run), single-stream decode tokens/s (128 new tokens) and total
tokens/s for 32 concurrent requests with 128 new tokens each.
"""

from __future__ import annotations

import argparse
import time

import torch

from pdserve.config import EngineConfig, ModelConfig
from pdserve.engine.engine import Engine
from pdserve.sampling_params import SamplingParams

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


def bench_pdserve(args, dtype: str = "float32") -> dict[str, float]:
    eng = Engine(EngineConfig(model=ModelConfig(model_path=args.model_path, dtype=dtype), max_total_tokens=16384,
                              chunked_prefill_size=-1, max_prefill_tokens=8192, disable_radix_cache=True,
                              num_threads=args.threads, max_running_requests=64))
    tok = eng.tokenizer
    eng.generate(["warm up"], SamplingParams(max_new_tokens=4, temperature=0))
    prompt = long_prompt(tok, 512)
    one = SamplingParams(max_new_tokens=1, temperature=0)
    prefill = median_rate(512, lambda: eng.generate([prompt], one))
    sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    eng.generate(["Once upon a time"], sp)
    single = args.new_tokens / (time.perf_counter() - t)
    t = time.perf_counter()
    outs = eng.generate(BATCH_PROMPTS[: args.batch], sp)
    batch = sum(len(o.new_token_ids) for o in outs) / (time.perf_counter() - t)
    return {"prefill": prefill, "single": single, "batch": batch}


def bench_hf(args) -> dict[str, float]:
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
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        single = args.new_tokens / (time.perf_counter() - t)
        tok.padding_side = "left"
        enc = tok(BATCH_PROMPTS[: args.batch], return_tensors="pt", padding=True)
        t = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        batch = (out.shape[1] - enc.input_ids.shape[1]) * args.batch / (time.perf_counter() - t)
    return {"prefill": prefill, "single": single, "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--dtypes", default="float32", help="pdserve rows, e.g. float32,bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {f"pdserve {dt}": bench_pdserve(args, dt) for dt in args.dtypes.split(",")}
    if not args.skip_hf:
        rows["transformers generate()"] = bench_hf(args)
    print(f"\n{'engine':<26}{'prefill tok/s (512)':>22}{'decode tok/s (1 stream)':>26}"
          f"{f'total tok/s ({args.batch} streams)':>28}")
    for name, r in rows.items():
        print(f"{name:<26}{r['prefill']:>22.1f}{r['single']:>26.1f}{r['batch']:>28.1f}")


if __name__ == "__main__":
    main()
