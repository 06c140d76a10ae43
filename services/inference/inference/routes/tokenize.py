"""`POST /tokenize` and `POST /detokenize`: vLLM's endpoints, on the served model's tokenizer.

Tokenize takes a `prompt` or chat `messages` (`schemas.TokenizeRequest`) and answers `{count,
max_model_len, tokens}` (plus `token_strs` when asked); detokenize takes `{tokens}` and answers
`{prompt}`, the text. Like vLLM, they live at the bare paths only.
"""

from fastapi import APIRouter
from service_kit.auth import AuthFirstRoute, require_read
from service_kit.errors import APIError
from starlette.concurrency import run_in_threadpool

from inference import schemas, structured
from inference.deps import RunnerDep
from inference.routes.chat import render_prompt
from inference.textstream import token_bytes

router = APIRouter(route_class=AuthFirstRoute, dependencies=[require_read])


@router.post("/tokenize")
async def tokenize(body: schemas.TokenizeRequest, runner: RunnerDep) -> schemas.TokenizeResponse:
    served = await runner.acquire(body.model)
    try:
        tok = served.tokenizer
        if body.messages is not None:
            tools = structured.tools_for_prompt(structured.plan(None, body.tools, None))
            tokens = await render_prompt(tok, body.messages, body.add_generation_prompt, tools)
        else:
            bos = tok.bos_token_id if body.add_special_tokens else None
            tokens = await run_in_threadpool(tok.encode, body.prompt, bos)
        strs = (
            [token_bytes(tok, t).decode("utf-8", errors="replace") for t in tokens] if body.return_token_strs else None
        )
        return schemas.TokenizeResponse(
            count=len(tokens), max_model_len=served.context_length, tokens=tokens, token_strs=strs
        )
    finally:
        runner.release(served)


@router.post("/detokenize")
async def detokenize(body: schemas.DetokenizeRequest, runner: RunnerDep) -> schemas.DetokenizeResponse:
    served = await runner.acquire(body.model)
    try:
        vocab = served.tokenizer.vocab_size
        if bad := [t for t in body.tokens if not 0 <= t < vocab]:
            raise APIError(400, f"token {bad[0]} is not in [0, {vocab})", param="tokens", code="invalid_value")
        return schemas.DetokenizeResponse(prompt=await run_in_threadpool(served.tokenizer.decode, body.tokens))
    finally:
        runner.release(served)
