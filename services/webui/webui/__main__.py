"""Run the web UI server: `python -m webui` (settings from `WEBUI_*` environment variables)."""

import logging

import uvicorn

from webui.app import create_app
from webui.settings import Settings


def main() -> None:
    settings = Settings()
    # The server's own lines are JSON already; uvicorn's access log would only repeat them.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied call is ours already
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, access_log=False,
                log_level="info")


if __name__ == "__main__":
    main()
