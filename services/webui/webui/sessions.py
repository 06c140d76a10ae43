"""The UI's login sessions: a random session id, signed (itsdangerous) into an HTTP-only cookie,
whose role (admin or chat) and expiry the server keeps; a sign-out forgets the id, so the same
cookie never works again."""

import hmac
import secrets
import time
from typing import Literal

from itsdangerous import BadSignature, TimestampSigner

from webui.settings import Settings

SESSION_COOKIE = "nanochat_session"
Role = Literal["admin", "chat"]
# Each sign-in adds one; past this many the oldest go first, so sign-ins cannot fill the memory.
MAX_SESSIONS = 10_000


class Sessions:
    """Live sessions by id. The signature turns away forged or expired cookies before a lookup."""

    def __init__(self, settings: Settings):
        self.admin = settings.admin_token.get_secret_value() if settings.admin_token else None
        self.chat = settings.chat_token.get_secret_value() if settings.chat_token else None
        self.max_age = settings.session_max_age_s
        # The ids live in this process only, so a key of its own loses nothing at a restart.
        self.signer = TimestampSigner(secrets.token_bytes(32), salt="nanochat-webui-session")
        self.live: dict[str, tuple[Role, float]] = {}

    def role_for_token(self, token: str) -> Role | None:
        # Both compares always run, so the time taken tells nothing about which token was close.
        given = token.encode()
        is_admin = self.admin is not None and hmac.compare_digest(given, self.admin.encode())
        is_chat = self.chat is not None and hmac.compare_digest(given, self.chat.encode())
        return "admin" if is_admin else "chat" if is_chat else None

    def issue(self, role: Role) -> str:
        """A new session for `role`; the cookie value."""
        now = time.time()
        self.live = {sid: entry for sid, entry in self.live.items() if entry[1] > now}
        while len(self.live) >= MAX_SESSIONS:
            del self.live[next(iter(self.live))]
        sid = secrets.token_urlsafe(24)
        self.live[sid] = (role, now + self.max_age)
        return self.signer.sign(sid).decode()

    def role_of(self, cookie: str | None) -> Role | None:
        sid = self._session_id(cookie)
        entry = self.live.get(sid) if sid else None
        if entry is None or entry[1] < time.time():
            return None
        return entry[0]

    def revoke(self, cookie: str | None) -> None:
        sid = self._session_id(cookie)
        if sid:
            self.live.pop(sid, None)

    def _session_id(self, cookie: str | None) -> str | None:
        if not cookie:
            return None
        try:
            return self.signer.unsign(cookie, max_age=self.max_age).decode()
        except (BadSignature, UnicodeError):
            return None
