"""Request and response bodies of the OpenAI-compatible API (pydantic), as OpenAI's clients send them.

A request field this server does not know is a 400 naming it (`param`), so an option is never
accepted and silently ignored, except the few OpenAI documents as hints a server may ignore
(`IGNORED_FIELDS`); values out of range are 400s; a null (OpenAI makes every optional field
nullable) means the field's default. Inside messages and `stream_options`, unknown fields are
ignored. `top_k` 0 or -1 means no top-k (vLLM's convention). Messages may carry
content as a string or a list of text parts; an assistant message may carry `nanochat_parts`
(text / python / python_output), which the web UI sends back so tool turns survive a round trip.

Log-probabilities (`logprobs` / `top_logprobs` on chat, `logprobs` and `echo` on completions)
are log_softmax of the model's raw logits, before temperature, top-k/top-p, penalties,
`logit_bias` and any grammar: what the model itself gives each token, not the distribution the
sample was drawn from. `frequency_penalty` / `presence_penalty` follow OpenAI's formula over
the tokens the sample generated so far; `logit_bias` maps token ids (as strings) to [-100, 100].
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from inference.structured import ResponseFormat, Tool, ToolCall, ToolChoice

MAX_STOP_STRINGS = 16
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's bounds
MAX_COMPLETION_LOGPROBS = 5

# Request fields OpenAI documents as hints a server may ignore without changing the answer;
# they are accepted and dropped. Every other unknown field is a 400 naming it.
IGNORED_FIELDS = frozenset(
    {
        "store",  # whether OpenAI keeps the completion for its dashboard: nothing is stored here
        "metadata",  # tags for that stored completion
        "service_tier",  # OpenAI's capacity tier
        "prompt_cache_key",  # a routing hint for OpenAI's prompt cache (the prefix cache needs none)
        "safety_identifier",  # an end-user id for OpenAI's abuse monitoring, like `user`
    }
)


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class ToolPart(Lenient):
    type: Literal["text", "python", "python_output"]
    text: str


class ChatMessage(Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    nanochat_parts: list[ToolPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls (inference.structured)
    tool_call_id: str | None = None  # which call a tool result answers: results render in call order

    def rendered_content(self) -> str | list[dict[str, str]]:
        """What the tokenizer's chat renderer takes: a string, or an assistant's list of parts."""
        if self.role == "assistant" and self.nanochat_parts:
            return [p.model_dump() for p in self.nanochat_parts]
        if self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(Lenient):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # OpenAI's end-user id for abuse monitoring: accepted, not used

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        # OpenAI's reference makes every optional field nullable, null meaning its default
        # (clients send `"temperature": null`): a null takes the field's default here too.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in IGNORED_FIELDS and v is not None}
        return data

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[int, float]:
        bias = {}
        for key, value in (v or {}).items():
            # isascii too: isdigit takes "²" and other digits int() refuses.
            if not (key.strip().isascii() and key.strip().isdigit()):
                raise ValueError(f"logit_bias keys are token ids as strings, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values lie in [-100, 100], got {value} for token {key}")
            bias[int(key)] = value
        return bias

    @field_validator("stream_options")
    @classmethod
    def _options_need_a_stream(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # As OpenAI: without a stream they would be accepted and ignored (whole answers carry usage).
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def num_logprobs(self) -> int | None:
        """How many top alternatives each token reports; None: no log-probabilities at all."""
        return None

    @property
    def echo_logprobs(self) -> bool:
        """Whether the prompt's tokens' log-probabilities are asked for too."""
        return False


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    # inference.structured: constrained JSON answers and function tools
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: OpenAI's default, true

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    # OpenAI's four forms, normalised to a list of prompts: a string, strings, token ids, lists of
    # token ids. Token ids are the prompt as given (no <|bos|> put in front, as for text).
    prompt: list[str | list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of lists of token ids"
    )
    max_tokens: int | None = Field(default=16, ge=0)  # 0: score the prompt only (with echo and logprobs)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)  # only as many as n: no server-side choosing
    suffix: str | None = None  # only empty: there is no insertion mode

    @model_validator(mode="after")
    def _unsupported_values(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of must equal n ({self.n}): this server does not pick the best of several samples")
        if self.suffix:
            raise ValueError("suffix is not supported: nanochat has no insertion (fill-in-the-middle) mode")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def echo_logprobs(self) -> bool:
        return self.echo and self.logprobs is not None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: object) -> list[str | list[int]]:
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v and all(_is_token_id(t) for t in v):
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) or _is_token_ids(p) for p in v):
            return v
        raise ValueError(
            "prompt must be a string, a non-empty list of strings, a non-empty list of token ids (integers) "
            "or a list of such lists"
        )


def _is_token_id(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _is_token_ids(p: object) -> bool:
    return isinstance(p, list) and bool(p) and all(_is_token_id(t) for t in p)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """One entry per generated token (calculator and other special tokens included, by name)."""

    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists; with echo the prompt's tokens come first (the first
    one has no log-probability). text_offset: each token's start in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    nanochat_parts: list[ToolPart]
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanochat"
    version: int | None
    stage: str | None
    # null on a registry version not loaded now (GET /v1/models/{id} answers it; a request loads it)
    context_length: int | None
    max_model_len: int | None
    pinned: bool = False  # a version loaded beside the served one for requests naming it
    loaded: bool = True


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a `prompt` (with `<|bos|>` first unless add_special_tokens is false, as
    /v1/completions encodes it) or chat `messages` (rendered as /v1/chat/completions renders them,
    ending in `<|assistant_start|>` with add_generation_prompt; the rendering's own special
    tokens are always there, so add_special_tokens applies to `prompt` only); `tools` are listed in
    the prompt as a chat completion lists them."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.tools is not None and self.messages is None:
            raise ValueError("tools go with messages")
        if self.messages is not None and "add_special_tokens" in self.model_fields_set:
            raise ValueError("add_special_tokens applies to prompt only (messages carry their own special tokens)")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
