"""Tests of the `rustbpe` extension through its Python API.

    uv run pytest rustbpe/tests

Training is checked against a slow pure-Python BPE written here to be obviously correct;
encoding against tiktoken built from the same ranks; determinism across runs and thread counts
in subprocesses (RAYON_NUM_THREADS); and every kind of bad input gets a Python exception.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest
import regex
import tiktoken

import rustbpe

PATTERN = rustbpe.DEFAULT_PATTERN

VARIED = [
    "Hello world! It's a test, isn't it? We'll see; they've gone, you're here, I'd say I'M SURE.",
    "emoji 🙂🙂🙂 and flags 🇫🇷🇩🇪, family 👨‍👩‍👧 and a 🙂 after spaces   🙂",
    "日本語のテキストと中文文本，한국어 텍스트도 있습니다。",
    "digits 1 12 123 1234 12345678901234567890 and ٣٤٥ and ½ ⅔ and 3.14159",
    "whitespace   runs\t\t\tand    \u00a0\u00a0 nbsp\u2003em\u3000ideographic   ",
    "windows\r\nline\r\n\r\nendings\r\n  \r\n\tindented\r\n",
    "unix\n\nlines\n   \n\n  trailing spaces   \nx",
    "code: def f(x):\n    return x**2 + 1  # comment\n\n\nif __name__ == '__main__':\n    f(3)\n",
    "punctuation!!! ... ??? --- ((())) \"quotes\" 'single' `back` ~~~ @@@ ###\n",
    "",
    " ",
    "\n",
    "Ünïcödé àçcénts, Ελληνικά, русский текст, עברית, العربية",
]


def reference_bpe(texts: list[str], vocab_size: int, pattern: str = PATTERN) -> list[bytes]:
    """BPE recounting every pair from scratch at each step; ties go to the smallest pair."""
    chunks = collections.Counter(piece for text in texts for piece in regex.findall(pattern, text))
    words = [[list(piece.encode()), n] for piece, n in chunks.items()]
    vocab = [bytes([b]) for b in range(256)]
    while len(vocab) < vocab_size:
        pairs = collections.Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], -pair[0], -pair[1]))
        new_id = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        for word in words:
            ids, merged, i = word[0], [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            word[0] = merged
    return vocab


def trained(texts: list[str], vocab_size: int, **kwargs) -> rustbpe.Tokenizer:
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tok


def ranks_bytes(tok: rustbpe.Tokenizer) -> list[bytes]:
    ranks = tok.get_mergeable_ranks()
    assert [rank for _, rank in ranks] == list(range(len(ranks)))
    return [token for token, _ in ranks]


def tiktoken_for(tok: rustbpe.Tokenizer) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        "test", pat_str=tok.get_pattern(), mergeable_ranks=dict(tok.get_mergeable_ranks()), special_tokens={}
    )


def big_text() -> str:
    """About 300 KB, big enough to be split in several segments in parallel."""
    lines = []
    for i in range(6000):
        lines.append(f"Line {i}:  the value is {i * 37 % 1000}\t\tand it's {'ok' if i % 3 else 'NOT ok'}.")
        lines.append("  \n \r\n" if i % 7 == 0 else f"    indented {i % 13} {'🙂' * (i % 3)}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def varied_tok() -> rustbpe.Tokenizer:
    return trained(VARIED * 3 + [big_text()[:20000]], 700)


def test_merges_equal_reference_on_small_texts():
    texts = ["the cat sat on the mat, the cat ate the rat", "aaaaaaa bbbb aaaa abababab", "  spaces  \n\n tabs\t\t"]
    assert ranks_bytes(trained(texts, 320)) == reference_bpe(texts, 320)


def test_merges_equal_reference_on_varied_text():
    assert ranks_bytes(trained(VARIED, 400)) == reference_bpe(VARIED, 400)


def test_one_big_string_split_in_parallel_equals_reference():
    text = big_text()
    assert len(text.encode()) > 4 * (1 << 16)
    assert ranks_bytes(trained([text], 300)) == reference_bpe([text], 300)


def test_custom_pattern_is_used_and_returned():
    pattern = r"\S+|\s+"
    texts = ["don't split me, 12345", "again: don't split me, 12345"]
    tok = trained(texts, 300, pattern=pattern)
    assert tok.get_pattern() == pattern
    assert ranks_bytes(tok) == reference_bpe(texts, 300, pattern=pattern)
    assert tok.encode("don't 12345!") == tiktoken_for(tok).encode_ordinary("don't 12345!")


def test_default_pattern_is_the_spec_pattern(varied_tok):
    assert varied_tok.get_pattern() == PATTERN
    assert r"\p{N}{1,2}" in PATTERN


def test_buffer_size_does_not_change_the_result():
    texts = VARIED * 4
    assert ranks_bytes(trained(texts, 400, buffer_size=1)) == ranks_bytes(trained(texts, 400, buffer_size=8192))


def test_training_stops_when_no_pair_is_left():
    assert ranks_bytes(trained(["ab"], 1000)) == [bytes([b]) for b in range(256)] + [b"ab"]
    assert len(trained(VARIED, 256).get_mergeable_ranks()) == 256


@pytest.mark.parametrize("text", VARIED, ids=range(len(VARIED)))
def test_encode_equals_tiktoken(varied_tok, text):
    enc = tiktoken_for(varied_tok)
    ids = varied_tok.encode(text)
    assert ids == enc.encode_ordinary(text)
    assert enc.decode_bytes(ids) == text.encode()


def test_encode_equals_tiktoken_on_a_100kb_word(varied_tok):
    word = ("antidisestablishment" * 5000)[:100_000]
    assert varied_tok.encode(word) == tiktoken_for(varied_tok).encode_ordinary(word)


def test_encode_big_text_in_parallel_equals_tiktoken(varied_tok):
    text = big_text()
    assert varied_tok.encode(text) == tiktoken_for(varied_tok).encode_ordinary(text)


def test_batch_encode_equals_encode_each(varied_tok):
    texts = VARIED + [big_text()[:50000]]
    assert varied_tok.batch_encode(texts) == [varied_tok.encode(t) for t in texts]
    assert varied_tok.batch_encode([]) == []


DETERMINISM_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_rustbpe import VARIED, big_text, trained
tok = trained(VARIED * 2 + [big_text()], 600)
print(json.dumps([bytes(b).hex() for b, _ in tok.get_mergeable_ranks()]))
"""


