"""The hidden-test executor: each limit (time, CPU, memory, output, network, environment, files) holds."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tether.sandbox import namespace_prefix, run_untrusted

SOLUTION = "def add(a, b):\n    return a + b\n"


def test_pass_fail_and_test_functions() -> None:
    ok = run_untrusted(SOLUTION, "assert add(2, 3) == 5\ndef test_more():\n    assert add(-1, 1) == 0\n")
    assert ok.status == "passed" and ok.passed and ok.returncode == 0
    bad = run_untrusted(SOLUTION, "def test_wrong():\n    assert add(2, 2) == 5, 'two and two'\n")
    assert bad.status == "failed" and "AssertionError: two and two" in bad.stderr and "test_wrong" in bad.stderr
    crash = run_untrusted("def add(a, b):\n    return a + undefined\n", "assert add(1, 2) == 3\n")
    assert crash.status == "error" and "NameError" in crash.stderr


def test_special_cased_solution_fails_hidden_tests() -> None:
    hack = "def add(a, b):\n    return 5\n"  # passes the visible test only
    assert run_untrusted(hack, "assert add(2, 3) == 5\n").status == "passed"
    assert run_untrusted(hack, "assert add(2, 3) == 5\nassert add(10, 1) == 11\n").status == "failed"


@pytest.mark.parametrize("exit_hack", ["import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "raise SystemExit\n"])
def test_exiting_early_is_not_a_pass(exit_hack: str) -> None:
    res = run_untrusted(SOLUTION + exit_hack, "assert add(1, 1) == 3\n")
    assert res.status == "error" and not res.passed


def test_forged_completion_line_is_not_a_pass() -> None:
    # the code cannot know the nonce, so printing something that looks like the runner's line fails
    res = run_untrusted("import os\nprint('0' * 32 + ' passed')\nos._exit(0)\n")
    assert res.status == "error" and "0" * 32 + " passed" in res.stdout


def test_wall_clock_limit_kills_the_process_and_its_children() -> None:
    code = "import subprocess, sys\nsubprocess.Popen(['sleep', '30'])\nwhile True:\n    pass\n"
    t0 = time.monotonic()
    res = run_untrusted(code, timeout_s=1.0, isolation="auto")
    elapsed = time.monotonic() - t0
    assert res.status == "timeout" and "1 s wall-clock" in res.detail
    assert elapsed < 4, elapsed


def test_cpu_time_limit_is_a_timeout() -> None:
    t0 = time.monotonic()
    res = run_untrusted("while True:\n    pass\n", timeout_s=20.0, cpu_s=1)
    assert res.status == "timeout" and "CPU-time" in res.detail
    assert time.monotonic() - t0 < 8


def test_memory_limit() -> None:
    res = run_untrusted("blob = bytearray(2 * 1024 ** 3)\nprint('allocated')\n", memory_mb=256)
    assert res.status == "memory" and "256 MiB" in res.detail and "allocated" not in res.stdout
    small = run_untrusted("blob = bytearray(16 * 1024 ** 2)\nassert len(blob) == 16 * 1024 ** 2\n", memory_mb=256)
    assert small.status == "passed"


def test_output_is_capped_and_tailed() -> None:
    res = run_untrusted("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n", max_file_mb=1)
    assert res.status == "error" and len(res.stdout) <= 4000
    res = run_untrusted("for i in range(5000):\n    print(i)\n")
    assert res.passed and res.stdout.endswith("4998\n4999\n") and len(res.stdout) == 4000


@pytest.fixture()
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    accepted: list[object] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    port = srv.getsockname()[1]
    socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from the test itself
    deadline = time.monotonic() + 2
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(accepted) == 1
    yield port, accepted
    srv.close()


CONNECT = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
    "s.settimeout(2)\n"
    "s.connect(('127.0.0.1', {port}))\n"
    "print('CONNECTED')\n"
)


@pytest.mark.skipif(not namespace_prefix(), reason="no network namespace can be made on this machine")
def test_no_network_in_the_namespace(listener: tuple[int, list[object]]) -> None:
    port, accepted = listener
    res = run_untrusted(CONNECT.format(port=port), isolation="namespace")
    assert res.isolation == "namespace"
    assert res.status == "error" and "CONNECTED" not in res.stdout and "unreachable" in res.stderr.lower()
    assert len(accepted) == 1  # only the test's own connection


def test_no_network_with_the_audit_hook(listener: tuple[int, list[object]]) -> None:
    port, accepted = listener
    res = run_untrusted(CONNECT.format(port=port), isolation="audit")
    assert res.isolation == "audit"
    assert res.status == "error" and "CONNECTED" not in res.stdout
    assert "socket.__new__ is blocked" in res.stderr
    spawn = run_untrusted("import subprocess\nsubprocess.run(['true'])\n", isolation="audit")
    assert spawn.status == "error" and "subprocess.Popen is blocked" in spawn.stderr
    assert len(accepted) == 1


def test_clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-sandbox-planted-123")
    monkeypatch.setenv("TETHER_JUDGE_KEY", "sk-sandbox-planted-456")
    res = run_untrusted("import os\nprint(sorted(os.environ))\nprint(list(os.environ.values()))\n")
    assert res.passed
    assert "sk-sandbox-planted" not in res.stdout and "OPENAI_API_KEY" not in res.stdout
    assert "'PATH'" in res.stdout and "'HOME'" in res.stdout


def test_work_directory_is_removed_even_when_locked_or_killed() -> None:
    code = (
        "import os\n"
        "print('CWD', os.getcwd())\n"
        "os.makedirs('locked/inner')\n"
        "open('locked/inner/f.txt', 'w').write('x')\n"
        "os.chmod('locked/inner', 0)\n"
        "os.chmod('locked', 0o500)\n"
        "import sys\n"
        "sys.stdout.flush()\n"
    )
    for extra, status in (("", "passed"), ("while True:\n    pass\n", "timeout")):
        res = run_untrusted(code + extra, timeout_s=1.5)
        assert res.status == status
        cwd = Path(next(line for line in res.stdout.splitlines() if line.startswith("CWD")).split(" ", 1)[1])
        assert cwd.name.startswith("tether-sandbox-") and not cwd.exists()


def test_extra_files_and_bad_names() -> None:
    res = run_untrusted("import helper\n", "assert helper.VALUE == 7\n", files={"helper.py": "VALUE = 7\n"})
    assert res.passed
    with pytest.raises(ValueError, match="plain file name"):
        run_untrusted("", files={"../escape.py": ""})
