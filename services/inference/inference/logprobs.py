"""Log-probabilities in OpenAI's two response shapes.

Chat: `choices[].logprobs.content[]` of `{token, logprob, bytes, top_logprobs: [{token, logprob,
bytes}]}`. Completions (the legacy shape): `{tokens, token_logprobs, top_logprobs, text_offset}`,
parallel lists, `top_logprobs` a `{token: logprob}` object per position (null for the echoed
prompt's first token, which has no log-probability). A token's text is its bytes decoded with
U+FFFD for a cut multi-byte character (`bytes` is exact); a special token shows its name and
adds nothing to the text, so `text_offset` counts only ordinary tokens' text.
"""

from __future__ import annotations

from nanochat.tokenizer import Tokenizer

from inference import schemas
from inference.generation import Scored
from inference.textstream import token_bytes


def _token(tokenizer: Tokenizer, token: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer: Tokenizer, scored: list[Scored]) -> schemas.ChatLogprobs:
    return schemas.ChatLogprobs(
        content=[
            schemas.ChatTokenLogprob(
                **_token(tokenizer, s.token, s.logprob),
                top_logprobs=[schemas.TopLogprob(**_token(tokenizer, t, lp)) for t, lp in s.top],
            )
            for s in scored
        ]
    )


def completion_logprobs(
    tokenizer: Tokenizer, scored: list[Scored], offset: int = 0
) -> tuple[schemas.CompletionLogprobs, int]:
    """The legacy shape for `scored`, whose first token starts at `offset` of the choice's text;
    and the offset after the last one (where a stream's next chunk starts)."""
    out = schemas.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for s in scored:
        text = token_bytes(tokenizer, s.token).decode("utf-8", errors="replace")
        out.tokens.append(text)
        out.token_logprobs.append(s.logprob)
        top = {token_bytes(tokenizer, t).decode("utf-8", errors="replace"): lp for t, lp in s.top}
        out.top_logprobs.append(None if s.logprob is None else top)
        out.text_offset.append(offset)
        if s.token < tokenizer.num_ranks:
            offset += len(text)
    return out, offset
