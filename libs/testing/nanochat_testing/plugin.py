"""Pytest plugin (entry point `pytest11`): session-scoped fixtures that run real store servers.

Any suite in the workspace can ask for `postgres_server`, `redis_server` or `s3_server`; each is
started once per test session on a free 127.0.0.1 port (see `nanochat_testing.servers`) and
stopped at the end. A server that cannot start fails the tests that need it, with its log.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nanochat_testing.servers import Server, ServerError, start_postgres, start_redis, start_s3


def _run(start) -> Iterator[Server]:
    try:
        server = start()
    except ServerError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Server]:
    """A PostgreSQL server; `.url` is the `postgres` database, `create_database` makes more."""
    yield from _run(start_postgres)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Server]:
    """A redis-server; `.url` is `redis://127.0.0.1:PORT/0`."""
    yield from _run(start_redis)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Server]:
    """moto's S3 server process; `.url` is its endpoint, `.extra` holds keys and region."""
    yield from _run(start_s3)
