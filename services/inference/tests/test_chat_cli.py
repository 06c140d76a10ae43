"""chat_cli from a checkpoint folder and through the API: the scripted model's greedy reply, its
calculator call shown the same way both ways, and the conversation carried into the next turn."""

import subprocess
import sys

import pytest
from conftest import SCRIPT_WORDS, start_server

# What the scripted model answers: text, the `7*3` call, the engine's forced `21`, more text.
REPLY = "".join(SCRIPT_WORDS[:4]) + "[calc: 7*3][= 21]" + "".join(SCRIPT_WORDS[4:])


def chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanochat.chat_cli", "-t", "0", "--device", "cpu", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def scripted_server(checkpoints):
    s = start_server(model_dir=checkpoints["scripted"], slots=2, api_token="secret")
    s.wait_ready()
    yield s
    s.stop()


def test_one_prompt_from_a_checkpoint(checkpoints):
    proc = chat("--init-from", str(checkpoints["scripted"]), "-p", "What is 7*3?")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"Assistant: {REPLY}\n"


def test_a_conversation_from_a_checkpoint_goes_on_and_clears(checkpoints):
    proc = chat(
        "--init-from",
        str(checkpoints["scripted"]),
        "--max-tokens",
        "40",
        stdin="What is 7*3?\nAnd again?\nclear\nHi\nquit\nnever read\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join([f"Assistant: {REPLY}\n"] * 2 + ["(a new conversation)\n", f"Assistant: {REPLY}\n"])


def test_one_prompt_through_the_api_with_its_token(scripted_server, monkeypatch):
    monkeypatch.setenv("NANOCHAT_API_TOKEN", "secret")
    proc = chat("--url", scripted_server.url, "-p", "What is 7*3?")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"Assistant: {REPLY}\n"


def test_the_api_conversation_sends_the_tool_turn_back(scripted_server):
    proc = chat("--url", scripted_server.url, "--token", "secret", stdin="What is 7*3?\nAnd again?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"Assistant: {REPLY}\n" * 2


def test_a_wrong_token_is_a_clear_error_and_exit_1(scripted_server):
    proc = chat("--url", scripted_server.url, "--token", "wrong", "-p", "hi")
    assert proc.returncode == 1
    assert proc.stdout.startswith("Assistant: \n[error] the server answered 401: ")


def test_a_missing_checkpoint_exits_1_with_the_reason(tmp_path):
    proc = chat("--init-from", str(tmp_path / "nothing"), "-p", "hi")
    assert proc.returncode == 1 and proc.stderr.startswith("chat_cli: ")
