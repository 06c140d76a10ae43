"""A test-only stand-in for the inference, trainer and registry services, speaking their documented
contracts (DESIGN.md "Contracts between the parts") under the prefixes /inference, /trainer and
/registry of one HTTP server, so the web UI's proxy and pages can be driven in a real browser
before the real services exist. `/<service>/_test/...` routes let a test steer it and read what
it saw (open streams, the last chat request).

Run: `python webui_fake_upstream.py PORT`.
"""

import asyncio
import json
import sys
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from service_kit.errors import error_response, validation_response

INFERENCE_TOKEN = "inference-secret"
TRAINER_TOKEN = "trainer-secret"
REGISTRY_TOKEN = "registry-secret"

app = FastAPI()
state = {
    "model": {"id": "nanochat", "object": "model", "version": 4, "stage": "sft", "context_length": 2048},
    "active": 0,
    "finished": 0,
    "disconnected": 0,
    "replies": 0,
    "busy_left": 1,
    "last_chat": None,
    "last_headers": None,
}


@app.get("/{service}/health")
async def health(service: str) -> dict:
    return {"status": "ok"}


@app.api_route("/{service}/_test/echo/{rest:path}", methods=["GET", "POST", "PUT"])
async def echo(service: str, rest: str, request: Request) -> dict:
    return {
        "raw_path": request.scope["raw_path"].decode(),
        "query": request.scope["query_string"].decode(),
        "method": request.method,
        "headers": dict(request.headers),
        "body": (await request.body()).decode(),
    }


# ---- inference --------------------------------------------------------------------------------


@app.get("/inference/v1/models")
async def models() -> dict:
    return {"object": "list", "data": [state["model"]]}


@app.get("/inference/_test/state")
async def inference_state() -> dict:
    return {k: state[k] for k in ("active", "finished", "disconnected", "replies", "last_chat", "last_headers")}


def reply_for(text: str) -> tuple[list[tuple[str, str]], float]:
    """The deltas of a reply, as (kind, text), and the pause between them."""
    lowered = text.lower()
    if "xss" in lowered:
        payload = (
            'Careful: <script>window.__xss = 1</script> and <img src=x onerror="window.__xss = 2"> '
            "and [a link](javascript:window.__xss=3) stay text. **Bold** is fine."
        )
        return [("text", w + " ") for w in payload.split(" ")], 0.005
    if "calc" in lowered:
        return [
            ("text", "Let me compute that. "),
            ("python", "12*7"),
            ("python_output", "84"),
            ("text", "The answer is **84**."),
        ], 0.02
    if "code" in lowered:
        return [("text", "Here is code:\n\n```python\nprint('hello')\n```\n"), ("text", "Done.")], 0.02
    if "slow" in lowered:
        return [("text", f"word{i} ") for i in range(2000)], 0.03
    state["replies"] += 1
    words = f"You said: {text.strip()}. This is reply #{state['replies']}.".split(" ")
    return [("text", w + " ") for w in words], 0.01


def answering_model(model: str | None):
    """The `model` inference answers with (`name:version`), as its pinned format has it: `nanochat`
    the served version, `nanochat:3` that version, `nanochat@best` the alias's; else a 404."""
    name, served = state["model"]["id"], state["model"]["version"]
    if model in (None, name):
        return f"{name}:{served}"
    if model.startswith(f"{name}:") and model[len(name) + 1 :].isdigit():
        version = int(model[len(name) + 1 :])
        if any(v["version"] == version for v in versions):
            return model
    elif model.startswith(f"{name}@") and model[len(name) + 1 :] in aliases:
        return f"{name}:{aliases[model[len(name) + 1 :]]}"
    return error_response(404, f"The model {model!r} does not exist.", code="model_not_found", param="model")


