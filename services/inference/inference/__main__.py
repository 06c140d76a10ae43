"""Serve the model: `python -m inference` (settings from INFERENCE_* environment variables).

    INFERENCE_MODEL_DIR=out/sft python -m inference
    INFERENCE_REGISTRY_URL=http://127.0.0.1:8002 INFERENCE_REDIS_URL=redis://127.0.0.1:6379/0 python -m inference
"""

import json
import logging
import time

import uvicorn

from inference.api import create_app
from inference.settings import Settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(time.time(), 3), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def main() -> None:
    settings = Settings()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                timeout_keep_alive=30)


if __name__ == "__main__":
    main()
