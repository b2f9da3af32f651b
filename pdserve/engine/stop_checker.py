"""Decides when a request is done: EOS, stop token ids, stop strings, length. Shared by all schedulers."""

from __future__ import annotations

from pdserve.engine.request import Request


class StopChecker:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], context_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.context_len = context_len

    def check(self, req: Request) -> None:
        """Set req.finish_reason / matched_stop after a token was appended."""
        sp, out = req.sampling, req.output_ids
        if not out:
            return
        last = out[-1]
        if len(out) >= sp.min_new_tokens:
            if last in sp.stop_token_ids or (not sp.ignore_eos and last in self.eos_token_ids):
                req.finish_reason, req.matched_stop = "stop", last
                return
            if sp.stop:
                hit = self._match_stop_string(req)
                if hit is not None:
                    req.finish_reason, req.matched_stop = "stop", hit
                    return
        if len(out) >= sp.max_new_tokens or req.num_tokens >= self.context_len:
            req.finish_reason = "length"

    def _match_stop_string(self, req: Request) -> str | None:
        max_len = max(len(s) for s in req.sampling.stop)
        # A stop string of k chars spans at most k tokens (+1 for a split multi-byte char).
        tail = self.tokenizer.decode(req.output_ids[-(max_len + 2):], skip_special_tokens=False)
        for s in req.sampling.stop:
            if s in tail:
                return s
        return None
