"""Shared test fixtures: real PostgreSQL, Redis and S3 server processes (see `servers`, `plugin`)."""
