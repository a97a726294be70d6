"""The code sandbox survives hostile programs: the evaluator lives, the host is untouched, the result fails."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from pkt.evaluate import sandbox
from pkt.evaluate.sandbox import SandboxConfig, run_program, run_programs

ISO = sandbox.isolation()
STRONG = ISO.get("net") == "namespace" and ISO.get("fs") == "namespace" and ISO.get("user") == "dedicated-uid"
needs_strong = pytest.mark.skipif(not STRONG, reason=f"full isolation unavailable here: {ISO}")
FAST = SandboxConfig(timeout=3.0)


def _no_sandbox_processes():
    """No process of any sandbox uid is left behind."""
    uids = range(sandbox.UID_BASE, sandbox.UID_BASE + sandbox.UID_COUNT)
    return not any(sandbox._uid_processes(u) for u in uids)


def test_ok_program_passes_and_failure_fails():
    assert run_program("assert 1 + 1 == 2\nprint('hi')\n").passed
    r = run_program("assert 1 + 1 == 3\n")
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr
    r = run_program("def f(:\n")
    assert not r.passed and "SyntaxError" in r.stderr


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run_program("while True:\n    pass\n", SandboxConfig(timeout=1.5))
    assert not r.passed and r.status == "timeout"
    assert time.monotonic() - t0 < 10
    assert _no_sandbox_processes()


def test_cpu_limit_kills_busy_loop_even_with_long_wall_timeout():
    r = run_program("while True:\n    pass\n", SandboxConfig(timeout=30, cpu_seconds=1))
    assert not r.passed and r.status == "failed" and r.duration < 15


def test_memory_bomb_fails():
    r = run_program("x = bytearray(8 * 1024**3)\nprint(len(x))\n", SandboxConfig(max_memory_mb=512))
    assert not r.passed and "MemoryError" in r.stderr
    r = run_program("xs = []\nwhile True:\n    xs.append(' ' * 10**7)\n", SandboxConfig(max_memory_mb=512, timeout=5))
    assert not r.passed


@needs_strong
def test_fork_bomb_is_contained():
    prog = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    before = len(psutil.pids())
    r = run_program(prog, SandboxConfig(timeout=2.0, max_procs=16))
    assert not r.passed and r.status in ("timeout", "failed")
    assert _no_sandbox_processes()
    assert len(psutil.pids()) < before + 20


@needs_strong
def test_escaped_daemon_is_killed():
    # A child that leaves the process group (setsid) must not outlive the run.
    prog = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
            "    open('/tmp/late', 'w').write('x')\nraise SystemExit(1)\n")
    r = run_program(prog, FAST)
    assert not r.passed
    assert _no_sandbox_processes()


@needs_strong
def test_writes_outside_workdir_do_not_reach_host(tmp_path):
    token = uuid.uuid4().hex
    targets = [f"/tmp/pkt_hostile_{token}", f"/var/tmp/pkt_hostile_{token}", f"/dev/shm/pkt_hostile_{token}",
               str(Path(__file__).parent / f"pkt_hostile_{token}"), str(tmp_path / "escape"),
               os.path.expanduser(f"~/pkt_hostile_{token}")]
    prog = "import os\nok = 0\n"
    for t in targets:
        prog += f"try:\n    open({t!r}, 'w').write('pwned'); ok += 1\nexcept OSError:\n    pass\n"
    prog += "raise SystemExit(1)\n"  # never 'passes'
    r = run_program(prog, FAST)
    assert not r.passed
    for t in targets:
        assert not os.path.exists(t), t


def test_file_size_limit():
    r = run_program("open('big', 'wb').write(b'x' * (64 * 1024**2))\n", SandboxConfig(max_file_mb=1))
    assert not r.passed


def test_huge_output_is_capped():
    r = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", SandboxConfig(timeout=3, max_file_mb=2))
    assert not r.passed and len(r.stdout) <= SandboxConfig().output_chars


@needs_strong
def test_network_connect_fails():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(srv.accept())
        except OSError:
            pass

    th = threading.Thread(target=accept)
    th.start()
    prog = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')\n"
            "socket.create_connection(('1.1.1.1', 80), timeout=2)\n")
    r = run_program(prog, FAST)
    th.join()
    srv.close()
    assert not r.passed and not accepted


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("PKT_TEST_SECRET_TOKEN", "hunter2-secret")
    prog = ("import os\nfound = 'hunter2-secret' in repr(dict(os.environ))\n"
            "try:\n    found = found or b'hunter2-secret' in open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
            "except OSError:\n    pass\nassert found, 'no secret'\n")
    r = run_program(prog, FAST)
    assert not r.passed


@needs_strong
def test_killing_the_parent_fails_and_evaluator_survives():
    prog = ("import os, signal\nfor sig in (signal.SIGKILL, signal.SIGTERM):\n    os.kill(os.getppid(), sig)\n"
            "    os.kill(os.getppid(), signal.SIGSTOP)\nos.kill(-1, signal.SIGKILL)\n")
    r = run_program(prog, FAST)
    assert not r.passed and "PermissionError" in r.stderr
    assert psutil.Process(os.getpid()).status() != psutil.STATUS_STOPPED


def test_parallel_batch_of_mixed_programs_survives():
    progs = ["assert True\n", "while True: pass\n", "import os\nos._exit(3)\n", "x = 1\n", "raise ValueError\n"]
    rs = run_programs(progs, SandboxConfig(timeout=2), workers=2)
    assert [r.passed for r in rs] == [True, False, False, True, False]
    assert rs[1].status == "timeout"


def test_workdir_removed_and_fresh():
    r = run_program("import os\nopen('marker', 'w').write('1')\nprint(os.getcwd(), sorted(os.listdir('.')))\n")
    assert r.passed and "marker" in r.stdout
    r2 = run_program("import os\nassert 'marker' not in os.listdir('.')\n")
    assert r2.passed
    leftovers = [p for p in Path("/tmp").glob("pkt-sbx-*") if time.time() - p.stat().st_mtime < 5]
    assert not [p for p in leftovers if (p / "marker").exists()]
