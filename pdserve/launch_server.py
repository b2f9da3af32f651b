"""`python -m pdserve.launch_server --model-path ... --port ...` (SGLang-compatible entry point)."""

from __future__ import annotations

import sys

from pdserve.server.args import parse_serve_args


def main(argv: list[str] | None = None) -> int:
    config = parse_serve_args(argv, prog="python -m pdserve.launch_server")
    from pdserve.server.runner import run_server  # heavy imports after the flags are known to be valid

    return run_server(config)


if __name__ == "__main__":
    sys.exit(main())
