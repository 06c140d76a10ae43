"""Job records in SQL (SQLAlchemy 2; SQLite by default, PostgreSQL in compose), migrated by Alembic.

A job is one row of `jobs` plus one row of `job_nodes` per node it runs on (`nnodes`): each node's
worker stores its host, process group id and heartbeat there, so a reaper on that host can kill
the group of a worker that died. Records live here, not in Redis, so they survive a Redis flush.

`migrate(url)` brings a database to the newest schema (the API and every worker call it at
start-up, serialised by a lock so concurrent starts never race); `make_engine(url)` gives an
engine tuned for several processes writing (SQLite: WAL and a busy timeout).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import JSON, Boolean, Engine, Float, ForeignKey, Integer, String, Text, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running") + TERMINAL


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    # The normalised request: steps with their full options, the resolved input, resources.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    nnodes: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    step_index: Mapped[int] = mapped_column(Integer, default=0)
    current_stage: Mapped[str | None] = mapped_column(String(64))
    step: Mapped[int | None] = mapped_column(Integer)
    total: Mapped[int | None] = mapped_column(Integer)
    eta_s: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    produced: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)
    log_tail: Mapped[str | None] = mapped_column(Text)
    # Re-queues so far: the current attempt is `attempts + 1` (task ids use it).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts an infrastructure failure (a lost worker or node) may end before the job fails;
    # a stage's own error counts only when `retry_on_error` is set, else it fails the job at once.
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    retry_on_error: Mapped[bool] = mapped_column(Boolean, default=False)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    nodes: Mapped[list[JobNode]] = relationship(
        back_populates="job", order_by="JobNode.node_rank", cascade="all, delete-orphan"
    )
    # Loaded with the job (one more query): every view of a job shows its attempts.
    attempt_rows: Mapped[list[JobAttempt]] = relationship(
        back_populates="job", order_by="JobAttempt.attempt", cascade="all, delete-orphan", lazy="selectin"
    )


class JobNode(Base):
    __tablename__ = "job_nodes"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    node_rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    host: Mapped[str | None] = mapped_column(String(255), index=True)
    worker: Mapped[str | None] = mapped_column(String(255))
    pgid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="nodes")


# An attempt's status: queued, running, then succeeded, failed, cancelled, lost (its worker or
# node stopped answering) or interrupted (its worker shut down; it does not count as a failure).
ATTEMPT_FAILURES = ("failed", "lost")


class JobAttempt(Base):
    """One try of a job: who ran it, how it ended and the step its training resumed from."""

    __tablename__ = "job_attempts"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1-based
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    resumed_from_step: Mapped[int | None] = mapped_column(Integer)

    job: Mapped[Job] = relationship(back_populates="attempt_rows")


def make_engine(url: str, busy_timeout: float = 10.0) -> Engine:
    """An engine for `url`; SQLite gets WAL and a busy timeout (seconds) so API and workers can share it."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": busy_timeout, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def _alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    # Two processes starting at once must not both create the tables.
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(727160)"))
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(727160)"))
                conn.commit()
    elif engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        with open(f"{engine.url.database}.migrate.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
    else:
        yield


def migrate(url: str) -> None:
    """Upgrade the database at `url` to the newest schema."""
    engine = make_engine(url)
    try:
        with _migration_lock(engine):
            command.upgrade(_alembic_config(url), "head")
    finally:
        engine.dispose()


class Database:
    """An engine plus a session factory; `session()` commits on success, rolls back on error."""

    def __init__(self, url: str, busy_timeout: float = 10.0):
        self.url = url
        self.engine = make_engine(url, busy_timeout)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
