"""SampleDecoder: UTF-8-safe deltas, stop strings across token boundaries, tool parts."""

from inference.textstream import SampleDecoder


def feed_all(decoder: SampleDecoder, ids: list[int]) -> list[list[tuple[str, str]]]:
    return [decoder.feed(t) for t in ids] + [decoder.finish()]


def byte_tokens(tok, text: str) -> list[int]:
    """One token per byte: every multi-byte character is split across tokens."""
    return [tok.encode(bytes([b]).decode("latin-1"))[0] if b < 128 else _byte_id(tok, b) for b in text.encode()]


def _byte_id(tok, b: int) -> int:
    return tok.encoding.encode_single_token(bytes([b]))


def test_multibyte_characters_are_never_cut(tok):
    text = "héllo 日本語 🙂🚀 café"
    deltas = feed_all(SampleDecoder(tok), byte_tokens(tok, text))
    texts = [t for parts in deltas for kind, t in parts]
    assert "".join(texts) == text
    assert all("\ufffd" not in t for t in texts)
    assert len(texts) < len(text.encode()), "continuation bytes must be held back, not sent alone"


def test_stop_string_across_tokens_is_cut_and_not_leaked(tok):
    text = "The quick brown fox jumps over the lazy dog."
    ids = byte_tokens(tok, text)
    decoder = SampleDecoder(tok, stop=["fox jumps", "zzz"])
    released = ""
    for t in ids:
        released += "".join(x for _, x in decoder.feed(t))
        if decoder.stopped:
            break
    released += "".join(x for _, x in decoder.finish())
    assert decoder.stopped and released == "The quick brown "


def test_text_that_only_looked_like_a_stop_is_released(tok):
    decoder = SampleDecoder(tok, stop=["fox!"])
    out = "".join(x for parts in feed_all(decoder, tok.encode("a fox? yes")) for _, x in parts)
    assert out == "a fox? yes" and not decoder.stopped


def test_tool_parts(tok):
    sp = tok.encode_special
    ids = (
        tok.encode("Let us see")
        + [sp("<|python_start|>")]
        + tok.encode("7*3")
        + [sp("<|python_end|>")]
        + [sp("<|output_start|>")]
        + tok.encode("21")
        + [sp("<|output_end|>")]
        + tok.encode(" so 21.")
    )
    parts = [p for ps in feed_all(SampleDecoder(tok), ids) for p in ps]
    merged = []
    for kind, text in parts:
        if merged and merged[-1][0] == kind == "text":
            merged[-1] = ("text", merged[-1][1] + text)
        else:
            merged.append((kind, text))
    assert merged == [("text", "Let us see"), ("python", "7*3"), ("python_output", "21"), ("text", " so 21.")]
