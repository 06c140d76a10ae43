"""Settings of the web UI server, read from environment variables prefixed `WEBUI_`.

Example: `WEBUI_INFERENCE_URL=http://inference:8000 WEBUI_ADMIN_TOKEN=s3cret python -m webui`.
Service tokens stay here on the server: the browser never sees them.
"""

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("inference", "trainer", "registry")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WEBUI_")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)

    inference_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8000")
    trainer_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8001")
    registry_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8002")

    # Bearer tokens the server adds when it calls each service (None: send none). Inference has
    # one token for everything; when it is set, chatting through the UI needs a session.
    inference_token: SecretStr | None = None
    # The trainer's and the registry's write tokens go only with changes (POST, PUT, PATCH,
    # DELETE), which need the admin session; reads (GET, HEAD) carry the read token, never these.
    trainer_token: SecretStr | None = None
    registry_token: SecretStr | None = None
    trainer_read_token: SecretStr | None = None
    registry_read_token: SecretStr | None = None

    # The UI's own tokens. Without an admin token nobody can launch, cancel or move an alias.
    admin_token: SecretStr | None = None
    # A token that signs in for chat only. Chat needs a session (chat or admin) when this or the
    # inference token is set; with neither, chat is open.
    chat_token: SecretStr | None = None
    # Sessions live in this process's memory (a restart signs everyone out), so a sign-out
    # revokes the cookie for good.
    session_max_age_s: int = Field(7 * 24 * 3600, gt=0)
    # Mark the cookie Secure when the UI is served over HTTPS (behind a TLS-terminating proxy).
    secure_cookies: bool = False
    # Failed sign-ins one client address may make per window before it gets 429s. The address is
    # the one uvicorn reports: behind a reverse proxy, set FORWARDED_ALLOW_IPS (uvicorn's own
    # variable) to the proxy's address, so that X-Forwarded-For names the client.
    login_max_failures: int = Field(10, ge=1)
    login_window_s: float = Field(60.0, gt=0)

    connect_timeout_s: float = Field(5.0, gt=0)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    # Long-lived answers (a log follow, a chat's server-sent events) have their own connections
    # to each service, at most this many open at once per service; one more gets a 429. Short
    # requests have another pool per service and wait at most `pool_timeout_s` for a connection
    # (then 503), so no number of open streams holds them up.
    max_streams: int = Field(150, ge=1)
    max_short_connections: int = Field(100, ge=1)
    pool_timeout_s: float = Field(5.0, gt=0)

    def upstream(self, service: str) -> str:
        """The base URL of a proxied service, without a trailing slash."""
        url = {"inference": self.inference_url, "trainer": self.trainer_url, "registry": self.registry_url}[service]
        return str(url).rstrip("/")

    def token(self, service: str, *, write: bool) -> SecretStr | None:
        """The bearer token a proxied call to `service` carries: a change's or a read's."""
        if service == "inference":
            return self.inference_token
        if service == "trainer":
            return self.trainer_token if write else self.trainer_read_token
        return self.registry_token if write else self.registry_read_token

    @property
    def chat_needs_login(self) -> bool:
        return self.chat_token is not None or self.inference_token is not None

    @field_validator(
        "inference_token",
        "trainer_token",
        "registry_token",
        "trainer_read_token",
        "registry_read_token",
        "admin_token",
        "chat_token",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose passes `${TOKEN:-}` as an empty string: that means no token, not "Bearer ".
        return None if value == "" else value
