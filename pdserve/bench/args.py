"""`pdserve bench` flags (the only argparse code of the package) and their translation to a BenchConfig."""

from __future__ import annotations

import argparse
import json
import os

from pdserve.bench.config import DATASETS, DEFAULT_NUM_PROMPTS, ENDPOINTS, BenchConfig

_D = BenchConfig()  # defaults live in one place: the dataclass


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use a positive number or inf)") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf), got {text}")
    return v


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", default=_D.base_url, help="server root, e.g. http://127.0.0.1:8000")
    target.add_argument("--endpoint", default=_D.endpoint, choices=ENDPOINTS)
    target.add_argument("--model", default=None, help="model name sent in requests (default: first of GET /v1/models)")
    target.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")
    target.add_argument("--label", default=None, help="name of this run in tables, plots and the JSON")

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", "--dataset-name", dest="dataset", default=_D.dataset, choices=DATASETS)
    data.add_argument("--num-prompts", type=int, default=None,
                      help=f"requests to send (random: default {DEFAULT_NUM_PROMPTS}; shared-prefix: at most "
                           "groups x prompts-per-group; not used by interference)")
    data.add_argument("--seed", type=int, default=_D.seed)
    data.add_argument("--random-input-len", type=int, default=_D.random_input_len)
    data.add_argument("--random-output-len", type=int, default=_D.random_output_len)
    data.add_argument("--random-range-ratio", type=float, default=_D.random_range_ratio,
                      help="lengths are drawn uniformly from [len*ratio, len]; 1.0 = exact")
    data.add_argument("--num-groups", type=int, default=_D.num_groups, help="shared-prefix: groups")
    data.add_argument("--prompts-per-group", type=int, default=_D.prompts_per_group, help="shared-prefix")
    data.add_argument("--system-prompt-len", type=int, default=_D.system_prompt_len,
                      help="shared-prefix: tokens of each group's common system prompt")
    data.add_argument("--question-len", type=int, default=_D.question_len, help="shared-prefix: tokens per question")
    data.add_argument("--shared-prefix-output-len", type=int, default=_D.shared_prefix_output_len)
    data.add_argument("--num-decode-streams", type=int, default=_D.num_decode_streams,
                      help="interference: long-output streams started first and kept running")
    data.add_argument("--decode-input-len", type=int, default=_D.decode_input_len)
    data.add_argument("--decode-output-len", type=int, default=_D.decode_output_len)
    data.add_argument("--num-long-prompts", type=int, default=_D.num_long_prompts,
                      help="interference: long-input/short-output requests")
    data.add_argument("--long-prompt-len", type=int, default=_D.long_prompt_len)
    data.add_argument("--long-prompt-output-len", type=int, default=_D.long_prompt_output_len)
    data.add_argument("--long-prompt-rate", type=_rate, default=_D.long_prompt_rate,
                      help="interference: long prompts per second (evenly spaced)")
    data.add_argument("--short-request-rate", type=float, default=_D.short_request_rate,
                      help="interference: short requests per second (Poisson; prompt --decode-input-len tokens) "
                           "arriving from the first long prompt until the last one is answered: the TTFT that "
                           "new users see while long prompts run (kind 'short'; 0: none)")
    data.add_argument("--short-output-len", type=int, default=_D.short_output_len)
    data.add_argument("--long-prompt-delay", type=float, default=_D.long_prompt_delay,
                      help="interference: seconds between the decode streams' start and the first long prompt")
    data.add_argument("--min-decode-duration", type=float, default=_D.min_decode_duration,
                      help="interference: keep restarting the decode streams for at least this many seconds "
                           "(with --num-long-prompts 0: the same streams without interference, as a baseline; "
                           "at most 100 restarts per stream)")

    load = parser.add_argument_group("load", "--request-rate and --max-concurrency shape random and shared-prefix "
                                             "runs; interference follows its own schedule")
    load.add_argument("--request-rate", type=_rate, default=_D.request_rate,
                      help="Poisson arrivals per second; inf (default) sends all at once")
    load.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    load.add_argument("--warmup-requests", type=int, default=_D.warmup_requests, help="unmeasured requests first")
    load.add_argument("--timeout", type=float, default=_D.timeout, help="seconds per request (whole stream)")
    load.add_argument("--duration-limit", type=float, default=_D.duration_limit,
                      help="seconds for the whole measured run; what still runs then is cancelled")
    load.add_argument("--disable-ignore-eos", action="store_true", help="do not send ignore_eos: true")
    load.add_argument("--temperature", type=float, default=_D.temperature)
    load.add_argument("--extra-request-body", default=None, metavar="JSON",
                      help='JSON object merged into every request body, e.g. \'{"top_p": 0.9}\'')
    load.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT SLO")
    load.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT SLO")
    load.add_argument("--slo-itl-ms", type=float, default=None,
                      help="goodput: per-request ITL SLO, checked against each request's p99 gap between tokens")
    load.add_argument("--slo-itl-max-ms", type=float, default=None,
                      help="goodput: per-request bound on the longest gap between tokens")
    load.add_argument("--slo-scale", type=float, nargs="+", default=[], metavar="FACTOR",
                      help="also report SLO attainment and goodput with every SLO times each factor (DistServe's "
                           "attainment-vs-SLO-scale curve), e.g. --slo-scale 0.5 1 2 4")

    prof = parser.add_argument_group("profiling", "torch profiler traces written by the workers (SGLang's flags)")
    prof.add_argument("--profile", action="store_true", help="POST /start_profile before the run, /stop_profile after")
    prof.add_argument("--pd-separated", action="store_true",
                      help="profile the prefill and decode workers directly (--profile-prefill-url/-decode-url)")
    prof.add_argument("--profile-prefill-url", nargs="+", default=[], metavar="URL")
    prof.add_argument("--profile-decode-url", nargs="+", default=[], metavar="URL")
    prof.add_argument("--profile-activities", nargs="+", default=list(_D.profile_activities),
                      choices=["CPU", "GPU", "MEM"])
    prof.add_argument("--profile-num-steps", type=int, default=None, help="model steps to record (default: the run)")
    prof.add_argument("--profile-by-stage", action="store_true", help="one trace per stage (EXTEND, DECODE)")
    prof.add_argument("--profile-output-dir", default=None, help="where the workers write traces")

    out = parser.add_argument_group("output")
    out.add_argument("--output-file", default=None, metavar="F.json", help="summary + per-request records as JSON")
    out.add_argument("--plot", default=None, metavar="DIR", help="write PNG charts (TTFT, ITL, ITL timeline) here")
    out.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> BenchConfig:
    extra = {}
    if args.extra_request_body:
        try:
            extra = json.loads(args.extra_request_body)
        except json.JSONDecodeError as e:
            parser.error(f"--extra-request-body is not valid JSON: {e}")
        if not isinstance(extra, dict):
            parser.error("--extra-request-body must be a JSON object")
    try:
        return BenchConfig(
            base_url=args.base_url, endpoint=args.endpoint, model=args.model,
            api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None, label=args.label,
            dataset=args.dataset, num_prompts=args.num_prompts, seed=args.seed,
            random_input_len=args.random_input_len, random_output_len=args.random_output_len,
            random_range_ratio=args.random_range_ratio,
            num_groups=args.num_groups, prompts_per_group=args.prompts_per_group,
            system_prompt_len=args.system_prompt_len, question_len=args.question_len,
            shared_prefix_output_len=args.shared_prefix_output_len,
            num_decode_streams=args.num_decode_streams, decode_input_len=args.decode_input_len,
            decode_output_len=args.decode_output_len, num_long_prompts=args.num_long_prompts,
            long_prompt_len=args.long_prompt_len, long_prompt_output_len=args.long_prompt_output_len,
            long_prompt_rate=args.long_prompt_rate, long_prompt_delay=args.long_prompt_delay,
            min_decode_duration=args.min_decode_duration, short_request_rate=args.short_request_rate,
            short_output_len=args.short_output_len,
            request_rate=args.request_rate,
            max_concurrency=args.max_concurrency, warmup_requests=args.warmup_requests,
            timeout=args.timeout, duration_limit=args.duration_limit, ignore_eos=not args.disable_ignore_eos,
            temperature=args.temperature, extra_request_body=extra,
            slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, slo_itl_ms=args.slo_itl_ms,
            slo_itl_max_ms=args.slo_itl_max_ms, slo_scales=tuple(args.slo_scale), progress=not args.disable_tqdm,
            profile=args.profile, pd_separated=args.pd_separated,
            profile_prefill_urls=tuple(args.profile_prefill_url), profile_decode_urls=tuple(args.profile_decode_url),
            profile_activities=tuple(args.profile_activities), profile_num_steps=args.profile_num_steps,
            profile_by_stage=args.profile_by_stage, profile_output_dir=args.profile_output_dir,
        ).validate()
    except ValueError as e:  # BenchConfig names fields; the user typed flags
        field_name, _, rest = str(e).partition(" ")
        parser.error(f"--{field_name.replace('_', '-')} {rest}")
