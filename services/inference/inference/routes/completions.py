"""`POST /completions`: OpenAI's (legacy) text completions of one or more prompts.

`echo` puts the prompt's text before each choice's completion (in a stream, in the choice's
first chunk); with `logprobs` too, the prompt's tokens (`<|bos|>` first, with no log-probability)
come before the generated ones in the choice's `logprobs` (`inference.logprobs`). `max_tokens`
0 generates nothing: with `echo` and `logprobs` that scores a prompt (what lm-eval-harness's
loglikelihood requests and OpenAI's legacy API do), every choice ending "length".
"""

import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from nanochat.tokenizer import Tokenizer
from service_kit.auth import AuthFirstRoute, require_read
from service_kit.errors import APIError
from starlette.concurrency import run_in_threadpool

from inference import schemas
from inference.deps import RunnerDep
from inference.generation import Choice, Generation, Scored, Update
from inference.logprobs import completion_logprobs
from inference.runs import sse, usage

router = APIRouter(route_class=AuthFirstRoute, dependencies=[require_read])


@dataclass
class CompletionStream:
    """A text completion as `text_completion` events (text only: tool parts are the chat's)."""

    rid: str
    created: int
    model: str
    tokenizer: Tokenizer
    body: schemas.CompletionRequest
    prompt_texts: list[str]  # what `echo` puts before each prompt's choices
    offsets: dict[int, int] = field(default_factory=dict)  # choice -> its text's length so far (text_offset)
    echoed: set[int] = field(default_factory=set)

    def chunk(self, choices: list[schemas.CompletionChoice], u: schemas.Usage | None = None) -> bytes:
        return sse(
            schemas.Completion(
                id=self.rid, created=self.created, model=self.model, choices=choices, usage=u
            ).model_dump_json()
        )

    def first(self, gen: Generation) -> list[bytes]:
        return []

    def chunks(self, updates: list[Update]) -> list[bytes]:
        out = []
        for u in updates:
            text = "".join(t for kind, t in u.parts if kind == "text")
            scored = u.logprobs
            if self.body.echo and u.choice not in self.echoed:
                self.echoed.add(u.choice)
                text = self.prompt_texts[u.choice // self.body.n] + text
                scored = (u.prompt_logprobs or []) + scored
            logprobs = None
            if self.body.logprobs is not None and scored:
                logprobs, self.offsets[u.choice] = completion_logprobs(
                    self.tokenizer, scored, self.offsets.get(u.choice, 0)
                )
            if text or u.finish_reason is not None or logprobs is not None:
                choice = schemas.CompletionChoice(
                    index=u.choice, text=text, finish_reason=u.finish_reason, logprobs=logprobs
                )
                out.append(self.chunk([choice]))
        return out

    def usage(self, u: schemas.Usage) -> bytes:
        return self.chunk([], u)


def whole_choice(
    tokenizer: Tokenizer, body: schemas.CompletionRequest, prompt_texts: list[str], c: Choice
) -> schemas.CompletionChoice:
    text = "".join(t for kind, t in c.parts if kind == "text")
    scored: list[Scored] = c.logprobs
    if body.echo:
        text = prompt_texts[c.index // body.n] + text
        scored = (c.prompt_logprobs or []) + scored
    logprobs = completion_logprobs(tokenizer, scored)[0] if body.logprobs is not None else None
    return schemas.CompletionChoice(index=c.index, finish_reason=c.finish_reason, text=text, logprobs=logprobs)


def encode_all(tok: Tokenizer, prompts: list[str | list[int]]) -> list[list[int]]:
    return [tok.encode(p, prepend=tok.bos_token_id) if isinstance(p, str) else p for p in prompts]


def prompt_texts(tok: Tokenizer, prompts: list[str | list[int]]) -> list[str]:
    return [p if isinstance(p, str) else tok.decode(p) for p in prompts]


@router.post("/completions")
async def completions(body: schemas.CompletionRequest, request: Request, runner: RunnerDep) -> Response:
    limit = runner.settings.max_prompts
    if len(body.prompt) > limit:
        raise APIError(
            400,
            f"prompt holds {len(body.prompt)} prompts; this server takes at most {limit} per request",
            param="prompt",
            code="invalid_value",
        )
    served = await runner.acquire(body.model)
    try:
        # Off the event loop: a long prompt list takes long enough to stall every open stream.
        prompts = await run_in_threadpool(encode_all, served.tokenizer, body.prompt)
        gen = runner.start(served, prompts, body, body.max_tokens, prompt_param="prompt")
        texts = prompt_texts(served.tokenizer, body.prompt) if body.echo else []
    except BaseException:
        runner.release(served)
        raise
    rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), served.model_id
    if body.stream:
        fmt = CompletionStream(rid, created, name, served.tokenizer, body, texts)
        return runner.stream(gen, served, rid, "completions", fmt, body.include_usage)

    if not await runner.finish_plain(gen, served, request, rid, "completions"):
        return Response(status_code=499)
    choices = [whole_choice(served.tokenizer, body, texts, c) for c in gen.choices]
    return JSONResponse(
        schemas.Completion(id=rid, created=created, model=name, choices=choices, usage=usage(gen)).model_dump(),
        headers={"X-Request-Id": rid},
    )
