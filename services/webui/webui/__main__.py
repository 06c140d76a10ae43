"""Run the web UI server: `python -m webui` (settings from `WEBUI_*` environment variables)."""

import logging

import uvicorn
from service_kit import logs

from webui.app import create_app
from webui.settings import Settings


def main() -> None:
    settings = Settings()
    logs.configure("INFO")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied call is ours already
    # uvicorn's own lines go through the root logger (JSON); the kit writes the access log.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        log_level="info",
    )


if __name__ == "__main__":
    main()
