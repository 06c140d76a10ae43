"""nanochat.sandbox under bubblewrap: each escape the best-effort sandbox let through (issue 26),
reproduced first (without bwrap, `allow_unsandboxed`, or plain Python), then shown blocked; the
refusal where no sandbox can be made; HumanEval's grading inside it."""

import json
import logging
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from nanochat.sandbox import PRELUDE, PROCESS_LIMIT, SandboxUnavailable, isolation_problem, run_python
from nanochat.stages.chat_eval import load_task
from nanochat.stages.cli import parse_options
from nanochat.tasks.humaneval import HumanEval


@pytest.fixture
def no_bwrap(monkeypatch):
    """This machine as one without bubblewrap."""
    monkeypatch.setenv("NANOCHAT_BWRAP", "/nonexistent/bwrap")


def unsandboxed(code: str, timeout: float = 5.0):
    """The best-effort run this module did before bwrap (needs NANOCHAT_BWRAP pointing nowhere)."""
    assert isolation_problem() is not None
    return run_python(code, timeout=timeout, allow_unsandboxed=True)


def processes_with(token: str) -> list[int]:
    """Live processes whose command line holds `token`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and token in (entry / "cmdline").read_text(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_for(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_this_machine_has_the_sandbox():
    assert isolation_problem() is None


def test_the_program_is_not_root_and_holds_no_capabilities():
    status = run_python("print(open('/proc/self/status').read())").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] != "0" and fields["NoNewPrivs"].strip() == "1"
    assert {fields[cap].strip() for cap in ("CapPrm", "CapEff", "CapAmb")} == {"0000000000000000"}


def test_the_workers_files_cannot_be_read(tmp_path, monkeypatch):
    tokens = tmp_path / "worker-data" / "tokens.json"
    tokens.parent.mkdir()
    tokens.write_text('{"registry": "secret-write-token"}')
    code = f"print(open({str(tokens)!r}).read())"
    with monkeypatch.context() as m:
        m.setenv("NANOCHAT_BWRAP", "/nonexistent/bwrap")
        assert "secret-write-token" in unsandboxed(code).stdout
    result = run_python(code)
    assert not result.success and "FileNotFoundError" in result.stderr
    assert "secret-write-token" not in result.stdout
    # Nor the checkout (runs/, data/, local blobs live beside it) or the venv's packages.
    seen = run_python(f"import os; print(os.path.exists({__file__!r}), os.path.exists({sys.prefix!r}))")
    assert seen.stdout.split() == ["False", "False"], seen


def test_nothing_outside_the_temp_folder_can_be_written(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    code = f"open({str(target)!r}, 'w').write('overwritten')"
    with monkeypatch.context() as m:
        m.setenv("NANOCHAT_BWRAP", "/nonexistent/bwrap")
        assert unsandboxed(code).success and target.read_text() == "overwritten"
    target.unlink()
    assert not run_python(code).success and not target.exists()
    for path in ("/usr/lib/nanochat-escape", "/nanochat-escape", "/etc/nanochat-escape"):
        result = run_python(f"open({path!r}, 'w')")
        assert not result.success and ("Read-only file system" in result.stderr or "denied" in result.stderr), result
    # The fresh temp folder is the working folder and /tmp; it is writable and starts empty.
    inside = run_python("import os; open('scratch', 'w').write('x'); print(os.getcwd(), sorted(os.listdir('/tmp')))")
    assert inside.success and inside.stdout == "/tmp ['program.py', 'scratch']\n", inside


def test_import_socket_cannot_reach_the_hosts_loopback():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        code = (
            f"import _socket; s = _socket.socket(); s.settimeout(3); s.connect(('127.0.0.1', {port})); print('reached')"
        )
        # `_socket` is under `socket`: the best-effort prelude does not stop it.
        plain = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, timeout=30)
        assert plain.stdout.strip() == "reached", plain.stderr
        server.accept()[0].close()
        result = run_python(code)
        assert not result.success and "reached" not in result.stdout, result
        with pytest.raises(TimeoutError):
            server.accept()
    interfaces = run_python("print(open('/proc/self/net/dev').read(), end='')").stdout
    assert [line.split(":")[0].strip() for line in interfaces.splitlines()[2:]] == ["lo"], interfaces


def setsid_grandchild(marker: Path) -> str:
    """A program whose grandchild leaves the session, says it started (`started` in the working
    folder), waits, then writes `marker`; the program returns once it has started."""
    late = "import sys, time; open('started', 'w'); time.sleep(1.5); open(sys.argv[1], 'w').write('escaped')"
    return (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-S', '-c', {late!r}, {str(marker)!r}])\n"
        "    os._exit(0)\n"
        "while not os.path.exists('started'):\n"
        "    time.sleep(0.05)\n"
    )


def test_a_setsid_grandchild_dies_with_the_sandbox(tmp_path, monkeypatch):
    marker = tmp_path / f"marker-{uuid.uuid4().hex}"
    with monkeypatch.context() as m:
        m.setenv("NANOCHAT_BWRAP", "/nonexistent/bwrap")
        assert unsandboxed(setsid_grandchild(marker)).success
        assert processes_with(marker.name), "the grandchild outlives the best-effort run"
        assert wait_for(marker.exists, 10)
    marker.unlink()
    result = run_python(setsid_grandchild(marker))
    assert result.success, result
    assert processes_with(marker.name) == []
    # And on timeout: the program still runs, its grandchild too; both are gone on return.
    result = run_python(
        setsid_grandchild(marker) + "print('grandchild started', flush=True)\ntime.sleep(60)\n", timeout=3
    )
    assert result.timed_out and result.stdout == "grandchild started\n", result
    assert processes_with(marker.name) == []
    assert not wait_for(marker.exists, 2)


FORK_100 = """\
import os, time
started = 0
for _ in range(100):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(2)
        os._exit(0)
    started += 1
