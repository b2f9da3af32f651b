"""Parallel engines on this machine: tokens/s and TTFT for TP 1/2 and DP 1/2 (one thread per rank or replica),
and KV transfer GB/s between prefill and decode ranks for equal and mismatched TP sizes.

    .venv/bin/python benchmarks/parallel.py [--skip-serving] [--skip-transfer] [--tokens 1024]

Serving: each configuration is a real server (`pdserve.launch_server`) started alone on the machine; the
model is SmolLM2-135M-shaped (30 layers, hidden 576, MLP 1536, vocab 49152) with 8 query / 4 KV heads and
random weights, so TP 2 divides it (SmolLM2 itself has 9 heads: TP 3 is its only split, shown as one more row).
Per configuration: TTFT of a 512-token prompt (median of 3, max_new_tokens 1), one stream's decode rate (128
tokens), and 16 concurrent streams of 64 tokens (total output tok/s, wall clock from first send to last token).
Transfer: P prefill ranks (one process) write a 30-layer KV of `--tokens` tokens (contiguous slots) into D decode
ranks (another process) with nixl; time from start to every rank's SUCCESS, median of 5; GB/s counts the whole
KV once (all heads, K and V), whatever the split.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LAYERS, KV_HEADS, HEAD_DIM = 30, 4, 72


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smol_shaped_model(path: str) -> str:
    """SmolLM2-135M's shape with 8 heads / 4 KV heads (random weights; the default model's tokenizer)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pdserve.model.loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(None).hf_dir)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=576, intermediate_size=1536,
                               num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=KV_HEADS,
                               max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Server:
    def __init__(self, args: list[str]):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="pdserve-parallel-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "pdserve.launch_server", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise SystemExit(f"server {args} exited:\n{open(self.log.name).read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health_generate", timeout=30).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"server {args} did not become ready")

    def stop(self) -> None:
        import signal

        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)


