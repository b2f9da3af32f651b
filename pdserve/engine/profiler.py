"""torch.profiler over the engine loop's model steps, driven by /start_profile and /stop_profile (SGLang's API).

Traces go to `{output_dir}/{prefix-}{profile_id}-TP-{rank}.trace.json.gz` (SGLang's names; `-EXTEND` / `-DECODE`
before the extension with profile_by_stage) and open in Perfetto or chrome://tracing. Each engine step is one
`pdserve_step` range; by stage, one recording is split afterwards by those ranges: a step that computes prompt
tokens is EXTEND, a step of decodes only is DECODE (with num_steps, each stage records that many, as SGLang's
by-stage profiling does). `start_step` counts model steps from the start request. Only this process (TP rank 0,
the scheduler) is recorded. A profiler that fails (cannot start, cannot write its trace) fails the profile request,
never the engine.
"""

from __future__ import annotations

import bisect
import collections
import gzip
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable

import torch

from pdserve.engine.messages import ProfileRequest, ProfileResult
from pdserve.envs import ENVS

logger = logging.getLogger(__name__)

STEP_RANGE = "pdserve_step"
_ACTIVITIES = ("CPU", "GPU", "MEM")


class StepProfiler:
    """Owned by the engine loop: `run_step` wraps every step; `handle` answers start and stop."""

    def __init__(self, tp_rank: int = 0) -> None:
        self._tp_rank = tp_rank
        self._request: ProfileRequest | None = None
        self._profile: torch.profiler.profile | None = None
        self._steps_to_skip = 0
        self._stages: list[str] = []  # stage of each recorded step range, in order ("": no model ran)
        self._num_steps_of: collections.Counter[str] = collections.Counter()  # model steps recorded per stage
        self._profile_id = ""

    def handle(self, req: ProfileRequest) -> ProfileResult:
        if req.start:
            return self._start(req)
        if self._request is None:
            return ProfileResult(False, "Profiling is not in progress. Call /start_profile first.")
        try:
            files = self._stop()
        except Exception as e:  # noqa: BLE001 - a trace that cannot be written fails this request only
            logger.exception("profiler stop failed")
            return ProfileResult(False, f"profiling stopped, but its trace could not be written: {e}")
        return ProfileResult(True, "Stop profiling. Traces: " + (", ".join(files) or "none (no model step ran)"),
                             tuple(files))

    def run_step(self, step: Callable[[], list], forward_of: Callable[[], object]) -> list:
        """One engine step; recorded as a range when profiling (counted only when a model step ran)."""
        if self._request is None:
            return step()
        if self._steps_to_skip > 0 or self._profile is None:
            before = forward_of()
            outs = step()
            if forward_of() is not before:
                self._steps_to_skip -= 1
                if self._steps_to_skip <= 0 and self._profile is None:
                    try:
                        self._begin()
                    except Exception:  # noqa: BLE001 - logged; the engine goes on unprofiled
                        logger.exception("the torch profiler could not start")
                        self._request = None
            return outs
        before = forward_of()
        with torch.profiler.record_function(STEP_RANGE):
            outs = step()
        forward = forward_of()
        if forward is not before and forward is not None:
            stage = "EXTEND" if getattr(forward, "prefills", None) else "DECODE"
            self._stages.append(stage)
            self._num_steps_of[stage] += 1
            if self._recorded_enough():
                try:
                    self._stop()
                except Exception:  # noqa: BLE001 - logged; the engine goes on
                    logger.exception("profiler stop after num_steps failed; no trace written")
        else:
            self._stages.append("")  # a step range without a model run: belongs to no stage
        return outs

    def _recorded_enough(self) -> bool:
        req = self._request
        if req is None or req.num_steps is None:
            return False
        if req.profile_by_stage:
            return all(self._num_steps_of[stage] >= req.num_steps for stage in ("EXTEND", "DECODE"))
        return self._num_steps_of.total() >= req.num_steps

    # ---- internals ------------------------------------------------------------------------------------
    def _start(self, req: ProfileRequest) -> ProfileResult:
        if self._request is not None:
            return ProfileResult(False, "Profiling is already in progress. Call /stop_profile first.")
        unknown = [a for a in req.activities if a not in _ACTIVITIES]
        if unknown:
            return ProfileResult(False, f"unknown profiler activities {unknown}; expected some of {list(_ACTIVITIES)}")
        if req.num_steps is not None and req.num_steps <= 0:
            return ProfileResult(False, "num_steps must be positive")
        out_dir = os.path.expanduser(req.output_dir or ENVS.torch_profiler_dir)
        try:
            os.makedirs(out_dir, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=out_dir):
                pass
        except OSError as e:
            return ProfileResult(False, f"cannot write profiler traces to {out_dir!r}: {e.strerror or e}")
        self._request = req
        self._profile_id = str(time.time())
        self._stages, self._num_steps_of = [], collections.Counter()
        self._steps_to_skip = req.start_step or 0
        if self._steps_to_skip <= 0:
            try:
                self._begin()
            except Exception as e:  # noqa: BLE001 - e.g. another profiler is active in this process
                self._request, self._profile = None, None
                return ProfileResult(False, f"the torch profiler could not start: {e}")
        return ProfileResult(True, "Start profiling.\n")

    def _begin(self) -> None:
        req = self._request
        assert req is not None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if "GPU" in req.activities and torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profile = torch.profiler.profile(activities=activities, record_shapes=req.record_shapes,
                                               with_stack=req.with_stack, profile_memory="MEM" in req.activities)
        self._profile.start()
        logger.info("profiling started (%s steps)", req.num_steps or "until /stop_profile")

    def _stop(self) -> list[str]:
        req, prof = self._request, self._profile
        self._request, self._profile = None, None
        if req is None or prof is None:  # stopped before the first recorded step
            return []
        prof.stop()
        out_dir = os.path.expanduser(req.output_dir or ENVS.torch_profiler_dir)
        prefix = f"{req.profile_prefix}-" if req.profile_prefix else ""
        base = os.path.join(out_dir, f"{prefix}{self._profile_id}-TP-{self._tp_rank}")
        fd, raw_path = tempfile.mkstemp(suffix=".json", dir=out_dir)
        os.close(fd)
        try:
            prof.export_chrome_trace(raw_path)
            with open(raw_path) as f:
                trace = json.load(f)
        finally:
            os.unlink(raw_path)
        if req.profile_by_stage:
            files = [_write(f"{base}-{stage}.trace.json.gz", _only_stage(trace, self._stages, stage))
                     for stage in ("EXTEND", "DECODE") if self._num_steps_of[stage]]
        else:
            files = [_write(f"{base}.trace.json.gz", trace)]
        logger.info("profiling stopped after %d model steps: %s", self._num_steps_of.total(), files)
        return files


def _write(path: str, trace: dict) -> str:
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    return path


def _only_stage(trace: dict, stages: list[str], stage: str) -> dict:
    """The events inside the step ranges of one stage (metadata events kept). Step ranges never overlap (one
    step at a time), so each event's range is found by bisection: O(events x log steps)."""
    events = trace.get("traceEvents", [])
    steps = sorted((e for e in events if e.get("name") == STEP_RANGE and e.get("ph") == "X"
                    and e.get("cat") == "user_annotation"), key=lambda e: float(e["ts"]))
    if len(steps) != len(stages):
        logger.warning("profiler: %d step ranges in the trace for %d steps; the stage split may be off",
                       len(steps), len(stages))
    windows = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
               for e, s in zip(steps, stages) if s == stage]
    starts = [lo for lo, _ in windows]

    def inside(e: dict) -> bool:
        if "ts" not in e or e.get("ph") == "M":
            return True
        ts = float(e["ts"])
        i = bisect.bisect_right(starts, ts) - 1
        return i >= 0 and ts <= windows[i][1]

    return {**trace, "traceEvents": [e for e in events if inside(e)]}
