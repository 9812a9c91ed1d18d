"""Run untrusted Python (a model's solution plus hidden tests) in a limited child process.

``run_untrusted(solution, tests)`` writes both into a fresh temporary directory and runs them in
a new interpreter (``python -I -S -u``: no user site, no site-packages, no ``PYTHON*`` variables,
unbuffered output so a killed child still leaves its last lines):

* **time**: a wall-clock limit (the child's whole process group is killed) and a CPU limit
  (``RLIMIT_CPU``, soft limit caught in the child and reported as a timeout);
* **memory**: ``RLIMIT_AS`` set in ``preexec_fn``; a ``MemoryError`` is reported as ``memory``;
* **files**: ``RLIMIT_FSIZE`` caps every file the child writes, its captured stdout/stderr too;
* **network**: on Linux, ``unshare`` puts the child in an empty network namespace (and, where
  the kernel allows, a PID namespace whose processes all die with the sandbox); where no
  namespace can be made, an audit hook (PEP 578) installed before any untrusted line runs
  refuses socket creation, connection, name lookup, subprocesses and ``ctypes``;
* **environment**: only ``PATH``, ``HOME``/``TMPDIR`` (the work directory), ``LANG`` and
  ``PYTHONHASHSEED`` reach the child, so no API key is inherited;
* the temporary directory is removed afterwards, whatever the child did to its permissions.

The child runs the solution, then the tests in the same namespace, then every callable named
``test_*`` that the tests define. ``passed`` needs the runner's completion line, which carries
a random nonce sent on stdin and is written with a file descriptor saved before untrusted code
runs; so ``sys.exit(0)`` or ``os._exit(0)`` in a solution (the exit-code hack) reads as
``error``, not ``passed``. This is a guard against reward hacking, not a security boundary
against code that deliberately introspects the runner's memory for the nonce.
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timeout", "memory", "error"]
Isolation = Literal["auto", "namespace", "audit"]

TAIL_CHARS = 4000

# The runner is the child's main program. It reads the nonce, saves what it needs to report,
# optionally installs the network-blocking audit hook, then executes untrusted code.
_RUNNER = r'''
import os, signal, sys, traceback
_nonce = sys.stdin.readline().strip()
sys.stdin.close()
_fd = os.dup(1)
_write = os.write
_exit = os._exit

def _report(status, code):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    _write(_fd, ("\n%s %s\n" % (_nonce, status)).encode())
    _exit(code)

def _on_cpu_limit(signum, frame):
    _report("timeout", 124)

signal.signal(signal.SIGXCPU, _on_cpu_limit)
if sys.argv[1] == "audit":
    _BLOCKED = frozenset({
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.sendto", "socket.sendmsg", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
        "os.spawn", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
    })

    def _hook(event, args):
        if event in _BLOCKED:
            raise PermissionError("%s is blocked in the tether sandbox (no network, no subprocesses)" % event)

    sys.addaudithook(_hook)
sys.path.insert(0, os.getcwd())
_ns = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    for _file in ("solution.py", "tests.py"):
        with open(_file, encoding="utf-8") as _fh:
            _src = _fh.read()
        exec(compile(_src, _file, "exec"), _ns)
    for _name, _fn in list(_ns.items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
except AssertionError:
    traceback.print_exc()
    _report("failed", 1)
except MemoryError:
    _ns = None
    _report("memory", 3)
except BaseException:
    traceback.print_exc()
    _report("error", 4)
_report("passed", 0)
'''


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run did.

    ``status``: ``passed`` (every test ran without an exception), ``failed`` (an assertion
    failed), ``timeout`` (wall-clock or CPU limit), ``memory`` (the address-space limit was
    hit), ``error`` (any other exception, an early exit, or a kill). ``detail`` says why in one
    line; ``stdout``/``stderr`` are the last ``TAIL_CHARS`` characters; ``isolation`` is how the
    network was cut (``namespace`` or ``audit``).
    """

    status: Status
    detail: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: Literal["namespace", "audit"]

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command prefix that gives an empty network namespace here, or ``()``."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    for args in ((exe, "-rnpf", "--kill-child"), (exe, "-rn")):
        try:
            if subprocess.run([*args, "true"], capture_output=True, timeout=10).returncode == 0:
                return args
        except (OSError, subprocess.SubprocessError):
            continue
    return ()


