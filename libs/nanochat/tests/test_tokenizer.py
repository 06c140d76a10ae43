"""nanochat.tokenizer: vocab counts, save/load, token_bytes and every rule of the chat format."""

import json

import pytest
import tiktoken
from nanochat.tokenizer import SPECIAL_TOKENS, ConversationError, Tokenizer

# A bytes-only tokenizer: every ASCII character is exactly one id (its byte value), which makes the
# expected ids of a rendered conversation easy to write down by hand.
BYTES = Tokenizer({bytes([i]): i for i in range(256)})
BOS, US, UE, AS, AE, PS, PE, OS, OE = range(256, 265)


def b(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_special_ids_follow_the_ranks_in_spec_order():
    assert BYTES.vocab_size == 265
    assert [BYTES.encode_special(name) for name in SPECIAL_TOKENS] == list(range(256, 265))
    assert BYTES.bos_token_id == BOS
    with pytest.raises(ValueError, match="unknown special token"):
        BYTES.encode_special("<|nope|>")


def test_mask_rules_on_a_hand_checked_conversation():
    conversation = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "2*3?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "python", "text": "2*3"},
                    {"type": "python_output", "text": "6"},
                    {"type": "text", "text": "b"},
                ],
            },
        ]
    }
    ids, mask = BYTES.render_conversation(conversation)
    expected = [
        (BOS, 0),
        (US, 0), *[(t, 0) for t in b("hi")], (UE, 0),
        (AS, 0), *[(t, 1) for t in b("yo")], (AE, 1),
        (US, 0), *[(t, 0) for t in b("2*3?")], (UE, 0),
        (AS, 0),
        *[(t, 1) for t in b("a")],
        (PS, 1), *[(t, 1) for t in b("2*3")], (PE, 1),
        (OS, 0), *[(t, 0) for t in b("6")], (OE, 0),
        *[(t, 1) for t in b("b")],
        (AE, 1),
    ]  # fmt: skip
    assert list(zip(ids, mask)) == expected


def test_system_message_is_merged_into_the_first_user_message():
    with_system = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
    ]
    merged = [{"role": "user", "content": "be brief\n\nhi"}, {"role": "assistant", "content": "ok"}]
    assert BYTES.render_conversation(with_system) == BYTES.render_conversation(merged)
    ids, _ = BYTES.render_conversation(with_system)
    assert ids[: 2 + len("be brief\n\nhi")] == [BOS, US] + b("be brief\n\nhi")


def test_truncation_cuts_ids_and_mask_together():
    conversation = [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y" * 50}]
    full_ids, full_mask = BYTES.render_conversation(conversation, max_tokens=None)
    ids, mask = BYTES.render_conversation(conversation, max_tokens=60)
    assert len(full_ids) == 1 + 52 + 52 and (ids, mask) == (full_ids[:60], full_mask[:60])


def test_render_for_completion_drops_the_last_answer_and_primes_the_assistant():
    conversation = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "r"},
        {"role": "assistant", "content": "the answer to drop"},
    ]
    ids = BYTES.render_for_completion(conversation)
    assert ids == [BOS, US, *b("q"), UE, AS, *b("a"), AE, US, *b("r"), UE, AS]
    assert BYTES.render_for_completion(conversation[:3]) == ids


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty"),
        ([{"role": "assistant", "content": "x"}], "'user' was expected"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "wizard", "content": "x"}], "unknown role"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], "followed by a user"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "user", "content": ["not", "text"]}], "user content must be a string"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
            "unknown assistant part type 'image'",
        ),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text"}]}], "string 'text'"),
    ],
)
def test_malformed_conversations_raise_a_clear_error(messages, message):
    with pytest.raises(ConversationError, match=message):
        BYTES.render_conversation({"messages": messages})


def test_encode_treats_special_strings_as_text_and_adds_prepend_append():
    ids = BYTES.encode("<|bos|>", prepend="<|bos|>", append=AE)
    assert ids == [BOS] + b("<|bos|>") + [AE]
    assert BYTES.encode(["ab", "c"], prepend=BOS) == [[BOS, *b("ab")], [BOS, *b("c")]]
    with pytest.raises(TypeError):
        BYTES.encode(42)


def test_decode_bytes_keeps_a_cut_utf8_character_raw():
    ids = BYTES.encode("é")
    assert BYTES.decode_bytes(ids[:1]) == "é".encode()[:1]
    assert BYTES.decode(ids) == "é"


def test_vocab_size_counts_specials_and_training_uses_the_rest_as_ranks():
    text = " ".join(f"word{i} w{i * 7 % 13}x{i % 17}y cat{i % 5}" for i in range(2000))
    tok = Tokenizer.train_from_iterator([text], vocab_size=300)
    assert tok.num_ranks == 300 - len(SPECIAL_TOKENS) and tok.vocab_size == 300
    assert tok.encode_special("<|output_end|>") == 299
    assert len(tok.encode(text)) < 0.6 * len(text.encode()), "merges should compress repeated text"
    with pytest.raises(ValueError, match="at least 256"):
        Tokenizer.train_from_iterator([text], vocab_size=264)


def test_save_and_load_round_trip_in_plain_text(tmp_path):
    text = "Hello, wörld! 1234567 日本語 🙂\r\n\n   spaces" * 50
    tok = Tokenizer.train_from_iterator([text], vocab_size=400)
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks.tiktoken", "tokenizer.json"]
    config = json.loads((tmp_path / "tokenizer.json").read_text())
    assert config["special_tokens"]["<|bos|>"] == tok.num_ranks
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode(text) == tok.encode(text) and loaded.vocab_size == tok.vocab_size
    assert loaded.decode(loaded.encode(text)) == text


def test_load_rejects_broken_files(tmp_path):
    BYTES.save(tmp_path)
    ranks = tmp_path / "ranks.tiktoken"
    ranks.write_text(ranks.read_text().replace(" 7\n", " seven\n"))
    with pytest.raises(ValueError, match="ranks.tiktoken:8"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_token_bytes_are_true_byte_lengths_and_zero_for_specials():
    text = "naïve café — 日本 🙂 " * 30
    tok = Tokenizer.train_from_iterator([text], vocab_size=320)
    lengths = tok.token_bytes()
    assert len(lengths) == tok.vocab_size
    assert lengths[tok.num_ranks :] == [0] * len(SPECIAL_TOKENS)
    assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_encoding_matches_a_plain_tiktoken_encoding_of_the_same_ranks():
    text = "Some text with numbers 1234 and CJK 中文 and emoji 🎉🎉 " * 20
    tok = Tokenizer.train_from_iterator([text], vocab_size=350)
    plain = tiktoken.Encoding(
        "plain", pat_str=tok.pattern, mergeable_ranks=tok.encoding._mergeable_ranks, special_tokens={}
    )
    assert tok.encode(text) == plain.encode_ordinary(text)