def test_training_is_deterministic_across_runs_and_thread_counts():
    here = os.path.dirname(__file__)
    results = []
    for threads in ["1", "2", "4", "4"]:
        env = {**os.environ, "RAYON_NUM_THREADS": threads}
        out = subprocess.run(
            [sys.executable, "-c", DETERMINISM_SCRIPT, here], env=env, capture_output=True, text=True, check=True
        )
        results.append(json.loads(out.stdout))
    assert len(results[0]) == 600
    assert all(r == results[0] for r in results[1:])


def test_vocab_size_below_256_is_a_value_error():
    with pytest.raises(ValueError, match="at least 256"):
        trained(["abc"], 255)


def test_huge_vocab_size_is_a_value_error():
    with pytest.raises(ValueError, match="32 bits"):
        trained(["abc"], 2**40)


def test_bad_buffer_size_is_a_value_error():
    with pytest.raises(ValueError, match="buffer_size"):
        trained(["abc"], 300, buffer_size=0)


def test_broken_regex_is_a_value_error():
    with pytest.raises(ValueError, match="invalid split pattern"):
        trained(["abc"], 300, pattern="(unclosed")


def test_non_str_item_is_a_type_error():
    with pytest.raises(TypeError, match="item 2 of the iterator is bytes, not str"):
        trained(["a", "b", b"c", "d"], 300)


def test_lone_surrogate_is_a_value_error():
    with pytest.raises(ValueError, match="item 0 .* not valid Unicode"):
        trained(["bad \ud800 text"], 300)


def test_non_iterable_is_a_type_error():
    with pytest.raises(TypeError, match="iterable of str"):
        rustbpe.Tokenizer().train_from_iterator(42, 300)


def test_iterator_exception_propagates():
    def failing():
        yield "fine text"
        raise KeyError("the iterator broke")

    tok = rustbpe.Tokenizer()
    with pytest.raises(KeyError, match="the iterator broke"):
        tok.train_from_iterator(failing(), 300)
    with pytest.raises(RuntimeError, match="not trained"):
        tok.encode("x")


def test_untrained_tokenizer_is_a_clear_error():
    tok = rustbpe.Tokenizer()
    for call in (lambda: tok.encode("x"), tok.get_mergeable_ranks, tok.get_pattern, lambda: tok.batch_encode(["x"])):
        with pytest.raises(RuntimeError, match="not trained yet"):
            call()


def test_batch_encode_rejects_non_str_items(varied_tok):
    with pytest.raises(TypeError):
        varied_tok.batch_encode(["fine", 3])