def _limits(memory_bytes: int, cpu_s: int, file_bytes: int) -> None:
    """Runs in the child between fork and exec: the resource limits (inherited by its children)."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # soft: SIGXCPU (caught); hard: SIGKILL
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _remove_tree(path: str) -> None:
    """``rm -rf`` that also removes directories the child made unreadable or unwritable."""

    def fix(func: object, p: str, exc: object) -> None:
        parent = os.path.dirname(p)
        for target in (parent, p):
            try:
                os.chmod(target, stat.S_IRWXU)
            except OSError:
                pass
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, onerror=fix)
        else:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    for root, dirs, _files in os.walk(path):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), stat.S_IRWXU)
            except OSError:
                pass
    shutil.rmtree(path, onerror=fix)


def _tail(path: Path, nonce: str) -> tuple[str, str | None]:
    """The last ``TAIL_CHARS`` of a captured stream without the runner's line, and that line's status."""
    data = path.read_bytes()[-(TAIL_CHARS * 4 + 256):].decode("utf-8", errors="replace")
    status = None
    kept = []
    for line in data.splitlines(keepends=True):
        if line.startswith(nonce + " "):
            status = line.split()[1]
        else:
            kept.append(line)
    text = "".join(kept)
    if status is not None and text.endswith("\n"):
        text = text[:-1]  # the newline the runner wrote before its line
    return text[-TAIL_CHARS:], status


def run_untrusted(
    solution: str,
    tests: str = "",
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_file_mb: int = 16,
    cpu_s: int | None = None,
    isolation: Isolation = "auto",
    files: dict[str, str] | None = None,
) -> SandboxResult:
    """Run ``solution`` then ``tests`` in a limited child (see the module docstring); never raises for the child's faults.

    ``cpu_s`` is the CPU-time limit (default: ``timeout_s`` rounded up; a multi-threaded child can
    reach it before the wall clock does). ``files`` are extra text files written into the work
    directory first (names must be plain file names). ``isolation='namespace'`` raises ``RuntimeError`` where no namespace can be made.
    """
    prefix = namespace_prefix() if isolation in ("auto", "namespace") else ()
    if isolation == "namespace" and not prefix:
        raise RuntimeError("no network namespace can be made here (unshare missing or not permitted)")
    mode: Literal["namespace", "audit"] = "namespace" if prefix else "audit"
    nonce = secrets.token_hex(16)
    work = tempfile.mkdtemp(prefix="tether-sandbox-")
    logs = tempfile.mkdtemp(prefix="tether-sandbox-logs-")  # outside the work dir
    t0 = time.monotonic()
    try:
        for name, text in {**(files or {}), "solution.py": solution, "tests.py": tests}.items():
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise ValueError(f"sandbox file name {name!r} must be a plain file name")
            Path(work, name).write_text(text, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        cpu_s = cpu_s or max(1, int(timeout_s + 0.999))
        out_path, err_path = Path(logs, "stdout"), Path(logs, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-I", "-S", "-u", "-c", _RUNNER, mode],
                cwd=work, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                preexec_fn=lambda: _limits(memory_mb << 20, cpu_s, max_file_mb << 20),
                start_new_session=True,
            )
            timed_out = False
            try:
                proc.communicate(input=(nonce + "\n").encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: children of the code die too
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        wall = time.monotonic() - t0
        stdout, status = _tail(out_path, nonce)
        stderr, _ = _tail(err_path, nonce)
    finally:
        _remove_tree(work)
        shutil.rmtree(logs, ignore_errors=True)
    rc = proc.returncode
    if timed_out:
        return SandboxResult("timeout", f"killed after the {timeout_s:g} s wall-clock limit", rc, stdout, stderr, wall, mode)
    details = {
        "passed": "every test ran without an exception",
        "failed": "an assertion failed",
        "timeout": f"stopped at the {cpu_s} s CPU-time limit",
        "memory": f"ran out of the {memory_mb} MiB address-space limit",
        "error": "an exception other than an assertion (see stderr)",
    }
    if status in details:
        return SandboxResult(status, details[status], rc, stdout, stderr, wall, mode)  # type: ignore[arg-type]
    if "MemoryError" in stderr:
        return SandboxResult("memory", f"ran out of the {memory_mb} MiB address-space limit", rc, stdout, stderr, wall, mode)
    if rc is not None and rc < 0:
        try:
            how = f"signal {signal.Signals(-rc).name}"
        except ValueError:
            how = f"signal {-rc}"
    else:
        how = f"exit code {rc}"
    return SandboxResult("error", f"the process ended ({how}) before the tests finished", rc, stdout, stderr, wall, mode)
