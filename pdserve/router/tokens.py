"""The token ids a worker computes for a request, for KV-aware routing: the served model's tokenizer and chat
template, through the servers' own PromptEncoder (so the router's ids are the servers' ids)."""

from __future__ import annotations

from pdserve.router.payload import CHAT, COMPLETIONS, GENERATE
from pdserve.server.errors import BadRequestError
from pdserve.server.protocol import is_int_list, parse_chat
from pdserve.server.tokenization import PromptEncoder


class RouteTokenizer:
    def __init__(self, model_path: str | None) -> None:
        from pdserve.model.loader import load_tokenizer, resolve_model

        resolved = resolve_model(model_path)  # None: pdserve's default model
        self.encoder = PromptEncoder(load_tokenizer(resolved.hf_dir), resolved.hf_dir)

    def token_ids(self, kind: str, body: dict | None) -> list[int] | None:
        """None for what it cannot tell (batches, bad input: the worker answers that); routed by load then."""
        if body is None:
            return None
        try:
            if kind == CHAT:
                req = parse_chat(body)
                return self.encoder.encode_chat(req.messages, req.chat_template_kwargs)
            prompt = body.get("input_ids") if kind == GENERATE else body.get("prompt")
            if prompt is None and kind == GENERATE:
                prompt = body.get("text")
            if kind == COMPLETIONS and isinstance(prompt, list) and len(prompt) == 1 and not is_int_list(prompt):
                prompt = prompt[0]
            if is_int_list(prompt):
                return prompt  # type: ignore[return-value]
            return self.encoder.encode_text(prompt) if isinstance(prompt, str) else None
        except (BadRequestError, ValueError, TypeError):
            return None
