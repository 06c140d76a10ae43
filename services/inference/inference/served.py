"""Which model is served, and hot swaps: load the new one beside the old, switch, retire the old.

`ServedModel` is one loaded checkpoint: its tokenizer here, its engine and scheduler (its own KV
cache) in a model process of its own (`model_process.py`). `ModelManager` holds the current one; API handlers `acquire()` it per request and
`release()` it when the response is done, so a swap (`install`) sends new requests to the new
model while streams on the old one run to their end; the old one is stopped and freed when its
last request is released.

Sources: a local folder (`INFERENCE_MODEL_DIR`), or the registry: the version the serving rule
(`nanochat_contracts.serving`) names, which the registry's resolve picks (the `serving` alias,
else the newest ready sft/rl version), downloaded into the cache and hash-checked by
`registry_client`. A background thread listens on
the Redis channel for `model.registered` (sft/rl) and `alias.moved` (serving) and resolves again;
without Redis (unset or down) it polls the registry every `poll_interval_s`, so an outage delays
a swap but never loses it. A `version.deleted` of the served version (or a resolve that no longer
names it, and the registry answering 404 for it) stops serving it at once: new requests get 503
until the version the rules name now is loaded, or for good when they name none.

Beside the served model, `pinned` holds the registry versions requests asked for by number or
alias (`inference.pinned_pool`, `inference.model_choice`). When the rules name a version that is
pinned, that model process becomes the served one instead of a second copy loading; a pinned
version deleted from the registry is dropped like a deleted served one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from nanochat.checkpoint import TOKENIZER_DIR
from nanochat.tokenizer import Tokenizer
from nanochat_contracts.registry_events import parse_registry_event
from nanochat_contracts.serving import SERVED_STAGES
from registry_client import RegistryClient, RegistryError
from registry_client.client import VersionInfo

from inference.model_process import ModelProcess
from inference.model_ref import model_id
from inference.pinned_pool import PinnedPool
from inference.settings import Settings

log = logging.getLogger("inference.served")


class NoModel(Exception):
    """No model is loaded yet."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int | None
    stage: str | None
    folder: Path
    loaded_at: float


class ServedModel:
    def __init__(self, info: ModelInfo, tokenizer: Tokenizer, scheduler: ModelProcess):
        self.info, self.tokenizer, self.scheduler = info, tokenizer, scheduler
        self.active = 0  # API requests holding it; guarded by the manager's lock
        self.retired = False
        self.last_used = time.monotonic()  # when its last request ended (pinned models' LRU)

    @classmethod
    def load(
        cls, folder: Path, settings: Settings, name: str, version: int | None = None, stage: str | None = None
    ) -> ServedModel:
        """Start a model process that verifies and loads the checkpoint folder and runs its scheduler."""
        scheduler = ModelProcess.start(
            folder,
            device=settings.device,
            max_waiting=settings.max_waiting,
            cpu_threads=settings.cpu_threads,
            compile_cuda=settings.compile_cuda,
            slots=settings.slots,
            max_len=settings.max_len,
            prefill_tokens=settings.prefill_tokens,
            decode_prefill_tokens=settings.decode_prefill_tokens,
            prefix_block=settings.prefix_block if settings.prefix_caching else 0,
            num_blocks=settings.kv_blocks or None,
        )
        try:
            tokenizer = Tokenizer.load(Path(folder) / TOKENIZER_DIR)  # the child has checked its hashes
        except BaseException:
            scheduler.stop()
            raise
        meta = scheduler.shape.meta
        info = ModelInfo(
            name=name,
            version=version if version is not None else meta.get("version"),
            stage=stage or meta.get("stage"),
            folder=Path(folder),
            loaded_at=time.time(),
        )
        return cls(info, tokenizer, scheduler)

    @property
    def model_id(self) -> str:
        """How answers name it: `<name>:<version>` (the bare name of a folder without a version)."""
        return model_id(self.info.name, self.info.version)

    @property
    def context_length(self) -> int:
        return self.scheduler.max_len

    @property
    def vocab_size(self) -> int:
        return self.scheduler.shape.vocab_size

    def close(self) -> None:
        self.scheduler.stop()


