"""Serve the model: `python -m inference` (settings from INFERENCE_* environment variables).

INFERENCE_MODEL_DIR=out/sft python -m inference
INFERENCE_REGISTRY_URL=http://127.0.0.1:8002 INFERENCE_REDIS_URL=redis://127.0.0.1:6379/0 python -m inference
"""

import uvicorn
from service_kit import logs

from inference.api import create_app
from inference.settings import Settings


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
        timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()
