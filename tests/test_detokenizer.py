"""Incremental detokenization and stop-string cutting with the real (byte-level BPE) tokenizer."""

from __future__ import annotations

import pytest

from pdserve.sampling_params import SamplingParams
from pdserve.server.detokenizer import DetokenizeStream, IncrementalDetokenizer, StopStringCutter

REPLACEMENT = "\ufffd"
TEXTS = [
    "héllo 你好 🎉 world",
    "ça va? 😀👍🏽 naïve café",
    "日本の首都は東京です。",
    "emoji at the end 🎉",
    "plain ascii, nothing special.",
]
PROMPT = "Say something:"


def _stream(tokenizer, text: str, **sampling) -> tuple[list[int], list[int], DetokenizeStream]:
    prompt_ids = tokenizer.encode(PROMPT)
    ids = tokenizer.encode(text)
    return prompt_ids, ids, DetokenizeStream(tokenizer, prompt_ids, SamplingParams(**sampling))


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode_without_partial_chars(tokenizer, text):
    ids = tokenizer.encode(text)
    assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids) or text.isascii()  # really split characters
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT))
    pieces = [detok.add([i]) for i in ids] + [detok.flush()]
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_uneven_batches_of_tokens(tokenizer):
    text = TEXTS[0] + " " + TEXTS[1]
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [])
    out, i = [], 0
    for size in (1, 3, 2, 5, 1, 4) * 10:
        out.append(detok.add(ids[i : i + size]))
        i += size
    out.append(detok.flush())
    assert "".join(out) == text and all(REPLACEMENT not in p for p in out)


def test_leading_space_of_first_output_token_kept(tokenizer):
    prompt_ids = tokenizer.encode("Hello")
    ids = tokenizer.encode(" world, again")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    assert detok.add(ids[:1]) == " world"


def test_truly_invalid_bytes_are_flushed_at_the_end(tokenizer):
    ids = tokenizer.encode("🎉")[:2]  # the first bytes of a 4-byte character only
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(ids) == ""
    assert REPLACEMENT in detok.flush()


@pytest.mark.parametrize("stop", ["你好", "🎉", "llo 你", "world"])
def test_stop_string_cut_exactly_while_streaming(tokenizer, stop):
    text = TEXTS[0]
    _, ids, stream = _stream(tokenizer, text, stop=(stop,))
    expected = text[: text.index(stop)]
    shown = ""
    for i, tok in enumerate(ids):
        delta = stream.feed([tok], finished=stream.matched_stop is not None or i == len(ids) - 1)
        shown += delta
        assert stream.text == shown
        assert expected.startswith(shown), "text past the stop string (or its start) leaked"
        assert REPLACEMENT not in delta
        if stream.matched_stop is not None:
            shown += stream.feed([], finished=True)
            break
    assert stream.matched_stop == stop
    assert shown == expected


def test_no_stop_trim_keeps_the_stop_string_but_nothing_after(tokenizer):
    text = "one two three four"
    _, ids, stream = _stream(tokenizer, text, stop=("two",), no_stop_trim=True)
    stream.feed(ids, finished=True)
    assert stream.text == "one two"


def test_holdback_of_a_possible_stop_prefix(tokenizer):
    _, _, stream = _stream(tokenizer, "", stop=("END!",))
    assert stream.feed(tokenizer.encode("abc EN")) == "abc "  # "EN" could start "END!"
    assert stream.feed(tokenizer.encode("Dless")) == "ENDless"  # it did not: released
    assert stream.feed(tokenizer.encode(" E"), finished=True) == " E"  # at the end, everything goes out
    assert stream.text == "abc ENDless E"


def test_earliest_of_several_stop_strings_wins():
    cutter = StopStringCutter(["three", "two"])
    cutter.append("one tw")
    assert cutter.visible(final=False) == "one "
    cutter.append("o three")
    assert cutter.matched == "two" and cutter.visible(final=True) == "one "


def test_stop_token_text_not_shown(tokenizer):
    eos = tokenizer.eos_token_id
    prompt_ids, ids, stream = _stream(tokenizer, "Fine, thanks.")
    stream.feed(ids + [eos], finished=True, stop_token=eos)
    assert stream.text == "Fine, thanks."
    # A stop token id that is an ordinary token: its text is cut too, even with special tokens shown.
    dot = tokenizer.encode(".")[-1]
    stream = DetokenizeStream(tokenizer, prompt_ids, SamplingParams(stop_token_ids=(dot,), skip_special_tokens=False))
    stream.feed(tokenizer.encode("Fine, thanks") + [dot], finished=True, stop_token=dot)
    assert stream.text == "Fine, thanks"


def test_special_tokens_skipped_by_default(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\nHi<|im_end|>")
    stream = DetokenizeStream(tokenizer, [], SamplingParams())
    stream.feed(ids, finished=True)
    assert stream.text == "assistant\nHi"


@pytest.mark.parametrize("stop", [(), ("zzq",)])
def test_migrated_stream_continues_the_text_exactly(tokenizer, stop):
    """A stream resumed after any token (even inside a multi-byte character, or while a possible stop-string
    prefix is held back) sends exactly the text the client has not seen yet."""
    prompt = tokenizer.encode("Say it:")
    ids = tokenizer.encode(" Hi 🦄 and 日本語 done, zz end")
    sampling = SamplingParams(max_new_tokens=64, stop=stop)
    whole = DetokenizeStream(tokenizer, prompt, sampling)
    sent_before = []  # what the client had after each token
    for t in ids:
        whole.feed([t])
        sent_before.append(whole.text)
    expected = whole.text + whole.feed([], finished=True)
    for k in range(1, len(ids)):
        resumed = DetokenizeStream(tokenizer, prompt, sampling)
        resumed.skip(ids[:k])
        rest = "".join(resumed.feed([t]) for t in ids[k:]) + resumed.feed([], finished=True)
        assert sent_before[k - 1] + rest == expected, k
