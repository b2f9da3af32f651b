"""Prompt encoding in the front process: plain text, chat messages through the chat template, token text."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from pdserve.server.errors import BadRequestError
from pdserve.server.protocol import IMAGE_SENTINEL, ChatMessage


class PromptEncoder:
    def __init__(self, tokenizer, hf_dir: str | None = None, image_token: str = "") -> None:
        self.tokenizer = tokenizer
        self.vocab_size = max(len(tokenizer), _config_vocab_size(hf_dir))
        self.image_token = image_token  # what an image part becomes in the chat template's input
        self._token_text: dict[int, str] = {}

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode_chat(self, messages: Sequence[ChatMessage],
                    template_kwargs: dict[str, object] | None = None) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequestError("this model has no chat template; use /v1/completions", param="messages")
        try:
            text = self.tokenizer.apply_chat_template(
                [m.to_template() for m in messages], tokenize=False, add_generation_prompt=True,
                **(template_kwargs or {}),
            )
        except Exception as e:  # jinja raises for conversations the template rejects
            raise BadRequestError(f"cannot apply the chat template: {e}", param="messages") from None
        text = text.replace(IMAGE_SENTINEL, self.image_token)
        # The template writes the special tokens (BOS included) itself.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def token_text(self, token_id: int) -> str:
        """The text of one token (as shown in logprobs)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._token_text) < 200_000:
                self._token_text[token_id] = text
        return text


def _config_vocab_size(hf_dir: str | None) -> int:
    if not hf_dir:
        return 0
    try:
        from pdserve.epd.vlm import text_config_of

        with open(os.path.join(hf_dir, "config.json")) as f:
            return int(text_config_of(json.load(f)).get("vocab_size") or 0)
    except (OSError, ValueError, TypeError):
        return 0
