"""The UI's login sessions: a role (admin or chat) in a signed, expiring cookie."""

import hashlib
import hmac
import time
from typing import Literal

from webui.settings import Settings

SESSION_COOKIE = "nanochat_session"
Role = Literal["admin", "chat"]


class Sessions:
    """Signed, expiring session cookies: `role.expiry.hmac`; nothing to store server-side."""

    def __init__(self, settings: Settings):
        self.admin = settings.admin_token.get_secret_value() if settings.admin_token else None
        self.chat = settings.chat_token.get_secret_value() if settings.chat_token else None
        self.max_age = settings.session_max_age_s
        if settings.session_secret:
            secret = settings.session_secret.get_secret_value()
        else:
            secret = f"nanochat-webui-session\0{self.admin or ''}\0{self.chat or ''}"
        self.key = hashlib.sha256(secret.encode()).digest()

    def role_for_token(self, token: str) -> Role | None:
        if self.admin and hmac.compare_digest(token.encode(), self.admin.encode()):
            return "admin"
        if self.chat and hmac.compare_digest(token.encode(), self.chat.encode()):
            return "chat"
        return None

    def issue(self, role: Role) -> str:
        payload = f"{role}.{int(time.time()) + self.max_age}"
        return f"{payload}.{self._sign(payload)}"

    def role_of(self, cookie: str | None) -> Role | None:
        if not cookie or cookie.count(".") != 2:
            return None
        role, expiry, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(f"{role}.{expiry}")):
            return None
        if role not in ("admin", "chat") or not expiry.isdigit() or int(expiry) < time.time():
            return None
        return role  # type: ignore[return-value]

    def _sign(self, payload: str) -> str:
        return hmac.new(self.key, payload.encode(), hashlib.sha256).hexdigest()
