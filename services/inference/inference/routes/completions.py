"""`POST /completions`: OpenAI's (legacy) text completions of one or more prompts."""

import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from nanochat.tokenizer import Tokenizer
from service_kit.auth import AuthFirstRoute, require_read
from service_kit.errors import APIError
from starlette.concurrency import run_in_threadpool

from inference import schemas
from inference.deps import RunnerDep
from inference.generation import Generation, Update
from inference.runs import sse, usage

router = APIRouter(route_class=AuthFirstRoute, dependencies=[require_read])


@dataclass
class CompletionStream:
    """A text completion as `text_completion` events (text only: tool parts are the chat's)."""

    rid: str
    created: int
    model: str

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
            if text or u.finish_reason is not None:
                out.append(
                    self.chunk([schemas.CompletionChoice(index=u.choice, text=text, finish_reason=u.finish_reason)])
                )
        return out

    def usage(self, u: schemas.Usage) -> bytes:
        return self.chunk([], u)


def encode_all(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [tok.encode(text, prepend=tok.bos_token_id) for text in texts]


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
    except BaseException:
        runner.release(served)
        raise
    rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), served.model_id
    if body.stream:
        return runner.stream(gen, served, rid, "completions", CompletionStream(rid, created, name), body.include_usage)

    if not await runner.finish_plain(gen, served, request, rid, "completions"):
        return Response(status_code=499)
    choices = [
        schemas.CompletionChoice(
            index=c.index, finish_reason=c.finish_reason, text="".join(t for kind, t in c.parts if kind == "text")
        )
        for c in gen.choices
    ]
    return JSONResponse(
        schemas.Completion(id=rid, created=created, model=name, choices=choices, usage=usage(gen)).model_dump(),
        headers={"X-Request-Id": rid},
    )
