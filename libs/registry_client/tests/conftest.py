"""A real registry over HTTP for the client tests: the app served by uvicorn on a free port."""

import threading
import time

import pytest
import uvicorn
from nanochat_testing.servers import free_port
from registry.api import create_app
from registry.settings import Settings

TOKEN = "client-test-token"


@pytest.fixture(scope="session")
def registry_url(tmp_path_factory):
    port = free_port()
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("registry"), write_token=TOKEN, log_level="WARNING"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("registry did not start")
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "app": app, "token": TOKEN}
    server.should_exit = True
    thread.join(timeout=10)
