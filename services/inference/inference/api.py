"""The OpenAI-compatible HTTP API (FastAPI) in front of the served model's scheduler.

Routes: `POST /v1/chat/completions` and `POST /v1/completions` (also without `/v1`, the seed's
spelling), `GET /v1/models`, `/health` (liveness, never touches the model), `/ready` (a model is
loaded), `/metrics` (Prometheus). Streams are SSE as OpenAI sends them: a role chunk per choice,
content deltas, a chunk with `finish_reason`, the usage chunk when asked, `data: [DONE]`.
Calculator use arrives as `delta.nanochat_tool` in streams and `message.nanochat_parts` otherwise.

Everything about a request is checked (and the request queued) before any byte of a response is
sent, so bad input never gets a 200-then-cut stream; a failure mid-stream sends an error event,
then closes. Errors are OpenAI's JSON: 400 bad values or a prompt longer than the context
(`context_length_exceeded`), 401 wrong token, 404 unknown model, 413 body too large, 429 with
Retry-After when the waiting queue is full, 503 while no model is loaded.

Every completion carries its id (`chatcmpl-...`/`cmpl-...`) in an `X-Request-Id` header, and the
log line of its end (outcome, token counts, duration) carries it as `request_id`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from service_kit.app import create_app as create_service_app
from service_kit.auth import Tokens, require_read
from service_kit.errors import APIError, error_body
from service_kit.ops import Readiness

from nanochat.engine import SamplingParams
from nanochat.scheduler import QueueFull, Stats
from nanochat.tokenizer import ConversationError

from inference import schemas
from inference.generation import Generation, GenerationError, Update, merge_text
from inference.metrics import Metrics
from inference.model_process import ModelGone
from inference.served import ModelManager, NoModel, ServedModel
from inference.settings import Settings

log = logging.getLogger("inference.api")

DISCONNECT_POLL_S = 0.25


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls `on_close` however it ends.

    A client that leaves before the first byte can end the response before Starlette ever starts
    the body iterator, so a `finally` inside the iterator alone would never run and the request
    would keep its cache slots and its hold on the served model.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


def readiness(request: Request) -> Readiness:
    manager: ModelManager = request.app.state.manager
    manager.check_alive()
    served = manager.current
    if served is None:
        return Readiness({"model": manager.load_error or "loading"})
    info = served.info
    return Readiness({"model": "ok"}, {"model": info.name, "version": info.version, "stage": info.stage})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    manager = ModelManager(settings)

    def stats() -> Stats | None:
        served = manager.current
        return served.scheduler.stats() if served is not None else None

    metrics = Metrics(stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        yield
        await asyncio.to_thread(manager.close)

    # OpenAI answers a request it cannot parse with 400, and so does this server (not 422).
    app = create_service_app("inference", tokens=Tokens(read_token=settings.api_token,
                                                        reads_need_token=settings.api_token is not None),
                             readiness=readiness, metrics=metrics.registry, max_body_bytes=settings.max_body_bytes,
                             validation_status=400, title="nanochat inference", lifespan=lifespan,
                             description="OpenAI-compatible chat and completions over a continuous-batching "
                             "engine.")
    app.state.manager, app.state.metrics, app.state.settings = manager, metrics, settings

    def acquire(model: str | None) -> ServedModel:
        try:
            served = manager.acquire()
        except NoModel as e:
            raise APIError(503, f"no model is loaded yet: {e}", code="model_not_loaded",
                           headers={"Retry-After": "5"}) from None
        if model is not None and model != served.info.name:
            manager.release(served)
            raise APIError(404, f"the model {model!r} does not exist; this server serves {served.info.name!r}",
                           code="model_not_found", param="model")
        return served

    def sampling(body: schemas.SamplingFields, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            temperature=body.temperature,
            top_k=body.top_k if body.top_k > 0 else None,
            top_p=body.top_p if body.top_p < 1.0 else None,
            max_tokens=max_tokens or settings.default_max_tokens,
            seed=None if body.seed is None else body.seed % (1 << 62),
        )

    def start(served: ServedModel, prompts: list[list[int]], body: schemas.SamplingFields,
              max_tokens: int | None) -> Generation:
        context = served.context_length
        for prompt in prompts:
            if len(prompt) >= context:
                raise APIError(400, f"this model's context is {context} tokens but the prompt has {len(prompt)} "
                               f"tokens; it must be shorter than the context to leave room for a reply",
                               code="context_length_exceeded", param="messages")
        if body.n > served.scheduler.slots:
            raise APIError(400, f"n is {body.n} but the server runs at most {served.scheduler.slots} samples at once",
                           param="n", code="invalid_value")
        vocab = served.vocab_size
        if any(not 0 <= t < vocab for t in body.stop_token_ids or ()):
            raise APIError(400, f"stop_token_ids must lie in [0, {vocab})", param="stop_token_ids", code="invalid_value")
        try:
            return Generation(served, prompts, sampling(body, max_tokens), body.n, body.stop,
                              body.stop_token_ids or [], metrics)
        except ModelGone as e:
            raise APIError(503, f"{e}; retry shortly", code="model_not_loaded", headers={"Retry-After": "5"}) from None
        except QueueFull as e:
            raise APIError(429, f"{e}; retry shortly", code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None

    async def run_to_end(gen: Generation, request: Request) -> bool:
        """Collect the whole generation; False when the client went away first."""
        task = asyncio.ensure_future(gen.collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    return False
            task.result()
            return True
        finally:
            gen.close()

    def finished(rid: str, endpoint: str, outcome: str, gen: Generation) -> None:
        metrics.requests.labels(endpoint, outcome).inc()
        log.info("%s %s: %s, %d prompt + %d completion tokens in %.3f s", endpoint, rid, outcome,
                 gen.prompt_tokens, gen.completion_tokens, time.monotonic() - gen.started,
                 extra={"request_id": rid})

    def stream(gen: Generation, served: ServedModel, rid: str, endpoint: str, first: list[bytes],
               chunks_of, usage_chunk) -> StreamingResponse:
        outcome = "disconnected"
        closed = False

        def close() -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            gen.close()
            manager.release(served)
            finished(rid, endpoint, outcome, gen)

        async def body() -> AsyncIterator[bytes]:
            nonlocal outcome
            try:
                for chunk in first:
                    yield chunk
                async for updates in gen.updates():
                    for chunk in chunks_of(updates):
                        yield chunk
                if usage_chunk is not None:
                    yield usage_chunk(usage(gen))
                yield b"data: [DONE]\n\n"
                outcome = "ok"
            except GenerationError as e:
                outcome = "error"
                log.warning("%s %s failed: %s", endpoint, rid, e, extra={"request_id": rid})
                yield sse(json.dumps(error_body(500, str(e), code="generation_failed")))
            finally:
                close()

        return ClosingStreamingResponse(body(), close, media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                 "X-Request-Id": rid})

    def usage(gen: Generation) -> schemas.Usage:
        return schemas.Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                             total_tokens=gen.prompt_tokens + gen.completion_tokens)

    async def finish_plain(gen: Generation, served: ServedModel, request: Request, rid: str, endpoint: str) -> bool:
        try:
            done = await run_to_end(gen, request)
        except GenerationError as e:
            finished(rid, endpoint, "error", gen)
            raise APIError(500, str(e), code="generation_failed") from None
        finally:
            manager.release(served)
        finished(rid, endpoint, "ok" if done else "disconnected", gen)
        return done

    # ---- chat ----------------------------------------------------------------------------------

    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        served = acquire(body.model)
        try:
            try:
                conversation = [{"role": m.role, "content": m.rendered_content()} for m in body.messages]
                prompt = served.tokenizer.render_for_completion({"messages": conversation})
            except (ConversationError, ValueError) as e:
                raise APIError(400, str(e), param="messages", code="invalid_value") from None
            gen = start(served, [prompt], body, body.max_completion_tokens or body.max_tokens)
        except BaseException:
            manager.release(served)
            raise
        rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), served.info.name

        def chunk(choices: list[schemas.ChatChunkChoice]) -> bytes:
            return sse(schemas.ChatCompletionChunk(id=rid, created=created, model=name, choices=choices)
                       .model_dump_json())

        if body.stream:
            first = [chunk([schemas.ChatChunkChoice(index=c.index, delta={"role": "assistant", "content": ""})
                            for c in gen.choices])]

            def chunks_of(updates: list[Update]) -> list[bytes]:
                out = []
                for u in updates:
                    for kind, text in merge_text(u.parts):
                        delta = {"content": text} if kind == "text" else {"nanochat_tool": {"type": kind, "text": text}}
                        out.append(chunk([schemas.ChatChunkChoice(index=u.choice, delta=delta)]))
                    if u.finish_reason is not None:
                        out.append(chunk([schemas.ChatChunkChoice(index=u.choice, delta={},
                                                                  finish_reason=u.finish_reason)]))
                return out

            def usage_chunk(u: schemas.Usage) -> bytes:
                return sse(schemas.ChatCompletionChunk(id=rid, created=created, model=name, choices=[], usage=u)
                           .model_dump_json())

            return stream(gen, served, rid, "chat", first, chunks_of, usage_chunk if body.include_usage else None)

        if not await finish_plain(gen, served, request, rid, "chat"):
            return Response(status_code=499)
        choices = []
        for c in gen.choices:
            parts = merge_text(c.parts)
            content = "".join(text for kind, text in parts if kind == "text")
            message = schemas.AssistantMessage(content=content, nanochat_parts=[
                schemas.ToolPart(type=kind, text=text) for kind, text in parts])
            choices.append(schemas.ChatChoice(index=c.index, message=message, finish_reason=c.finish_reason))
        return JSONResponse(schemas.ChatCompletion(id=rid, created=created, model=name, choices=choices,
                                                   usage=usage(gen)).model_dump(), headers={"X-Request-Id": rid})

    # ---- completions ---------------------------------------------------------------------------

    async def completions(body: schemas.CompletionRequest, request: Request) -> Response:
        served = acquire(body.model)
        try:
            tok = served.tokenizer
            prompts = [tok.encode(text, prepend=tok.bos_token_id) for text in body.prompt]
            gen = start(served, prompts, body, body.max_tokens)
        except BaseException:
            manager.release(served)
            raise
        rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), served.info.name

        def chunk(choices: list[schemas.CompletionChoice], u: schemas.Usage | None = None) -> bytes:
            return sse(schemas.Completion(id=rid, created=created, model=name, choices=choices, usage=u)
                       .model_dump_json())

        if body.stream:
            def chunks_of(updates: list[Update]) -> list[bytes]:
                out = []
                for u in updates:
                    text = "".join(t for kind, t in u.parts if kind == "text")
                    if text or u.finish_reason is not None:
                        out.append(chunk([schemas.CompletionChoice(index=u.choice, text=text,
                                                                   finish_reason=u.finish_reason)]))
                return out

            return stream(gen, served, rid, "completions", [], chunks_of,
                          (lambda u: chunk([], u)) if body.include_usage else None)

        if not await finish_plain(gen, served, request, rid, "completions"):
            return Response(status_code=499)
        choices = [schemas.CompletionChoice(index=c.index, finish_reason=c.finish_reason,
                                            text="".join(t for kind, t in c.parts if kind == "text"))
                   for c in gen.choices]
        return JSONResponse(schemas.Completion(id=rid, created=created, model=name, choices=choices,
                                               usage=usage(gen)).model_dump(), headers={"X-Request-Id": rid})

    # ---- models, health ------------------------------------------------------------------------

    async def list_models() -> schemas.ModelList:
        served = manager.current
        if served is None:
            return schemas.ModelList(data=[])
        info = served.info
        return schemas.ModelList(data=[schemas.ModelCard(
            id=info.name, created=int(info.loaded_at), version=info.version, stage=info.stage,
            context_length=served.context_length, max_model_len=served.context_length)])

    auth = [require_read]
    # The bare paths are the seed's spelling, which existing clients of nanochat's server use.
    for prefix in ("/v1", ""):
        app.add_api_route(f"{prefix}/chat/completions", chat_completions, methods=["POST"], dependencies=auth)
        app.add_api_route(f"{prefix}/completions", completions, methods=["POST"], dependencies=auth)
        app.add_api_route(f"{prefix}/models", list_models, methods=["GET"], dependencies=auth)

    return app