@app.post("/inference/v1/chat/completions")
async def chat(request: Request):
    body = await request.json()
    state["last_chat"] = body
    state["last_headers"] = dict(request.headers)
    if request.headers.get("authorization") != f"Bearer {INFERENCE_TOKEN}":
        return error_response(401, "missing or wrong bearer token")
    last = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
    if "context" in last.lower():
        return error_response(
            400, "The prompt has 4100 tokens but the context is 2048 tokens.", code="context_length_exceeded"
        )
    if "busy" in last.lower() and state["busy_left"] > 0:
        state["busy_left"] -= 1
        return error_response(429, "The waiting queue is full.", code="queue_full", headers={"Retry-After": "1"})
    answered = answering_model(body.get("model"))
    if isinstance(answered, Response):
        return answered
    deltas, pause = reply_for(last)

    async def events():
        state["active"] += 1
        done = False
        try:
            base = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": answered,
            }
            yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
            for kind, text in deltas:
                await asyncio.sleep(pause)
                delta = {"content": text} if kind == "text" else {"nanochat_tool": {"type": kind, "text": text}}
                yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': delta}]})}\n\n"
            yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                # As the inference service does: a last chunk with no choices and the counts.
                usage = {"prompt_tokens": 10, "completion_tokens": len(deltas), "total_tokens": 10 + len(deltas)}
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
            done = True
        finally:
            state["active"] -= 1
            state["finished" if done else "disconnected"] += 1

    return StreamingResponse(events(), media_type="text/event-stream")


# ---- trainer ----------------------------------------------------------------------------------


class BaseTrainOptions(BaseModel):
    depth: int = Field(4, ge=1, le=64, description="Transformer layers; width is depth * 64")
    device_batch_size: int = Field(2, ge=1)
    warmdown_ratio: float = Field(0.2, ge=0, le=1)
    eval_every: int | None = None


jobs: dict[str, dict] = {
    "job-1": {
        "id": "job-1",
        "stage": "base_train",
        "status": "running",
        "created_at": time.time(),
        "step": 0,
        "total": 20,
        "progress": 0.0,
        "metrics": {},
        "produced": [],
    },
    # A job whose first attempt was lost with its worker; the second resumed from a checkpoint.
    # Times are epoch seconds, as the trainer's JobOut has them.
    "job-retried": {
        "id": "job-retried",
        "stage": "base_train",
        "status": "running",
        "created_at": time.time(),
        "progress": 60.0,
        "metrics": {},
        "produced": [],
        "max_attempts": 3,
        "attempt": 2,
        "attempts": [
            {
                "attempt": 1,
                "status": "failed",
                "error": "worker lost: no heartbeat for 30 s",
                "worker": "worker-a",
                "started_at": 1795600800.0,
                "finished_at": 1795601100.0,
                "resumed_from_step": None,
            },
            {
                "attempt": 2,
                "status": "running",
                "error": None,
                "worker": "worker-b",
                "started_at": 1795601140.0,
                "finished_at": None,
                "resumed_from_step": 100,
            },
        ],
    },
}
# A speedrun pipeline mid-way, as JobOut has it: its steps, the index of the running one, and
# the versions the finished ones registered (each with the step that made it).
SPEEDRUN = ["make_data", "tok_train", "tok_eval", "base_train", "base_loss", "base_eval", "mid_train"]
jobs["job-speedrun"] = {
    "id": "job-speedrun",
    "stage": None,
    "pipeline": "speedrun",
    "preset": "tiny",
    "status": "running",
    "created_at": time.time(),
    "steps": [{"stage": name, "options": {}} for name in SPEEDRUN],
    "step_index": 4,
    "current_stage": "base_loss",
    "step": None,
    "total": None,
    "progress": 55.0,
    "metrics": {"loss": 3.2, "val_bpb": 1.05, "core": 0.11},
    "produced": [
        {"name": "nanochat", "version": 1, "stage": "tokenizer", "made_by": "tok_train", "step_index": 1},
        {"name": "nanochat", "version": 2, "stage": "base", "made_by": "base_train", "step_index": 3},
    ],
}
# A finished speedrun: its report step read the RL version (v5) and attached its card there.
FULL_SPEEDRUN = [
    "make_data",
    "tok_train",
    "tok_eval",
    "base_train",
    "base_loss",
    "base_eval",
    "mid_train",
    "chat_eval",
    "chat_sft",
    "chat_eval",
    "chat_rl",
    "chat_eval",
    "report",
]
jobs["job-report"] = {
    **jobs["job-speedrun"],
    "id": "job-report",
    "status": "succeeded",
    "steps": [{"stage": name, "options": {}} for name in FULL_SPEEDRUN],
    "step_index": 12,
    "current_stage": "report",
    "progress": 100.0,
    "metrics": {"loss": 2.9, "val_bpb": 0.98},
    "input": None,
    "produced": [
        {"name": "nanochat", "version": 1, "stage": "tokenizer", "made_by": "tok_train", "step_index": 1},
        {"name": "nanochat", "version": 2, "stage": "base", "made_by": "base_train", "step_index": 3},
        {"name": "nanochat", "version": 3, "stage": "mid", "made_by": "mid_train", "step_index": 6},
        {"name": "nanochat", "version": 4, "stage": "sft", "made_by": "chat_sft", "step_index": 8},
        {"name": "nanochat", "version": 5, "stage": "rl", "made_by": "chat_rl", "step_index": 10},
    ],
}
series: dict[str, dict[str, list]] = {
    "job-1": {"loss": [], "lr": [], "tok_per_s": []},
    "job-speedrun": {
        "loss": [[1, 9.0], [2, 6.0], [3, 4.5], [4, 3.6], [5, 3.2]],
        "val_bpb": [[2, 1.4], [5, 1.05]],
        "core": [[5, 0.11]],
    },
    "job-report": {
        "loss": [[1, 8.5], [2, 5.5], [3, 4.0], [4, 3.3], [5, 3.0], [6, 2.9]],
        "val_bpb": [[3, 1.2], [6, 0.98]],
    },
}
# Stage stdout (JSON events) and stderr (human lines) share a job's log.
SPEEDRUN_LOG = (
    "starting base_train\n"
    '{"type": "started", "stage": "base_train", "job_id": "job-speedrun", "input_versions": [], "ts": 1.7e9, "options": {}}\n'
    "step 00005 loss 3.2000\n"
    '{"type": "progress", "stage": "base_train", "job_id": "job-speedrun", "input_versions": [], "ts": 1.7e9, "step": 5}\n'
    "validation bpb 1.0500\n"
)
logs: dict[str, bytearray] = {
    "job-1": bytearray(b"starting base_train\n"),
    "job-speedrun": bytearray(SPEEDRUN_LOG.encode()),
}
# Set and replaced on each change of a log. (An asyncio.Condition's wait, cancelled by wait_for's
# timeout while many followers wait, can come back without its lock.)
log_changed = {"event": asyncio.Event()}


