"""`python -m pdserve.launch_router --pd-disaggregation --prefill URL [PORT] --decode URL ...` (SGLang router
compatible entry point)."""

from __future__ import annotations

import sys

from pdserve.router.args import parse_router_args


def main(argv: list[str] | None = None) -> int:
    config = parse_router_args(argv, prog="python -m pdserve.launch_router")
    from pdserve.router.runner import run_router

    return run_router(config)


if __name__ == "__main__":
    sys.exit(main())
