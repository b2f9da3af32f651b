"""How much of a decode step is host work that an overlap loop (SGLang's overlap scheduler) could hide.

    .venv/bin/python benchmarks/decode_host_overhead.py [--streams 4] [--new-tokens 200] [--cpu 1]

One engine on one core (as a PD decode engine runs under `pdserve up`) decodes --streams greedy requests of
--new-tokens tokens; each phase of Engine.step() is timed: the scheduler's schedule() and update(), building
the serialisable batch, the model's forward, sampling, and building the outputs. An overlap loop runs the
host phases of step N+1 while the device runs step N's forward; it can hide at most those phases, and only
where something else runs the forward (a GPU). On a CPU engine the forward runs on the same core as the host
phases, so there is nothing to overlap with: the table shows how small the ceiling is.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import defaultdict

HOST_PHASES = ("schedule", "build_batch", "update", "make_output")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)), help="the core the engine runs on")
    ap.add_argument("--model-path", default=None)
    a = ap.parse_args()
    os.sched_setaffinity(0, {a.cpu})
    from pdserve.config import EngineConfig, ModelConfig
    from pdserve.engine import engine as engine_module
    from pdserve.engine.engine import Engine
    from pdserve.sampling_params import SamplingParams

    eng = Engine(EngineConfig(model=ModelConfig(model_path=a.model_path), max_total_tokens=16384, num_threads=1))
    spent: dict[str, float] = defaultdict(float)  # phase -> seconds

    def timed(owner, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - t
        setattr(owner, name, wrapper)

    timed(eng.scheduler, "schedule", "schedule")
    timed(eng.scheduler, "update", "update")
    timed(eng, "make_output", "make_output")
    timed(engine_module, "build_forward_batch", "build_batch")
    timed(eng.runner, "forward", "forward")
    timed(eng.runner, "_sample", "sample")
    sp = SamplingParams(max_new_tokens=a.new_tokens, temperature=0, ignore_eos=True)
    eng.generate(["warm up"], SamplingParams(max_new_tokens=8, temperature=0))
    prompts = [f"Tell me something about topic number {i}." for i in range(a.streams)]
    eng.generate(prompts, SamplingParams(max_new_tokens=1, temperature=0))  # prefill-sized warmup
    spent.clear()
    t0 = time.perf_counter()
    eng.generate(prompts, sp)
    wall = time.perf_counter() - t0
    steps = a.new_tokens  # one prefill step, then new_tokens - 1 decode steps
    host = sum(spent[p] for p in HOST_PHASES)
    print(f"{a.streams} streams x {a.new_tokens} tokens, 1 thread on cpu {a.cpu} ({platform.machine()}, "
          f"isa {eng.kernel_plan.isa}); {steps} steps, {1e3 * wall / steps:.2f} ms per step")
    print("| phase | ms per step | share of the step |\n|---|---:|---:|")
    for phase in ("schedule", "build_batch", "forward", "sample", "update", "make_output"):
        print(f"| {phase} | {1e3 * spent[phase] / steps:.3f} | {100 * spent[phase] / wall:.2f}% |")
    other = wall - sum(spent.values())
    print(f"| other (generate loop) | {1e3 * other / steps:.3f} | {100 * other / wall:.2f}% |")
    print(f"host phases an overlap loop could hide: {1e3 * host / steps:.3f} ms per step "
          f"({100 * host / wall:.2f}% of the step)")


if __name__ == "__main__":
    main()