print(started)
"""


def test_the_number_of_processes_is_limited(monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("NANOCHAT_BWRAP", "/nonexistent/bwrap")
        assert unsandboxed(FORK_100).stdout.strip() == "100"
    result = run_python(FORK_100)
    assert result.success and 0 < int(result.stdout) < PROCESS_LIMIT, result


def test_a_fork_bomb_is_bounded_and_leaves_nothing():
    token = uuid.uuid4().hex
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-S', '-c', {bomb!r}, {token!r}])"
    started = time.monotonic()
    result = run_python(code, timeout=1.5)
    assert result.timed_out and time.monotonic() - started < 30
    assert processes_with(token) == []


def test_memory_is_limited_to_256_mb():
    assert "MemoryError" in run_python("x = bytearray(300 << 20)").stderr
    assert run_python("x = bytearray(100 << 20)").success
    assert "MemoryError" in run_python("x = bytearray(4 << 30)", memory_mb=1024).stderr


def test_cpu_time_and_output_are_limited():
    slow = run_python("while True: pass", timeout=1)
    assert slow.timed_out and not slow.success and slow.returncode is None
    assert run_python("print(6 * 7)").stdout == "42\n"
    loud = run_python("import sys\nfor _ in range(5000): sys.stdout.write('x' * 1000)")
    assert not loud.success and len(loud.stdout) <= 1 << 20


def humaneval_task(tmp_path: Path, **kwargs) -> HumanEval:
    row = {
        "task_id": "HumanEval/0",
        "prompt": "from typing import List\n\ndef total(xs: List[int]) -> int:\n",
        "canonical_solution": "    return sum(xs)\n",
        "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n",
        "entry_point": "total",
    }
    folder = tmp_path / "tasks" / "openai/openai_humaneval" / "openai_humaneval"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.jsonl").write_text(json.dumps(row) + "\n")
    return HumanEval(tmp_path, timeout=2, **kwargs)


def test_humaneval_pass_and_fail_in_the_sandbox(tmp_path):
    task = humaneval_task(tmp_path)
    item = task[0]
    assert task.evaluate(item, item["messages"][1]["content"])
    assert task.evaluate(item, "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```")
    assert not task.evaluate(item, "def total(xs):\n    return 0\n")
    assert not task.evaluate(item, "def total(xs):\n    while True: pass\n")
    assert not task.evaluate(item, "def total(xs):\n    return open('/etc/hostname').read()\n")


def test_without_bwrap_humaneval_refuses_naming_what_to_install(tmp_path, no_bwrap):
    with pytest.raises(SandboxUnavailable, match="bubblewrap") as refused:
        humaneval_task(tmp_path)
    assert "apt-get install -y bubblewrap" in str(refused.value) and "allow_unsandboxed" in str(refused.value)
    with pytest.raises(SandboxUnavailable):
        run_python("print(1)")
    with pytest.raises(SandboxUnavailable):
        load_task("HumanEval", str(tmp_path))


def test_where_bwrap_cannot_make_namespaces_it_refuses_with_bwraps_reason(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("NANOCHAT_BWRAP", str(fake))
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace.*bubblewrap"):
        run_python("print(1)")


def test_allow_unsandboxed_runs_with_a_warning(tmp_path, no_bwrap, caplog):
    with caplog.at_level(logging.WARNING, logger="nanochat.sandbox"):
        task = humaneval_task(tmp_path, allow_unsandboxed=True)
    assert "WITHOUT a sandbox" in caplog.text and "bubblewrap" in caplog.text
    item = task[0]
    assert task.evaluate(item, item["messages"][1]["content"])
    assert not task.evaluate(item, "def total(xs):\n    return 0\n")
    # The best-effort limits still hold: memory, and the prelude's `socket` block.
    assert "MemoryError" in unsandboxed("x = bytearray(300 << 20)").stderr
    assert (
        "network access is disabled" in unsandboxed("import socket; socket.create_connection(('1.1.1.1', 80))").stderr
    )


def test_chat_eval_option_allow_unsandboxed(tmp_path, no_bwrap):
    assert parse_options("chat_eval", []).allow_unsandboxed is False
    options = parse_options("chat_eval", ["--allow-unsandboxed", "--data-dir", str(tmp_path)])
    assert options.allow_unsandboxed is True
    humaneval_task(tmp_path, allow_unsandboxed=True)
    task = load_task("HumanEval", options.data_dir, options.allow_unsandboxed)
    assert task.allow_unsandboxed and len(task) == 1