class ModelManager:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.current: ServedModel | None = None
        self.retiring: list[ServedModel] = []
        self.load_error: str | None = None
        self._lock = threading.Lock()
        self.pinned = PinnedPool(self, settings.max_pinned, self.load_version)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registry: RegistryClient | None = None
        if settings.registry_url:
            self._registry = RegistryClient(
                settings.registry_url, token=settings.registry_token, cache_dir=settings.model_cache_dir
            )

    @property
    def registry(self) -> RegistryClient | None:
        return self._registry

    # ---- requests (event loop) ---------------------------------------------------------------

    def acquire(self) -> ServedModel:
        self.check_alive()
        with self._lock:
            if self.current is None:
                raise NoModel(self.load_error or "no model is loaded yet")
            self.current.active += 1
            return self.current

    def release(self, served: ServedModel) -> None:
        with self._lock:
            served.active -= 1
            served.last_used = time.monotonic()
            free = served.retired and served.active == 0 and served in self.retiring
            if free:
                self.retiring.remove(served)
        if free:
            threading.Thread(target=served.close, name="inference-retire", daemon=True).start()

    def check_alive(self) -> None:
        """If the current model's process has died (killed, out of memory), load it again beside."""
        with self._lock:
            dead = self.current
            if dead is None or dead.scheduler.alive:
                return
            self.current = None
            self.load_error = (
                f"the model process exited (code {dead.scheduler.process.exitcode}); reloading {dead.info.folder}"
            )
        log.error("%s", self.load_error)
        threading.Thread(target=self._reload, args=(dead,), name="inference-reload", daemon=True).start()

    def _reload(self, dead: ServedModel) -> None:
        dead.close()
        info = dead.info
        try:
            self.install(ServedModel.load(info.folder, self.settings, info.name, info.version, info.stage))
        except Exception as e:
            self.load_error = f"reloading {info.folder} failed: {e}"
            log.exception("reloading %s failed", info.folder)

    # ---- loading (background thread) ---------------------------------------------------------

    def install(self, served: ServedModel) -> None:
        """Make `served` the model new requests get; the old one retires once its requests end."""
        with self._lock:
            old, self.current, self.load_error = self.current, served, None
            idle = old is not None and old.active == 0
            if old is not None:
                old.retired = True
                if not idle:
                    self.retiring.append(old)
        log.info(
            "serving %s v%s (%s) from %s", served.info.name, served.info.version, served.info.stage, served.info.folder
        )
        if idle:
            old.close()

    def start(self) -> None:
        """Load the configured model on a background thread (the server answers /health meanwhile)."""
        target = self._load_folder if self.settings.model_dir else self._watch
        if self.settings.model_dir or self._registry is not None:
            self._thread = threading.Thread(target=target, name="inference-models", daemon=True)
            self._thread.start()
        else:
            self.load_error = "no model configured: set INFERENCE_MODEL_DIR or INFERENCE_REGISTRY_URL"

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        pinned = self.pinned.close()
        with self._lock:
            models = ([self.current] if self.current else []) + self.retiring + pinned
            self.current, self.retiring = None, []
        for served in models:
            served.close()
        if self._registry is not None:
            self._registry.close()

    def _load_folder(self) -> None:
        try:
            self.install(ServedModel.load(self.settings.model_dir, self.settings, self.settings.model_name))
        except Exception as e:
            self.load_error = f"loading {self.settings.model_dir} failed: {e}"
            log.exception("loading %s failed", self.settings.model_dir)

    def resolve(self) -> VersionInfo | None:
        """The version the serving rule names, as the registry's resolve picks it: the serving
        alias, else its default (the newest ready sft/rl version); None when there is neither."""
        name = self.settings.model_name
        for alias in (self.settings.serving_alias, None):
            try:
                return self._registry.resolve(name, alias=alias)
            except RegistryError as e:
                if e.status != 404:
                    raise
        return None

    def load_version(self, version: int) -> ServedModel:
        """Download (hash-checked, cached) and load one registry version of the served name."""
        info = self._registry.get_version(self.settings.model_name, version)
        folder = self._registry.download(info.name, version=info.version)
        return ServedModel.load(folder, self.settings, info.name, info.version, info.stage)

    def refresh(self) -> None:
        """Resolve again and swap when the rules name another version than the one served."""
        for version in self.pinned.versions():
            if self._deleted(self.settings.model_name, version):
                self.pinned.drop(version, "its version was deleted from the registry")
        target = self.resolve()
        current = self.current
        if current is not None and current.info.version == (target.version if target else None):
            return
        if current is not None and (target is None or self._deleted(current.info.name, current.info.version)):
            self.uninstall(f"{current.info.name} v{current.info.version} was deleted from the registry")
        if target is None:
            return
        served = self.pinned.take(target.version)  # already loaded as a pinned version: serve that one
        if served is None:
            folder = self._registry.download(target.name, version=target.version)
            served = ServedModel.load(folder, self.settings, target.name, target.version, target.stage)
        self.install(served)

    def _deleted(self, name: str, version: int) -> bool:
        try:
            self._registry.get_version(name, version)
        except RegistryError as e:
            if e.status == 404:
                return True
            raise
        return False

    def uninstall(self, reason: str) -> None:
        """Stop giving the current model to new requests; it retires once its open requests end."""
        with self._lock:
            old, self.current, self.load_error = self.current, None, f"{reason}; no model is served"
            if old is None:
                return
            old.retired = True
            idle = old.active == 0
            if not idle:
                self.retiring.append(old)
        log.warning("stopped serving %s v%s: %s", old.info.name, old.info.version, reason)
        if idle:
            old.close()

    def _try_refresh(self) -> None:
        try:
            self.refresh()
        except Exception as e:  # the registry down or a bad version: keep serving, try again later
            if self.current is None:
                self.load_error = f"no model loaded: {e}"
            log.warning("resolving the served model failed: %s", e)

    def _relevant(self, data: bytes | str) -> bool:
        event = parse_registry_event(data)
        if event is None or event.name != self.settings.model_name:
            return False
        if event.type == "model.registered":
            return event.stage in SERVED_STAGES
        if event.type == "version.deleted":
            return True  # the served one (stop serving it) or the one an alias named
        return event.type == "alias.moved" and event.alias == self.settings.serving_alias

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self.settings.redis_url:
                self._listen()
            if not self._stop.is_set():
                self._try_refresh()
                self._stop.wait(self.settings.poll_interval_s)

    def _listen(self) -> None:
        """Resolve on every relevant event until Redis fails (then the caller polls a while)."""
        client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(self.settings.events_channel)
            self._try_refresh()  # whatever happened while we were not subscribed
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message and message.get("type") == "message" and self._relevant(message["data"]):
                    self._try_refresh()
        except redis.RedisError as e:
            log.warning(
                "redis events unavailable (%s); polling the registry every %.1f s", e, self.settings.poll_interval_s
            )
        finally:
            client.close()
