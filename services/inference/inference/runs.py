"""One completion request's run, apart from its HTTP format: hold the served model, check the
request against it and start the generation, then either collect it whole or stream it, and in
every case release the model and log and count how it ended.

Everything about a request is checked (and the request queued) in `start`, before any byte of a
response is sent, so bad input never gets a 200-then-cut stream; a failure mid-stream sends an
error event, then closes. The chat and completions routes differ only in how they format what
the generation yields: a `StreamFormat`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import Request
from nanochat.engine import SamplingParams, check_params
from nanochat.scheduler import QueueFull
from service_kit.errors import APIError, error_body
from sse_starlette import EventSourceResponse, ServerSentEvent

from inference import model_choice, schemas
from inference.generation import Generation, GenerationError, Update
from inference.metrics import Metrics
from inference.model_process import ModelGone
from inference.served import ModelManager, ServedModel
from inference.settings import Settings

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25


def sse(payload: str) -> bytes:
    """One event as OpenAI frames it: `data: <payload>` and a blank line, LF-separated."""
    return ServerSentEvent(payload, sep="\n").encode()


def usage(gen: Generation) -> schemas.Usage:
    return schemas.Usage(
        prompt_tokens=gen.prompt_tokens,
        completion_tokens=gen.completion_tokens,
        total_tokens=gen.prompt_tokens + gen.completion_tokens,
    )


class StreamFormat(Protocol):
    """How one endpoint writes a generation as server-sent events."""

    def first(self, gen: Generation) -> list[bytes]:
        """The events before any token (chat: a role delta per choice)."""

    def chunks(self, updates: list[Update]) -> list[bytes]:
        """The events for what the generation produced since the last call."""

    def usage(self, u: schemas.Usage) -> bytes:
        """The usage event after the last token, when the client asked for it."""


class ClosingEventSourceResponse(EventSourceResponse):
    """An sse-starlette response that calls `on_close` however it ends.

    A client that leaves before the first byte can end the response before Starlette ever starts
    the body iterator, so a `finally` inside the iterator alone would never run and the request
    would keep its cache slots and its hold on the served model.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, sep="\n", **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Runner:
    """The served models, settings and metrics one app's requests run against."""

    def __init__(self, manager: ModelManager, settings: Settings, metrics: Metrics):
        self.manager, self.settings, self.metrics = manager, settings, metrics

    async def acquire(self, model: str | None) -> ServedModel:
        """Hold the model `model` names (the served one, or a pinned version loaded on demand:
        `inference.model_choice`); it stays loaded until `release`."""
        return await model_choice.acquire(self.manager, model)

    def release(self, served: ServedModel) -> None:
        self.manager.release(served)

    def sampling(
        self,
        body: schemas.SamplingFields,
        max_tokens: int | None,
        grammar: str | None,
        tools: tuple[str, ...] = (),
        parallel: bool = False,
    ) -> SamplingParams:
        return SamplingParams(
            temperature=body.temperature,
            top_k=body.top_k if body.top_k > 0 else None,
            top_p=body.top_p if body.top_p < 1.0 else None,
            max_tokens=max_tokens or self.settings.default_max_tokens,
            seed=None if body.seed is None else body.seed % (1 << 62),
            logprobs=body.num_logprobs,
            prompt_logprobs=body.echo_logprobs,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            logit_bias=body.logit_bias or (),
            grammar=grammar,
            tools=tools,
            parallel_tool_calls=parallel,
        )

    def start(
        self,
        served: ServedModel,
        prompts: list[list[int]],
        body: schemas.SamplingFields,
        max_tokens: int | None,
        prompt_param: str = "messages",
        grammar: str | None = None,
        tools: tuple[str, ...] = (),
        parallel: bool = False,
    ) -> Generation:
        """Check the request against the served model and queue it; every refusal is an APIError.

        grammar: a `nanochat.grammar` spec every sample is constrained to (response_format, tools);
        tools / parallel: the functions whose calls end a turn, and whether a call may follow a call.
        max_tokens 0 (/v1/completions) scores the prompts and generates nothing (`Generation`)."""
        context, vocab = served.context_length, served.vocab_size
        for prompt in prompts:
            if not all(0 <= t < vocab for t in prompt):  # token-id prompts of /v1/completions
                raise APIError(
                    400, f"prompt token ids must lie in [0, {vocab})", param=prompt_param, code="invalid_value"
                )
            if len(prompt) >= context:
                raise APIError(
                    400,
                    f"this model's context is {context} tokens but the prompt has {len(prompt)} "
                    f"tokens; it must be shorter than the context to leave room for a reply",
                    code="context_length_exceeded",
                    param=prompt_param,
                )
        slots = served.scheduler.slots
        if body.n * len(prompts) > slots:
            raise APIError(
                400,
                f"n is {body.n} for {len(prompts)} prompts but the server runs at most {slots} samples at once",
                param="n",
                code="invalid_value",
            )
        if any(not 0 <= t < vocab for t in body.stop_token_ids or ()):
            raise APIError(
                400, f"stop_token_ids must lie in [0, {vocab})", param="stop_token_ids", code="invalid_value"
            )
        try:
            score_only = max_tokens == 0
            params = self.sampling(body, 1 if score_only else max_tokens, grammar, tools, parallel)
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        try:
            check_params(params, vocab)  # the model process's own rule: no bias on a token it lacks
        except ValueError as e:
            raise APIError(400, str(e), param="logit_bias", code="invalid_value") from None
        try:
            return Generation(
                served,
                prompts,
                params,
                body.n,
                body.stop,
                body.stop_token_ids or [],
                self.metrics,
                score_only,
            )
        except ModelGone as e:
            raise APIError(503, f"{e}; retry shortly", code="model_not_loaded", headers={"Retry-After": "5"}) from None
        except QueueFull as e:
            raise APIError(429, f"{e}; retry shortly", code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None

    def finished(self, rid: str, endpoint: str, outcome: str, gen: Generation) -> None:
        self.metrics.requests.labels(endpoint, outcome).inc()
        log.info(
            "%s %s: %s, %d prompt + %d completion tokens in %.3f s",
            endpoint,
            rid,
            outcome,
            gen.prompt_tokens,
            gen.completion_tokens,
            time.monotonic() - gen.started,
            extra={"request_id": rid},
        )

    async def finish_plain(
        self, gen: Generation, served: ServedModel, request: Request, rid: str, endpoint: str
    ) -> bool:
        """Collect the whole generation; False when the client went away first."""
        try:
            done = await run_to_end(gen, request)
        except GenerationError as e:
            self.finished(rid, endpoint, "error", gen)
            raise APIError(500, str(e), code="generation_failed") from None
        finally:
            self.manager.release(served)
        self.finished(rid, endpoint, "ok" if done else "disconnected", gen)
        return done

    def stream(
        self, gen: Generation, served: ServedModel, rid: str, endpoint: str, fmt: StreamFormat, include_usage: bool
    ) -> EventSourceResponse:
        outcome = "disconnected"
        closed = False

        def close() -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            gen.close()
            self.manager.release(served)
            self.finished(rid, endpoint, outcome, gen)

        async def body() -> AsyncIterator[bytes]:
            nonlocal outcome
            try:
                # One write per model step, however many events it makes.
                if first := b"".join(fmt.first(gen)):
                    yield first
                async for updates in gen.updates():
                    if chunk := b"".join(fmt.chunks(updates)):
                        yield chunk
                if include_usage:
                    yield fmt.usage(usage(gen))
                yield sse("[DONE]")
                outcome = "ok"
            except GenerationError as e:
                outcome = "error"
                log.warning("%s %s failed: %s", endpoint, rid, e, extra={"request_id": rid})
                yield sse(json.dumps(error_body(500, str(e), code="generation_failed")))
            finally:
                close()

        return ClosingEventSourceResponse(body(), close, headers={"X-Request-Id": rid})


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
