"""The language-only engine of EPD: a unified Engine (--disaggregation-mode text) or a PrefillEngine
(prefill --encoder-disaggregated), composed with an EmbeddingReceiver.

Image prompts enter the inner engine as usual, with MMInputs whose embeddings are missing; the scheduler
admits them once the receiver has filled them in (Request.inputs_ready). Text prompts are untouched.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from pdserve.config import EngineConfig
from pdserve.engine.messages import GenerateRequest, LoadReport, RequestOutput
from pdserve.model.loader import ResolvedModel

logger = logging.getLogger(__name__)


class LanguageEngine:
    def __init__(self, config: EngineConfig, resolved: ResolvedModel | None = None):
        if config.disaggregation_mode == "prefill":
            from pdserve.disagg.prefill import PrefillEngine

            self.inner = PrefillEngine(config, resolved)
            self.engine = self.inner.engine
        else:
            from pdserve.engine.engine import Engine

            self.inner = self.engine = Engine(config, resolved)
        self.max_total_tokens, self.context_len = self.engine.max_total_tokens, self.engine.context_len
        self.kernel_plan = self.engine.kernel_plan
        self.receiver = None
        if self.engine.vlm is not None:
            from pdserve.epd.receiver import EmbeddingReceiver

            r = self.engine.runner
            self.receiver = EmbeddingReceiver(config, self.engine.vlm.text_hidden_size, r.dtype, r.device)
            self.engine.accepts_remote_embeddings = True
        else:
            logger.warning("%s is not a vision-language model: this language-only server serves text only",
                           self.engine.resolved.hf_dir)

    # ---- engine-process interface ----------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        """Runnable work only: requests waiting for embeddings wake the loop through the control socket."""
        s = self.engine.scheduler
        return bool(s.running) or any(r.inputs_ready for r in s.waiting)

    @property
    def control_sockets(self) -> list:
        socks = [self.inner.control_socket] if hasattr(self.inner, "control_socket") else []
        return socks + ([self.receiver.ctrl.pull] if self.receiver is not None else [])

    @property
    def idle_wait_s(self) -> float:
        return min(getattr(self.inner, "idle_wait_s", 0.05), 0.05)

    def add_request(self, g: GenerateRequest) -> None:
        remote = g.mm is not None and g.mm.is_remote
        if remote and self.receiver is None:
            raise ValueError("this model takes no images")
        self.inner.add_request(g)
        if remote:
            req = self.engine.requests[g.rid]
            try:
                self.receiver.expect(req, g.mm)
            except ValueError:
                self.inner.abort(g.rid, "rejected")
                raise

    def abort(self, rid: str, reason: str = "aborted") -> RequestOutput | None:
        if self.receiver is not None:
            self.receiver.cancel(rid, reason)
        return self.inner.abort(rid) if self.inner is self.engine else self.inner.abort(rid, reason)

    def step(self) -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        if self.receiver is not None:
            for req, reason in self.receiver.poll():
                logger.warning("request %s failed: %s", req.rid, reason)
                out = self.inner.abort(req.rid, reason)
                if out is not None:
                    outs.append(out)
        outs += self.inner.step()
        return outs

    def load(self) -> LoadReport:
        r = self.inner.load()
        return replace(r, extra={**r.extra, **self.receiver.stats()}) if self.receiver is not None else r

    def flush_cache(self) -> bool:
        return self.inner.flush_cache()

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()
        if self.receiver is not None:
            self.receiver.close()
