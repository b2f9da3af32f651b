"""The `pdserve` command: one subcommand per entry point (serve; more to come)."""

from __future__ import annotations

import argparse
import sys

from pdserve import __version__
from pdserve.server.args import add_serve_args, parse_config


def _cmd_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    config = parse_config(parser, args)
    from pdserve.server.runner import run_server

    return run_server(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="LLM serving with prefill/decode disaggregation.")
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the HTTP server (OpenAI and SGLang-native APIs)")
    add_serve_args(serve)
    serve.set_defaults(handler=_cmd_serve, subparser=serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args.subparser, args)


if __name__ == "__main__":
    sys.exit(main())
