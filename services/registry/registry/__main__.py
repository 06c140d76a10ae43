"""Serve the registry: `python -m registry` (settings from REGISTRY_* environment variables)."""

import uvicorn
from service_kit import logs

from registry.api import create_app
from registry.settings import Settings


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    # uvicorn's own lines go through the root logger (JSON); the kit writes the access log.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        log_config=None,
        access_log=False,
        proxy_headers=True,
        timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()
