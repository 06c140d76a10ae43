"""Inference settings, read from `INFERENCE_*` environment variables (pydantic-settings).

INFERENCE_MODEL_DIR=out/sft                      serve this checkpoint folder, no registry
INFERENCE_REGISTRY_URL=http://registry:8002      else: resolve, download and hot-swap from the registry
INFERENCE_REDIS_URL=redis://redis:6379/0         model.registered / alias.moved events (polling without)
INFERENCE_API_TOKEN=...                          require `Authorization: Bearer ...` on /v1/*
INFERENCE_SLOTS=32 INFERENCE_MAX_WAITING=256     KV-cache rows, waiting-queue bound (429 beyond)
INFERENCE_MAX_PROMPTS=16                         prompts one /v1/completions call may carry (400 beyond)
INFERENCE_CPU_THREADS=1                          torch threads of the model process on CPU (0: cores - 1)
INFERENCE_PREFIX_CACHING=true                    reuse cached prompt prefixes (blocks of INFERENCE_PREFIX_BLOCK)
INFERENCE_KV_BLOCKS=0                            the KV pool's blocks (0: every slot at max_len; fewer preempts)
INFERENCE_MAX_PINNED=1                           other registry versions loaded on demand for `model` name:3 / name@alias
INFERENCE_PINNED_LOAD_TIMEOUT_S=120              how long a request waits for its pinned version to load (503 beyond)
"""

from __future__ import annotations

from pathlib import Path

from nanochat_contracts.registry_events import CHANNEL
from nanochat_contracts.serving import SERVING_ALIAS
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERENCE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    model_dir: Path | None = None
    registry_url: str | None = None
    registry_token: str | None = None
    model_cache_dir: Path = Path("~/.cache/nanochat/models")
    # The registry model name served; `GET /v1/models` lists it under this id.
    model_name: str = "nanochat"
    serving_alias: str = SERVING_ALIAS
    # Pinned versions (`model` of `<name>:<version>` or `<name>@<alias>` naming another version than
    # the served one): at most max_pinned more models loaded beside the served one, each in its own
    # model process with its own KV cache (0: such requests get 400); the least recently used idle
    # one is evicted for a new one. A request waits up to pinned_load_timeout_s for its version to
    # download and load (then 503 with Retry-After while the load goes on).
    max_pinned: int = Field(default=1, ge=0)
    pinned_load_timeout_s: float = Field(default=120.0, gt=0)
    redis_url: str | None = None
    events_channel: str = CHANNEL
    # How often to resolve again when Redis is unset or unreachable (events are then missed).
    poll_interval_s: float = Field(default=5.0, gt=0)
    api_token: str | None = None
    device: str | None = None  # default: cuda when available, else cpu
    slots: int = Field(default=32, ge=1)
    # Positions per slot; 0 means the model's sequence_len.
    max_len: int = Field(default=0, ge=0)
    # Prompt tokens prefilled per iteration; while rows decode, one prompt longer than
    # decode_prefill_tokens is fed that many an iteration, so a long prompt arriving is spread over
    # many short iterations instead of stalling the streams (shorter ones go whole beside it).
    # bench/serve.py's chunked-prefill scenario at depth 4 (2,000-token prompt beside 16 streams),
    # their latency p99 during it over their p50: 16 gave 2.31-3.20x (4 runs), 32 2.44-4.07x (8),
    # 64 3.1-3.3x; that prompt's prefill takes 2.6-2.8 s at 16 and 1.5-1.6 s at 32. Only long
    # prompts pay it: shorter ones go whole.
    prefill_tokens: int = Field(default=512, ge=1)
    decode_prefill_tokens: int = Field(default=16, ge=1)
    # Automatic prefix caching: a prompt's full blocks of prefix_block tokens already in the cache
    # (an earlier turn of the conversation, a shared system prompt) are not prefilled again.
    prefix_caching: bool = True
    prefix_block: int = Field(default=16, ge=1)
    # The paged KV pool's size in blocks; 0 sizes it for every slot at max_len. A smaller pool
    # bounds memory below that: when it runs out, the newest request is preempted and recomputed.
    kv_blocks: int = Field(default=0, ge=0)
    max_waiting: int = Field(default=256, ge=0)
    # One /v1/completions call with a long `prompt` list would otherwise take every slot and the queue.
    max_prompts: int = Field(default=16, ge=1)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    default_max_tokens: int = Field(default=512, ge=1)
    log_level: str = "INFO"
    # torch intra-op threads of the model process on CPU; 0: one core fewer than the machine has
    # (at least 1), leaving a core to the HTTP process. CUDA keeps torch's default.
    cpu_threads: int = Field(default=0, ge=0)
    # On CUDA, torch.compile the model's MLPs for decoding (no effect on CPU, where compiling for
    # tens of seconds per model load buys little at serving batch sizes).
    compile_cuda: bool = True