def notify_log_changed() -> None:
    log_changed["event"].set()
    log_changed["event"] = asyncio.Event()


drops = {"generation": 0}


@app.get("/trainer/v1/stages")
async def stages() -> dict:
    return {
        "pipelines": {"speedrun": ["make_data", "base_train"]},
        "presets": ["tiny", "d20"],
        "stages": [
            {
                "name": "base_train",
                "description": "Pretrain the base model.",
                "input_stage": "tokenizer",
                "options_schema": BaseTrainOptions.model_json_schema(),
            },
            {
                "name": "make_data",
                "description": "Write the tiny offline corpus.",
                "input_stage": None,
                "options_schema": {"type": "object", "properties": {}},
            },
        ],
    }


@app.get("/trainer/v1/jobs")
async def list_jobs() -> dict:
    return {"items": list(jobs.values()), "total": len(jobs), "limit": 50, "offset": 0}


@app.get("/trainer/v1/jobs/{job_id}")
async def get_job(job_id: str):
    if job_id not in jobs:
        return error_response(404, "no such job")
    return jobs[job_id]


# The running job's curves are base_train's; an earlier stage of it, tok_train, left a short curve
# of its own, as a pipeline's stages do (the trainer lists them in `stages`).
EARLIER_STAGE = {"loss": [[1, 9.0], [2, 8.5], [3, 8.25]]}
CURVE_STAGES = ["tok_train", "base_train"]


@app.get("/trainer/v1/jobs/{job_id}/metrics")
async def job_metrics(job_id: str, stage: str | None = None) -> dict:
    if stage == "tok_train":
        return {"stage": stage, "series": EARLIER_STAGE, "stages": CURVE_STAGES}
    return {"stage": "base_train", "series": series.get(job_id, {}), "stages": CURVE_STAGES}