def stream(url: str, ids: list[int], max_new_tokens: int) -> tuple[float, float, int]:
    """(ttft s, time of the last token s, tokens) of one streamed /generate."""
    import httpx

    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
    t0 = time.monotonic()
    ttft, last, n = None, 0.0, 0
    with httpx.stream("POST", url + "/generate", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            out = json.loads(line[5:])
            n = len(out.get("output_ids", [])) or n + 1
            last = time.monotonic() - t0
            if ttft is None:
                ttft = last
    return ttft or 0.0, last, n


def serve_row(name: str, model: str, flags: list[str]) -> dict[str, object]:
    server = Server(["--model-path", model, "--max-total-tokens", "8192", "--chunked-prefill-size", "512", *flags])
    try:
        import random

        rng = random.Random(0)
        prompt = [rng.randrange(100, 40000) for _ in range(512)]
        stream(server.url, prompt[:16], 4)  # warm up
        ttfts = [stream(server.url, [rng.randrange(100, 40000)] + prompt[1:], 1)[0] for _ in range(3)]
        ttft, last, n = stream(server.url, [1, 2, 3, 4], 128)
        single = (n - 1) / max(last - ttft, 1e-9)
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(16) as ex:
            outs = list(ex.map(lambda i: stream(server.url, [5 + i, 6, 7, 8], 64), range(16)))
        wall = time.monotonic() - t0
        total = sum(o[2] for o in outs) / wall
        return {"config": name, "ttft_512_ms": 1e3 * statistics.median(ttfts), "single_tok_s": single,
                "streams16_tok_s": total, "ttft16_median_ms": 1e3 * statistics.median(o[0] for o in outs)}
    finally:
        server.stop()


# ---- transfer -----------------------------------------------------------------------------------------------
def _xfer_side(conn, role: str, tp: int, num_tokens: int, repeats: int) -> None:
    from types import SimpleNamespace

    import msgspec
    import torch

    from pdserve.config import EngineConfig
    from pdserve.disagg.rank_transfer import DecodeLayout, RankTransfer
    from pdserve.disagg.transfer import AgentInfo, TransferState
    from pdserve.model.tp_layout import num_local_kv_heads

    local = num_local_kv_heads(KV_HEADS, tp)
    config = EngineConfig(disaggregation_mode=role, transfer_backend="nixl", tp_size=tp)
    ranks = []
    for r in range(tp):
        num_slots = 2 * num_tokens + 1  # room to stage
        pools = [torch.full((num_slots, local, HEAD_DIM), float(r), dtype=torch.float32) for _ in range(2 * LAYERS)]
        ranks.append(RankTransfer(config, r, SimpleNamespace(k=pools[0::2], v=pools[1::2]), KV_HEADS))
        ranks[-1].pools = pools  # keep the memory alive
    if role == "decode":
        conn.send([msgspec.msgpack.encode(x.local_info()) for x in ranks])
        prefill_tp = conn.recv()
        src_heads = num_local_kv_heads(KV_HEADS, prefill_tp)
        unstage_ms = []
        if src_heads < local:  # prefill TP > decode TP: the KV lands in lent slots and is regrouped here
            slots = list(range(1, num_tokens + 1))
            for _ in range(repeats):
                t0 = time.perf_counter()
                for x in ranks:
                    x.unstage(slots, num_tokens + 1, src_heads)
                unstage_ms.append(1e3 * (time.perf_counter() - t0))
        conn.send(statistics.median(unstage_ms) if unstage_ms else 0.0)
    else:
        agents = tuple(msgspec.msgpack.decode(b, type=AgentInfo) for b in conn.recv())
        layout = DecodeLayout("decode-0", agents, KV_HEADS, HEAD_DIM * 4)
        for x in ranks:
            x.add_peer(layout)
        slots = list(range(1, num_tokens + 1))
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            for x in ranks:  # mismatched TP: staged on the prefill (P < D) or into the decode's lent slots (P > D)
                stage = num_tokens + 1 if x.needs_staging(layout) else None
                x.start(i, "decode-0", slots, slots, stage_start=stage, dst_stage_start=num_tokens + 1)
            while any(x.state(i)[0] is TransferState.TRANSFERRING for x in ranks):
                time.sleep(0.0002)
            times.append(time.perf_counter() - t0)
            assert all(x.state(i)[0] is TransferState.SUCCESS for x in ranks)
            for x in ranks:
                x.release(i)
        conn.send(times[1:])  # the first is a warm-up
    conn.recv()


def transfer_row(prefill_tp: int, decode_tp: int, num_tokens: int, repeats: int = 5) -> dict[str, object]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ends, procs = {}, []
    for role, tp in (("decode", decode_tp), ("prefill", prefill_tp)):
        mine, theirs = ctx.Pipe()
        procs.append(ctx.Process(target=_xfer_side, args=(theirs, role, tp, num_tokens, repeats), daemon=True))
        procs[-1].start()
        ends[role] = mine
    ends["prefill"].send(ends["decode"].recv())
    times = ends["prefill"].recv()
    ends["decode"].send(prefill_tp)
    unstage_ms = ends["decode"].recv()
    for end in ends.values():
        end.send("exit")
    for p in procs:
        p.join(30)
    total_bytes = num_tokens * 2 * LAYERS * KV_HEADS * HEAD_DIM * 4
    t = statistics.median(times)
    total = t + unstage_ms / 1e3
    return {"prefill_tp": prefill_tp, "decode_tp": decode_tp, "tokens": num_tokens, "ms": 1e3 * t,
            "unstage_ms": unstage_ms, "gb_s": total_bytes / total / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--skip-transfer", action="store_true")
    ap.add_argument("--tokens", type=int, default=1024, help="prompt tokens per KV transfer")
    ap.add_argument("--only", default="", help="run only serving rows whose name contains this text")
    ap.add_argument("--model-dir", default=os.path.expanduser("~/.cache/pdserve/bench-smol-8h"))
    args = ap.parse_args()
    from pdserve.model.cpu_kernels import cpu_isas
    from pdserve.model.loader import resolve_model

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, kernel paths "
          f"{', '.join(cpu_isas())} (PDSERVE_CPU_ISA={os.environ.get('PDSERVE_CPU_ISA', 'unset')})")
    if not args.skip_serving:
        model = smol_shaped_model(args.model_dir)
        smol = resolve_model(None).hf_dir
        configs = [("TP1 x 1 thread", model, ["--num-threads", "1"]),
                   ("TP1 x 2 threads", model, ["--num-threads", "2"]),
                   ("TP2 (1 thread/rank)", model, ["--tp", "2", "--num-threads", "1"]),
                   ("DP2 (1 thread/replica)", model, ["--dp", "2", "--num-threads", "1"]),
                   ("SmolLM2 TP1 x 2 threads", smol, ["--num-threads", "2"]),
                   ("SmolLM2 TP3 (1 thread/rank)", smol, ["--tp", "3", "--num-threads", "1"])]
        rows = [serve_row(*c) for c in configs if args.only in c[0]]
        print("\n| configuration | TTFT 512 tok (ms) | 1 stream (tok/s) | 16 streams (tok/s) | TTFT under 16 (ms) |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['config']} | {r['ttft_512_ms']:.0f} | {r['single_tok_s']:.1f} | {r['streams16_tok_s']:.1f} "
                  f"| {r['ttft16_median_ms']:.0f} |")
    if not args.skip_transfer:
        pairs = [(1, 1), (2, 2), (1, 2), (2, 1), (1, 4), (4, 1)]
        rows = [transfer_row(p, d, args.tokens) for p, d in pairs]
        print(f"\nKV transfer, nixl, {args.tokens} tokens x {LAYERS} layers x K,V x {KV_HEADS} heads x {HEAD_DIM} "
              f"x fp32 = {args.tokens * 2 * LAYERS * KV_HEADS * HEAD_DIM * 4 / 1e6:.1f} MB")
        print("| prefill TP -> decode TP | write ms (median of 5) | decode regroup ms | GB/s (write + regroup) |")
        print("|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['prefill_tp']} -> {r['decode_tp']} | {r['ms']:.1f} | {r['unstage_ms']:.1f} | {r['gb_s']:.2f} |")


if __name__ == "__main__":
    main()
