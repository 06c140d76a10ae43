"""Our tokenizer in Hugging Face's formats and back: `tokenizer.json`, its config and the chat template.

Export (`to_hf_tokenizer`): the BPE ranks become a `tokenizers` byte-level BPE (vocab + merges,
by transformers' own tiktoken converter), the 9 specials are added tokens at the ids after the
ranks, and `CHAT_TEMPLATE` (Jinja) renders a conversation exactly as `Tokenizer.render_conversation`
does (with `add_generation_prompt`, as `render_for_completion`): the same text between the same
special tokens, so `AutoTokenizer`'s `apply_chat_template` gives the same ids; with `tools=` and
transformers' `tool_calls` / role `tool` messages too (docs/tools.md). Two things a template
cannot copy: a special token's text (`<|bos|>`) typed inside a message is encoded as that special
token by `tokenizers` (ours encodes it as plain text), and two *adjacent* text parts of one
assistant message are encoded as one text (ours encodes each on its own).

Import (`from_hf_tokenizer`): a `tokenizer.json` of that shape (byte-level BPE, a regex split,
the nanochat specials right after the ranks) back to our ranks; anything else is refused with a
message naming what differs. transformers and tokenizers are the optional extra `hf`; imported here
lazily.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from nanochat.tokenizer import RANKS_FILE, SPECIAL_TOKENS, TOOLS_HEADER, Tokenizer

CHAT_TEMPLATE = (
    "{%- if messages | length == 0 -%}"
    "{{ raise_exception('a conversation needs a non-empty list of messages') }}"
    "{%- endif -%}"
    "{%- set ns = namespace(lead='', start=0, open=false, user_next=true, first=true) -%}"
    # Function tools are listed ahead of the first user message, as tokenizer.render_tools writes them.
    "{%- if tools -%}"
    "{%- set ns.lead = '" + TOOLS_HEADER.replace("\n", "\\n") + "' -%}"
    "{%- for tool in tools -%}"
    "{%- set f = tool['function'] if tool['function'] is defined else tool -%}"
    "{%- set spec = {'name': f['name'], 'description': f.get('description') or '', 'parameters': f.get('parameters')} -%}"
    "{%- set ns.lead = ns.lead + (spec | tojson) + '\\n' -%}"
    "{%- endfor -%}"
    "{%- set ns.lead = ns.lead + '\\n' -%}"
    "{%- endif -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages | length < 2 or messages[1]['role'] != 'user' -%}"
    "{{ raise_exception('a system message must be followed by a user message') }}"
    "{%- endif -%}"
    "{%- set ns.lead = ns.lead + messages[0]['content'] + '\\n\\n' -%}"
    "{%- set ns.start = 1 -%}"
    "{%- endif -%}"
    "{%- set turns = messages[ns.start:] -%}"
    # After a tool's result the assistant's turn stays open: the model goes on inside it.
    "{%- set open_end = add_generation_prompt and turns[-1]['role'] == 'tool' -%}"
    "{%- if add_generation_prompt and turns[-1]['role'] == 'assistant' -%}"
    "{%- set turns = turns[:-1] -%}"
    "{%- endif -%}"
    "{{- '<|bos|>' -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{%- if not ns.open -%}"
    "{{ raise_exception('a tool message must follow an assistant message') }}"
    "{%- endif -%}"
    "{{- '<|output_start|>' + message['content'] + '<|output_end|>' -}}"
    "{%- else -%}"
    "{%- set continues = message['role'] == 'assistant' and not loop.first and loop.previtem['role'] == 'tool' -%}"
    "{%- if not continues -%}"
    "{%- if ns.open -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- set ns.open = false -%}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'user') != ns.user_next -%}"
    "{{ raise_exception('after an optional system message, turns must alternate user, assistant, user, ...') }}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + (ns.lead if ns.first else '') + message['content'] + '<|user_end|>' -}}"
    "{%- set ns.first = false -%}"
    "{%- set ns.user_next = false -%}"
    "{%- else -%}"
    "{%- if not continues -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- endif -%}"
    "{%- set ns.open = true -%}"
    "{%- set ns.user_next = true -%}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}"
    "{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}"
    "{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}"
    "{{ raise_exception('unknown assistant part type ' + part['type']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    # A call is a python block holding {"name": ..., "arguments": {...}} (tokenizer.tool_call_text);
    # arguments given as a JSON string are written as given.
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set f = call['function'] if call['function'] is defined else call -%}"
    "{%- if f['arguments'] is string -%}"
    "{{- '<|python_start|>{\"name\": ' + (f['name'] | tojson) + ', \"arguments\": ' + f['arguments'] + '}<|python_end|>' -}}"
    "{%- else -%}"
    "{{- '<|python_start|>' + ({'name': f['name'], 'arguments': f['arguments']} | tojson) + '<|python_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.open and not open_end -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- if add_generation_prompt and not open_end -%}"
    "{%- if turns | length == 0 -%}"
    "{{ raise_exception('nothing to complete: the conversation has no user message') }}"
    "{%- endif -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- endif -%}"
)


class TokenizerMismatch(ValueError):
    """A Hugging Face tokenizer that is not a nanochat tokenizer (the message says how)."""


def require_hf(what: str) -> None:
    """Raise a clear ImportError when the optional extra `hf` (transformers) is not installed."""
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"{what} needs the Hugging Face libraries, nanochat's optional extra `hf`: "
            f"pip install 'nanochat[hf]' (in this repo: uv sync --extra hf). Missing: {e.name}"
        ) from None


def to_hf_tokenizer(tokenizer: Tokenizer) -> Any:
    """A `PreTrainedTokenizerFast` equal to `tokenizer`, with the nanochat chat template."""
    require_hf("the Hugging Face tokenizer export")
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        converted = TikTokenConverter(
            vocab_file=str(Path(tmp) / RANKS_FILE), pattern=tokenizer.pattern, extra_special_tokens=SPECIAL_TOKENS
        ).converted()
    for i, name in enumerate(SPECIAL_TOKENS):
        if converted.token_to_id(name) != tokenizer.num_ranks + i:
            raise TokenizerMismatch(f"special token {name} did not land at id {tokenizer.num_ranks + i}")
    return PreTrainedTokenizerFast(
        tokenizer_object=converted,
        bos_token="<|bos|>",
        eos_token="<|assistant_end|>",
        pad_token="<|assistant_end|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _split_pattern(pre_tokenizer: dict | None) -> str:
    """The regex of a `Split` pre-tokenizer followed by a regex-free ByteLevel one."""
    pre = pre_tokenizer or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel":
        raise TokenizerMismatch(
            f"pre_tokenizer is {json.dumps(pre_tokenizer)[:200]}; a nanochat tokenizer is a regex Split "
            "then ByteLevel (use_regex false)"
        )
    split, byte_level = steps
    if byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        raise TokenizerMismatch("the ByteLevel pre-tokenizer adds a prefix space or its own regex; nanochat's does not")
    pattern = split.get("pattern", {}).get("Regex")
    if not isinstance(pattern, str) or split.get("behavior") != "Isolated" or split.get("invert"):
        raise TokenizerMismatch(f"the Split pre-tokenizer {json.dumps(split)[:200]} is not an isolating regex split")
    return pattern


def from_hf_tokenizer(tokenizer_json: str | Path) -> Tokenizer:
    """Our Tokenizer from a Hugging Face `tokenizer.json` that holds a nanochat tokenizer."""
    require_hf("the Hugging Face tokenizer import")
    path = Path(tokenizer_json)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerMismatch(f"{path}: not a readable tokenizer.json ({e})") from e
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or data.get("normalizer"):
        raise TokenizerMismatch(
            f"{path}: a nanochat tokenizer is a byte-level BPE without normalizer or byte fallback; "
            f"this one is {model.get('type')!r} (normalizer {data.get('normalizer')!r})"
        )
    pattern = _split_pattern(data.get("pre_tokenizer"))
    decoder = _byte_decoder()
    try:
        ranks = {bytes(decoder[c] for c in token): rank for token, rank in model["vocab"].items()}
    except KeyError as e:
        raise TokenizerMismatch(f"{path}: vocab token with a character outside the byte-level alphabet: {e}") from None
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    n = len(ranks)
    expected = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    if {name: added.get(name) for name in SPECIAL_TOKENS} != expected or set(added) != set(expected):
        raise TokenizerMismatch(
            f"{path}: added tokens {added} are not the nanochat specials {expected} right after the {n} ranks"
        )
    try:
        return Tokenizer(ranks, pattern)
    except ValueError as e:
        raise TokenizerMismatch(f"{path}: {e}") from e


def check_same_encoding(ours: Tokenizer, hf_tokenizer: Any, samples: list[str]) -> None:
    """Raise TokenizerMismatch when the HF tokenizer encodes a sample text differently from ours."""
    for text in samples:
        got = hf_tokenizer.encode(text, add_special_tokens=False)
        want = ours.encode(text)
        if got != want:
            raise TokenizerMismatch(f"the tokenizers disagree on {text[:60]!r}: {got[:12]} vs ours {want[:12]}")
