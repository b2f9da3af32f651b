"""Incremental detokenization and stop-string cutting for one request's output.

`IncrementalDetokenizer` turns token ids into text a few tokens at a time; it never emits the replacement
character of an incomplete UTF-8 sequence that a later token would complete. `StopStringCutter` cuts the
text exactly at the first stop string and, while streaming, holds back a tail that could begin one.
`DetokenizeStream` combines both into what the HTTP layer consumes: a monotonically growing visible text.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.sampling_params import SamplingParams

# Prompt tokens decoded as left context, so the first output token gets its leading space right.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Prefix-window incremental decoding (as in SGLang/vLLM): decode(window + new) minus decode(window)."""

    def __init__(
        self,
        tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._kw = {
            "skip_special_tokens": skip_special_tokens,
            "spaces_between_special_tokens": spaces_between_special_tokens,
        }
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        # A context that itself ends inside a multi-byte character would shift the offsets: drop it.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = len(context)  # ids before this are already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        try:
            return self._tok.decode(list(ids), **self._kw)
        except TypeError:  # tokenizers without spaces_between_special_tokens
            return self._tok.decode(list(ids), skip_special_tokens=self._kw["skip_special_tokens"])

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the newly completed text (possibly "" while a character is incomplete)."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever is still pending, even an incomplete character (the request has ended)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if not final and full.endswith(_REPLACEMENT):
            return ""  # wait for the rest of the character
        new_text = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text


class StopStringCutter:
    """Accumulates raw text; finds the first stop string; says how much text is safe to show."""

    def __init__(self, stop: Sequence[str], no_stop_trim: bool = False) -> None:
        self._stop = tuple(s for s in stop if s)
        self._max_len = max((len(s) for s in self._stop), default=0)
        self._no_stop_trim = no_stop_trim
        self.text = ""
        self.matched: str | None = None
        self._cut_at: int | None = None

    def append(self, piece: str) -> None:
        if self.matched is not None or not piece:
            return
        start = max(0, len(self.text) - self._max_len + 1)
        self.text += piece
        if not self._stop:
            return
        best: tuple[int, str] | None = None
        for s in self._stop:
            pos = self.text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            pos, s = best
            self.matched = s
            self._cut_at = pos + len(s) if self._no_stop_trim else pos

    def _holdback(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def visible(self, final: bool) -> str:
        if self._cut_at is not None:
            return self.text[: self._cut_at]
        if final:
            return self.text
        return self.text[: len(self.text) - self._holdback()]


class DetokenizeStream:
    """Output token ids in, visible text out; `text` only ever grows."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        self._detok = IncrementalDetokenizer(
            tokenizer, prompt_ids, sampling.skip_special_tokens, sampling.spaces_between_special_tokens
        )
        self._cutter = StopStringCutter(sampling.stop, sampling.no_stop_trim)
        self._no_stop_trim = sampling.no_stop_trim
        self.text = ""

    @property
    def matched_stop(self) -> str | None:
        """The stop string found in the text, if any (the request must then end)."""
        return self._cutter.matched

    def skip(self, token_ids: Sequence[int]) -> None:
        """Take tokens whose text the client already has (a migrated stream's `resume_output_ids`): from here on
        only later text is new. A trailing incomplete character stays pending, as it did where the tokens were
        generated (the client has not seen it), so the tokens up to the last whole character go in first."""
        ids = list(token_ids)
        whole = len(ids)
        while whole > 0 and len(ids) - whole < 4 and self._detok._decode(ids[:whole]).endswith(_REPLACEMENT):
            whole -= 1
        if whole == 0:
            whole = len(ids)  # no whole character found near the end: take them as they are
        self.feed(ids[:whole])
        self.feed(ids[whole:])

    def feed(self, token_ids: Sequence[int], finished: bool = False, stop_token: int | None = None) -> str:
        """Add tokens; return the new visible text. On the last call pass `finished=True` and, when the
        request ended on a stop/EOS token id, that id: its text is not shown (unless no_stop_trim)."""
        ids = list(token_ids)
        if finished and stop_token is not None and not self._no_stop_trim and ids and ids[-1] == stop_token:
            ids.pop()
        self._cutter.append(self._detok.add(ids))
        if finished:
            self._cutter.append(self._detok.flush())
        visible = self._cutter.visible(final=finished)
        delta = visible[len(self.text) :]  # the cutter only ever extends what it showed before
        self.text = visible
        return delta
