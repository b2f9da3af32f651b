"""Sampling parameters (SGLang names), validated before anything is queued."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_INT32 = 2**31 - 1
# Inclusive bounds of the integer fields, checked where a request enters (a number out of range is a 400, never
# an overflow deeper down). seed: what torch's generator takes, less room for the n > 1 offsets.
INT_RANGES = {"max_new_tokens": (0, MAX_INT32), "min_new_tokens": (0, MAX_INT32), "top_k": (-1, MAX_INT32),
              "seed": (-(2**63), 2**63 - 1 - 1024)}
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: [-100, 100]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingParams":
        """Build from SGLang-style JSON; unknown keys are ignored, wrong types raise ValueError."""
        d = dict(d or {})
        kw: dict = {}
        num_fields = {
            "max_new_tokens": int, "min_new_tokens": int, "top_k": int, "seed": int,
            "temperature": float, "top_p": float, "min_p": float, "repetition_penalty": float,
            "frequency_penalty": float, "presence_penalty": float,
        }
        for name, typ in num_fields.items():
            v = d.get(name)
            if v is None:
                continue
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or (typ is int and not float(v).is_integer())):
                raise ValueError(f"{name} must be {'an integer' if typ is int else 'a finite number'}, got {v!r}")
            kw[name] = typ(v)
            lo, hi = INT_RANGES.get(name, (None, None))
            if lo is not None and not lo <= kw[name] <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {v!r}")
        stop = d.get("stop")
        if stop is not None:
            if isinstance(stop, str):
                stop = [stop]
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise ValueError("stop must be a string or a list of strings")
            kw["stop"] = tuple(stop)
        ids = d.get("stop_token_ids")
        if ids is not None:
            if isinstance(ids, int):
                ids = [ids]
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                    and 0 <= i <= MAX_INT32 for i in ids):
                raise ValueError(f"stop_token_ids must be a list of integers in [0, {MAX_INT32}]")
            kw["stop_token_ids"] = tuple(ids)
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            v = d.get(name)
            if v is not None:
                if not isinstance(v, bool):
                    raise ValueError(f"{name} must be a boolean, got {v!r}")
                kw[name] = v
        bias = d.get("logit_bias")
        if bias:
            if not isinstance(bias, dict):
                raise ValueError("logit_bias must be an object mapping token id to bias")
            try:
                kw["logit_bias"] = tuple((int(k), float(v)) for k, v in bias.items())
            except (TypeError, ValueError, OverflowError) as e:
                raise ValueError(f"logit_bias has an invalid entry: {e}") from None
            if not all(0 <= k <= MAX_INT32 and abs(v) <= MAX_LOGIT_BIAS for k, v in kw["logit_bias"]):
                raise ValueError(f"logit_bias maps token ids >= 0 to biases in [-{MAX_LOGIT_BIAS:g}, "
                                 f"{MAX_LOGIT_BIAS:g}]")
        return cls(**kw)

    def with_max_new_tokens(self, n: int) -> "SamplingParams":
        from dataclasses import replace

        return replace(self, max_new_tokens=n, min_new_tokens=min(self.min_new_tokens, n))


