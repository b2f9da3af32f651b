"""The `pdserve` command: one subcommand per entry point (serve, generate, up, ...)."""

from __future__ import annotations

import argparse
import sys

from pdserve import __version__
from pdserve.bench.args import add_bench_args
from pdserve.router import args as router_args
from pdserve.server.args import add_serve_args, parse_config


def _cmd_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    config = parse_config(parser, args)
    from pdserve.server.runner import run_server

    return run_server(config)


def _cmd_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pdserve.config import EngineConfig, ModelConfig
    from pdserve.engine.engine import Engine
    from pdserve.sampling_params import SamplingParams

    try:
        sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
        config = EngineConfig(model=ModelConfig(model_path=args.model_path), max_total_tokens=args.max_total_tokens,
                              num_threads=args.num_threads)
    except ValueError as e:
        parser.error(str(e))
    engine = Engine(config)
    prompts = args.prompt
    if args.chat:
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                        add_generation_prompt=True) for p in prompts]
    for out in engine.generate(prompts, sp):
        print(engine.tokenizer.decode(out.new_token_ids, skip_special_tokens=True))
    return 0


def _cmd_up(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pdserve.deploy import run_up

    return run_up(args)


def _cmd_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pdserve.bench.command import run_bench_command

    return run_bench_command(parser, args)


def _cmd_route(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    config = router_args.parse_config(parser, args)
    from pdserve.router.runner import run_router

    return run_router(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="LLM serving with prefill/decode disaggregation.")
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the HTTP server (OpenAI and SGLang-native APIs)")
    add_serve_args(serve)
    serve.set_defaults(handler=_cmd_serve, subparser=serve)
    route = sub.add_parser("route", help="run the router in front of prefill/decode (or unified) servers")
    router_args.add_router_args(route)
    route.set_defaults(handler=_cmd_route, subparser=route)
    gen = sub.add_parser("generate", help="offline generation in this process (no server)")
    gen.add_argument("--prompt", action="append", required=True, help="may repeat: prompts run batched")
    gen.add_argument("--model-path", default=None)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--max-total-tokens", type=int, default=8192)
    gen.add_argument("--num-threads", type=int, default=None)
    gen.set_defaults(handler=_cmd_generate, subparser=gen)
    from pdserve.deploy import add_up_args

    up = sub.add_parser("up", help="start a local PD deployment: router + prefill + decode servers")
    add_up_args(up)
    up.set_defaults(handler=_cmd_up, subparser=up)
    bench = sub.add_parser("bench", help="benchmark an OpenAI-compatible endpoint (TTFT, ITL, throughput)")
    add_bench_args(bench)
    bench.set_defaults(handler=_cmd_bench, subparser=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args.subparser, args)


if __name__ == "__main__":
    sys.exit(main())