@app.get("/trainer/v1/jobs/{job_id}/logs")
async def job_logs(job_id: str, request: Request, offset: int = 0, follow: bool = False):
    data = logs.setdefault(job_id, bytearray())
    start = int(request.headers.get("last-event-id") or offset)
    if not follow:
        return PlainTextResponse(bytes(data[start:]).decode())
    generation = drops["generation"]

    async def events():
        position = start
        while True:
            while True:
                end = data.find(b"\n", position)
                if end < 0:
                    break
                line = bytes(data[position:end]).decode()
                position = end + 1
                yield f"id: {position}\ndata: {line}\n\n"
            try:
                await asyncio.wait_for(log_changed["event"].wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            if drops["generation"] != generation:
                return  # the test asked for a dropped connection: the browser must reconnect

    return StreamingResponse(events(), media_type="text/event-stream")


@app.post("/trainer/_test/step")
async def step() -> dict:
    job = jobs["job-1"]
    n = job["step"] + 1
    job["step"] = n
    job["progress"] = 100.0 * n / job["total"]
    loss = 10.0 / (1 + n)
    for name, value in (("loss", loss), ("lr", 0.02 * (1 - n / 40)), ("tok_per_s", 1000.0 + 10 * n)):
        series["job-1"][name].append([n, value])
    job["metrics"] = {"loss": loss}
    logs["job-1"] += f"step {n:05d} loss {loss:.4f}\n".encode()
    notify_log_changed()
    return {"step": n}


@app.post("/trainer/_test/drop")
async def drop() -> dict:
    drops["generation"] += 1
    notify_log_changed()
    return {"generation": drops["generation"]}


@app.post("/trainer/v1/jobs")
async def create_job(request: Request):
    if request.headers.get("authorization") != f"Bearer {TRAINER_TOKEN}":
        return error_response(401, "bad token")
    body = await request.json()
    if body.get("stage") == "base_train":
        try:
            options = BaseTrainOptions.model_validate(body.get("options", {}))
        except ValidationError as exc:
            return validation_response([{**e, "loc": ["body", "options", *e["loc"]]} for e in exc.errors()], 422)
        if options.depth % 2 and (options.depth + 1) & options.depth:
            return validation_response(
                [
                    {
                        "loc": ["body", "options", "depth"],
                        "type": "value_error",
                        "msg": f"depth {options.depth}: an odd depth needs depth+1 to be a power of two",
                    }
                ],
                422,
            )
    job_id = f"job-{len(jobs) + 1}"
    jobs[job_id] = {
        "id": job_id,
        "stage": body.get("stage"),
        "pipeline": body.get("pipeline"),
        "status": "queued",
        "created_at": time.time(),
        "progress": 0.0,
        "metrics": {},
        "produced": [],
        "request": body,
    }
    return JSONResponse({"id": job_id, "status": "queued"}, status_code=202)


@app.post("/trainer/v1/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request):
    if request.headers.get("authorization") != f"Bearer {TRAINER_TOKEN}":
        return error_response(401, "bad token")
    jobs[job_id]["status"] = "cancelled"
    return {"id": job_id, "status": "cancelled"}


# ---- registry ---------------------------------------------------------------------------------

versions = [
    # Versions 1 and 2 were registered by the speedrun job (the registry keeps each one's job_id).
    {
        "version": 1,
        "stage": "tokenizer",
        "step": None,
        "parent": None,
        "metrics": {"ratio": 4.3},
        "job_id": "job-speedrun",
    },
    {
        "version": 2,
        "stage": "base",
        "step": 200,
        "parent": {"name": "nanochat", "version": 1},
        "metrics": {"val_bpb": 1.21, "core": 0.05},
        "job_id": "job-speedrun",
    },
    {
        "version": 3,
        "stage": "mid",
        "step": 80,
        "parent": {"name": "nanochat", "version": 2},
        "metrics": {"val_bpb": 1.1},
    },
    {
        "version": 4,
        "stage": "sft",
        "step": 40,
        "parent": {"name": "nanochat", "version": 3},
        "metrics": {"arc_easy": 0.31},
        "attachments": [{"path": "report.md", "size": 120, "sha256": "0" * 64}],
    },
    {
        "version": 5,
        "stage": "rl",
        "step": 30,
        "parent": {"name": "nanochat", "version": 4},
        "metrics": {"gsm8k": 0.04},
        "attachments": [
            {"path": "report.md", "size": 400, "sha256": "1" * 64},
            {"path": "loss.svg", "size": 300, "sha256": "2" * 64},
        ],
    },
]
# What a report card could carry that must stay inert: tags as text, a plot with a script in it.
REPORT_CARDS = {
    4: "# Report card\n\n| metric | SFT |\n|---|---|\n\n- ARC-Easy: **0.31**\n<script>window.__xss=4</script>\n",
    5: (
        "# nanochat training report\n\nThe tiny speedrun <script>window.__xss=5</script>"
        ' <img src=x onerror="window.__xss=6">\n\n'
        "| stage | val_bpb | GSM8K |\n|---|---|---|\n| base | 1.21 | |\n| rl | | 0.04 |\n\n"
        "![training loss](loss.svg)\n\n![elsewhere](https://example.com/x.png)\n"
    ),
}
LOSS_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="200" height="80"><script>parent.__xss=7</script>'
    '<polyline points="0,10 100,60 200,70" fill="none" stroke="#1d5bd8" stroke-width="3"/></svg>'
)
aliases = {"serving": 4}


@app.get("/registry/v1/models")
async def registry_models() -> dict:
    return {"items": [{"name": "nanochat", "latest_version": 5, "versions": 5, "aliases": aliases}]}


@app.get("/registry/v1/models/{name}/versions")
async def registry_versions(name: str) -> dict:
    items = [
        {
            "attachments": [],
            **v,
            "name": name,
            "created_at": "2026-11-20T10:00:00Z",
            "aliases": [a for a, target in aliases.items() if target == v["version"]],
        }
        for v in versions
    ]
    return {"items": items, "total": len(items), "limit": 500, "offset": 0}


@app.get("/registry/v1/models/{name}/versions/{version}")
async def registry_version(name: str, version: int):
    found = next((v for v in versions if v["version"] == version), None)
    if found is None:
        return error_response(404, "no such version")
    return {"attachments": [], **found, "name": name, "aliases": [a for a, t in aliases.items() if t == version]}


@app.get("/registry/v1/models/{name}/versions/{version}/lineage")
async def registry_lineage(name: str, version: int):
    by_version = {v["version"]: {"attachments": [], **v, "name": name} for v in versions}
    if version not in by_version:
        return error_response(404, "no such version")
    parents, parent = [], by_version[version]["parent"]
    while parent:
        parents.append(by_version[parent["version"]])
        parent = by_version[parent["version"]]["parent"]
    children = [v for v in by_version.values() if (v["parent"] or {}).get("version") == version]
    return {"version": by_version[version], "parents": parents, "children": children}


@app.get("/registry/v1/models/{name}/versions/{version}/attachments/{file}")
async def attachment(name: str, version: int, file: str):
    # The registry serves every attachment as octet-stream.
    if file == "loss.svg":
        return Response(LOSS_SVG, media_type="application/octet-stream")
    if version not in REPORT_CARDS:
        return error_response(404, "no such attachment")
    return Response(REPORT_CARDS[version], media_type="application/octet-stream")


class AliasMove(BaseModel):
    version: int


@app.put("/registry/v1/models/{name}/aliases/{alias}")
async def move_alias(name: str, alias: str, move: AliasMove, request: Request):
    if request.headers.get("authorization") != f"Bearer {REGISTRY_TOKEN}":
        return error_response(401, "bad token")
    target = next((v for v in versions if v["version"] == move.version), None)
    if target is None:
        return error_response(404, "no such version")
    aliases[alias] = move.version
    if alias == "serving":
        # What inference does on alias.moved: serve the version the alias now names.
        state["model"] = {**state["model"], "version": target["version"], "stage": target["stage"]}
    return {"alias": alias, "version": move.version}


@app.delete("/registry/v1/models/{name}/aliases/{alias}")
async def delete_alias(name: str, alias: str, request: Request):
    if request.headers.get("authorization") != f"Bearer {REGISTRY_TOKEN}":
        return error_response(401, "bad token")
    if aliases.pop(alias, None) is None:
        return error_response(404, f"no alias {alias!r}")
    return Response(status_code=204)


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
