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

    # Bearer tokens the server adds when it calls each service (None: send none).
    inference_token: SecretStr | None = None
    trainer_token: SecretStr | None = None
    registry_token: SecretStr | None = None

    # The UI's own tokens. Without an admin token nobody can launch, cancel or move an alias.
    admin_token: SecretStr | None = None
    # When set, chatting needs this token (or the admin one); when unset, chat is open.
    chat_token: SecretStr | None = None
    # Signs the session cookie; derived from the tokens when unset, so a restart keeps sessions.
    session_secret: SecretStr | None = None
    session_max_age_s: int = Field(7 * 24 * 3600, gt=0)
    # Mark the cookie Secure when the UI is served over HTTPS (behind a TLS-terminating proxy).
    secure_cookies: bool = False

    connect_timeout_s: float = Field(5.0, gt=0)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)

    def upstream(self, service: str) -> tuple[str, SecretStr | None]:
        """The base URL (without a trailing slash) and the bearer token of a proxied service."""
        url, token = {
            "inference": (self.inference_url, self.inference_token),
            "trainer": (self.trainer_url, self.trainer_token),
            "registry": (self.registry_url, self.registry_token),
        }[service]
        return str(url).rstrip("/"), token

    @field_validator(
        "inference_token",
        "trainer_token",
        "registry_token",
        "admin_token",
        "chat_token",
        "session_secret",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose passes `${TOKEN:-}` as an empty string: that means no token, not "Bearer ".
        return None if value == "" else value
