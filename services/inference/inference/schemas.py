"""Request and response bodies of the OpenAI-compatible API (pydantic), as OpenAI's clients send them.

Unknown fields are ignored (clients send more than we use); values out of range are 400s.
`top_k` 0 or -1 means no top-k (vLLM's convention). Messages may carry content as a string or a
list of text parts; an assistant message may carry `nanochat_parts` (text / python /
python_output), which the web UI sends back so tool turns survive a round trip.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 16


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class ToolPart(Lenient):
    type: Literal["text", "python", "python_output"]
    text: str


class ChatMessage(Lenient):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] | None = None
    nanochat_parts: list[ToolPart] | None = None

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


class SamplingFields(Lenient):
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


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        return prompts


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    nanochat_parts: list[ToolPart]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


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
    logprobs: None = None


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
    logprobs: None = None


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
