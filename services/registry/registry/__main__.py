"""Serve the registry: `python -m registry` (settings from REGISTRY_* environment variables)."""

import uvicorn

from registry.api import create_app
from registry.settings import Settings


def main() -> None:
    settings = Settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                proxy_headers=True, timeout_keep_alive=30)


if __name__ == "__main__":
    main()
