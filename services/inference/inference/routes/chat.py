"""`POST /chat/completions`: OpenAI's chat completions, calculator use included.

Streams carry the python expression and its result in `delta.nanochat_tool`; whole answers in
`message.nanochat_parts` (next to the plain `content` OpenAI clients read). With `logprobs`,
each chunk carries the log-probabilities of the tokens it answers for (a chunk with an empty
delta when held-back text or a special token produced no text yet), and a whole answer all of
them (`inference.logprobs`).
"""

import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from nanochat.tokenizer import ConversationError, Tokenizer
from service_kit.auth import AuthFirstRoute, require_read
from service_kit.errors import APIError
from starlette.concurrency import run_in_threadpool

from inference import schemas, structured
from inference.deps import RunnerDep
from inference.generation import Generation, Update, merge_text
from inference.logprobs import chat_logprobs
from inference.runs import sse, usage

router = APIRouter(route_class=AuthFirstRoute, dependencies=[require_read])


@dataclass
class ChatStream:
    """A chat completion as `chat.completion.chunk` events."""

    rid: str
    created: int
    model: str
    tokenizer: Tokenizer
    logprobs: bool = False
    tools: structured.ToolDeltas | None = None

    def chunk(self, choices: list[schemas.ChatChunkChoice], u: schemas.Usage | None = None) -> bytes:
        return sse(
            schemas.ChatCompletionChunk(
                id=self.rid, created=self.created, model=self.model, choices=choices, usage=u
            ).model_dump_json()
        )

    def first(self, gen: Generation) -> list[bytes]:
        return [
            self.chunk(
                [
                    schemas.ChatChunkChoice(index=c.index, delta={"role": "assistant", "content": ""})
                    for c in gen.choices
                ]
            )
        ]

    def chunks(self, updates: list[Update]) -> list[bytes]:
        out = []
        for u in updates:
            logprobs = chat_logprobs(self.tokenizer, u.logprobs) if self.logprobs and u.logprobs else None
            for kind, text in merge_text(u.parts):
                calls = self.tools.deltas(u.choice, kind, text) if self.tools else None
                delta = {"content": text} if kind == "text" else {"nanochat_tool": {"type": kind, "text": text}}
                for d in calls or [delta]:
                    out.append(self.chunk([schemas.ChatChunkChoice(index=u.choice, delta=d, logprobs=logprobs)]))
                    logprobs = None
            if u.finish_reason is not None or logprobs is not None:
                reason = self.tools.finish_reason(u.choice, u.finish_reason) if self.tools else u.finish_reason
                last = schemas.ChatChunkChoice(index=u.choice, delta={}, finish_reason=reason, logprobs=logprobs)
                out.append(self.chunk([last]))
        return out

    def usage(self, u: schemas.Usage) -> bytes:
        return self.chunk([], u)


async def render_prompt(
    tokenizer: Tokenizer,
    messages: list[schemas.ChatMessage],
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> list[int]:
    """The token ids the model sees for `messages` and the listed `tools` (ending in
    `<|assistant_start|>` with add_generation_prompt, or open after a tool's result); a
    conversation the renderer refuses is a 400. /tokenize shares it."""
    try:
        conversation = structured.conversation(messages, tools)
        # Off the event loop: rendering a long conversation would stall every open stream.
        if add_generation_prompt:
            return await run_in_threadpool(tokenizer.render_for_completion, conversation)
        ids, _ = await run_in_threadpool(tokenizer.render_conversation, conversation, None)
        return ids
    except (ConversationError, ValueError) as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from None


@router.post("/chat/completions")
async def chat_completions(body: schemas.ChatCompletionRequest, request: Request, runner: RunnerDep) -> Response:
    plan = structured.plan(body.response_format, body.tools, body.tool_choice, body.parallel_tool_calls)
    served = await runner.acquire(body.model)
    try:
        prompt = await render_prompt(served.tokenizer, body.messages, tools=structured.tools_for_prompt(plan))
        max_tokens = body.max_completion_tokens or body.max_tokens
        budget = min(max_tokens or runner.settings.default_max_tokens, served.context_length - len(prompt))
        grammar = await run_in_threadpool(structured.grammar_spec, plan, served.tokenizer, budget)
        gen = runner.start(
            served, [prompt], body, max_tokens, grammar=grammar, tools=plan.engine_tools, parallel=plan.parallel
        )
    except BaseException:
        runner.release(served)
        raise
    rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), served.model_id
    if body.stream:
        tools = structured.ToolDeltas(plan) if plan.calls else None
        fmt = ChatStream(rid, created, name, served.tokenizer, body.logprobs, tools)
        return runner.stream(gen, served, rid, "chat", fmt, body.include_usage)

    if not await runner.finish_plain(gen, served, request, rid, "chat"):
        return Response(status_code=499)
    choices = []
    for c in gen.choices:
        parts = merge_text(c.parts)
        content, calls, finish_reason = structured.answer(parts, plan, c.finish_reason)
        message = schemas.AssistantMessage(
            content=content,
            nanochat_parts=[schemas.ToolPart(type=kind, text=text) for kind, text in parts],
            tool_calls=calls,
        )
        logprobs = chat_logprobs(served.tokenizer, c.logprobs) if body.logprobs else None
        choices.append(
            schemas.ChatChoice(index=c.index, message=message, finish_reason=finish_reason, logprobs=logprobs)
        )
    return JSONResponse(
        schemas.ChatCompletion(id=rid, created=created, model=name, choices=choices, usage=usage(gen)).model_dump(),
        headers={"X-Request-Id": rid},
    )
