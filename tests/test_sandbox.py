"""The code sandbox survives hostile programs: the evaluator lives, the host is untouched, the result fails.

Each limit is checked by what shows it held (the kind of failure, the signal, what the program could reach),
never by how long a run took: the timings are measured in benchmarks/bench_sandbox.py. Where a program would
fail on any host (a connection to the internet on an offline machine), a control shows the same code succeeds
without the sandbox, so the test sees a sandbox that lets it through.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import psutil
import pytest

from pkt.evaluate import sandbox
from pkt.evaluate.sandbox import SandboxConfig, run_program, run_programs

ISO = sandbox.isolation()
STRONG = ISO.get("net") == "namespace" and ISO.get("fs") == "namespace" and ISO.get("user") == "dedicated-uid"
needs_strong = pytest.mark.skipif(not STRONG, reason=f"full isolation unavailable here: {ISO}")
# for programs that end at once: the limit only bites a hang, and 3 s was hit by a plain exit() on a loaded host
FAST = SandboxConfig(timeout=15.0)


def _no_sandbox_processes():
    """No process of any sandbox uid is left behind."""
    uids = range(sandbox.UID_BASE, sandbox.UID_BASE + sandbox.UID_COUNT)
    return not any(sandbox._uid_processes(u) for u in uids)


def _gone(pid: int) -> bool:
    """The process no longer runs (a zombie waiting for init to reap it has been killed too)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ok_program_passes_and_failure_fails():
    assert run_program("assert 1 + 1 == 2\nprint('hi')\n").passed
    r = run_program("assert 1 + 1 == 3\n")
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr
    r = run_program("def f(:\n")
    assert not r.passed and "SyntaxError" in r.stderr


def test_timeout_kills_the_program_and_its_children():
    # Both processes sleep: only the wall-clock timeout can end them (no CPU limit bites), and a run that
    # ends well before the sleep would is that timeout firing.
    prog = ("import os, time\nif os.fork() == 0:\n    print('child', os.getpid(), flush=True)\n"
            "    time.sleep(300)\n    os._exit(0)\ntime.sleep(300)\n")
    r = run_program(prog, SandboxConfig(timeout=1.5))
    assert not r.passed and r.status == "timeout" and r.returncode is None, (r.status, r.stderr[-300:])
    assert r.duration < 120
    child = int(r.stdout.split("child")[1].split()[0])
    assert _gone(child), child
    assert _no_sandbox_processes()


def test_cpu_limit_kills_busy_loop_even_with_long_wall_timeout():
    # Killed by RLIMIT_CPU (SIGXCPU), not by the 30 s wall timeout (that would be status "timeout").
    r = run_program("while True:\n    pass\n", SandboxConfig(timeout=30, cpu_seconds=1))
    assert not r.passed and r.status == "failed" and r.returncode == -signal.SIGXCPU, (r.status, r.returncode)


# Grows in 8 MiB steps to 384 MiB, saying where it stopped: above a 256 MiB address-space limit it cannot get.
_GROW = ("xs = []\ntry:\n    for _ in range(48):\n        xs.append(bytearray(8 * 2**20))\n"
         "except MemoryError:\n    print('stopped at', len(xs) * 8, flush=True)\n    raise\n"
         "print('allocated', len(xs) * 8)\n")


def test_memory_bomb_fails():
    limits = resource.getrlimit(resource.RLIMIT_AS)
    # one allocation above the limit (1 GiB: a host without the limit would grant it)
    r = run_program("x = bytearray(2**30)\nprint(len(x))\n", SandboxConfig(max_memory_mb=512, timeout=30))
    assert r.status == "failed" and "MemoryError" in r.stderr and r.stdout == "", (r.status, r.stderr[-300:])
    # growth in steps: the program gets an ordinary MemoryError below the limit and is not killed by a timeout
    # or a signal; what it held when it stopped is below the limit
    r = run_program(_GROW, SandboxConfig(max_memory_mb=256, timeout=30))
    assert r.status == "failed" and r.returncode == 1 and "MemoryError" in r.stderr, (r.status, r.stderr[-300:])
    assert "allocated" not in r.stdout and 0 < int(r.stdout.split("stopped at")[1]) < 256, r.stdout
    # control: the same program with room for it runs to its end, so the limit is what stopped it above
    r = run_program(_GROW, SandboxConfig(max_memory_mb=1024, timeout=30))
    assert r.passed and r.stdout.strip() == "allocated 384", (r.status, r.stderr[-300:])
    # the limit was the program's: the evaluator's own is as it was
    assert resource.getrlimit(resource.RLIMIT_AS) == limits


@needs_strong
def test_fork_bomb_is_contained():
    prog = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run_program(prog, SandboxConfig(timeout=2.0, max_procs=16))
    assert not r.passed and r.status in ("timeout", "failed")
    assert _no_sandbox_processes()
    # Nothing of the run is left under this process (a machine-wide pid count is noise on a shared host).
    assert [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE] == []


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
    prog += "print('written', ok)\nraise SystemExit(1)\n"  # never 'passes'
    r = run_program(prog, SandboxConfig(timeout=20))
    assert r.status == "failed", (r.status, r.stderr[-300:])
    # The writes into /tmp, /var/tmp and /dev/shm did happen (they landed in the private working directory).
    assert int(r.stdout.split("written")[-1]) >= 3, r.stdout
    for t in targets:
        assert not os.path.exists(t), t


def test_file_size_limit():
    r = run_program("open('big', 'wb').write(b'x' * (64 * 1024**2))\n", SandboxConfig(max_file_mb=1))
    assert not r.passed


def test_huge_output_is_capped():
    # The flood is stopped by the file-size limit on the captured stdout (EFBIG: Python ignores SIGXFSZ),
    # not by the wall timeout (that would be status "timeout"); the result keeps only a tail.
    r = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                    SandboxConfig(timeout=30, max_file_mb=2))
    assert r.status == "failed" and "File too large" in r.stderr, (r.status, r.stderr[-300:])
    assert r.stdout == "x" * SandboxConfig().output_chars


# Connects to a server of the test process on 127.0.0.1 and says whether it got through.
_CONNECT = ("import socket\ntry:\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
            "    s.sendall(b'hello')\n    s.close()\n    print('connected')\nexcept OSError as e:\n"
            "    print('refused', e.errno)\n")


@contextlib.contextmanager
def _loopback_server():
    """(port, messages received) of a TCP server on 127.0.0.1 that accepts until the block ends."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.1)
    got: list[bytes] = []
    stop = threading.Event()

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                if stop.is_set():  # the last connections are accepted before it ends
                    return
                continue
            with conn:
                conn.settimeout(5)
                got.append(conn.recv(16))

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        yield srv.getsockname()[1], got
    finally:
        stop.set()
        th.join(timeout=30)
        srv.close()


def _probe_network(runner) -> tuple[str, list[bytes]]:
    """What ``runner(program)`` printed and what the server got, for a program connecting to the loopback."""
    with _loopback_server() as (port, got):
        out = runner(_CONNECT.format(port=port))
    return out.strip(), got


def _plain(prog: str) -> str:
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60).stdout


def _sandboxed(prog: str) -> str:
    r = run_program(prog, FAST)
    assert r.status == "passed", (r.status, r.stderr[-300:])  # it ran to its end, having caught the refusal
    return r.stdout


@needs_strong
def test_network_is_unreachable_even_on_the_loopback():
    # Offline hosts refuse the internet anyway; a server of this process on 127.0.0.1 is there on any host.
    out, got = _probe_network(_sandboxed)
    assert out.startswith("refused") and got == [], (out, got)
    # control: the same program outside the sandbox reaches it, so the refusal above is the sandbox's
    out, got = _probe_network(_plain)
    assert out == "connected" and got == [b"hello"], (out, got)


@needs_strong
def test_network_probe_sees_a_sandbox_without_its_network_namespace(monkeypatch):
    # A broken launcher that unshares no network namespace (and believes it did) is caught by the probe above.
    monkeypatch.setattr(sandbox, "NS_FLAGS", {**sandbox.NS_FLAGS, "NEWNET": 0})
    r = run_program("pass\n", FAST)
    assert r.passed and r.isolation["net"] == "namespace"  # the launcher's own report is fooled
    out, got = _probe_network(_sandboxed)
    assert out == "connected" and got == [b"hello"], (out, got)


_ENV_PROBE = ("import os\nwhere = []\n"
              "if 'hunter2-secret' in repr(dict(os.environ)):\n    where.append('environ')\n"
              "try:\n    if b'hunter2-secret' in open(f'/proc/{os.getppid()}/environ', 'rb').read():\n"
              "        where.append('parent')\nexcept OSError:\n    pass\nprint('FOUND:' + ','.join(where))\n")

_ENV_HELPER = """
import json, subprocess, sys
from pkt.evaluate.sandbox import SandboxConfig, run_program
prog = sys.argv[1]
r = run_program(prog, SandboxConfig(timeout=5))
plain = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True)
print(json.dumps({"sandbox": [r.status, r.stdout], "plain": plain.stdout}))
"""


def test_environment_secrets_are_not_visible():
    # The secret must be in the evaluator's real environment (/proc/<pid>/environ shows the environment the
    # process was started with, not later setenv calls), so the evaluator is a fresh process started with it.
    # The same probe run without the sandbox finds it both ways: a leak would be seen.
    import json
    import subprocess
    import sys

    env = {**os.environ, "PKT_TEST_SECRET_TOKEN": "hunter2-secret"}
    out = subprocess.run([sys.executable, "-c", _ENV_HELPER, _ENV_PROBE], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["plain"].strip() == "FOUND:environ,parent"
    assert got["sandbox"] == ["passed", "FOUND:\n"]


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


def test_workdir_removed_and_fresh(monkeypatch):
    made = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*a, **k):
        made.append(real_mkdtemp(*a, **k))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    r = run_program("import os\nopen('marker', 'w').write('1')\nprint(os.getcwd(), sorted(os.listdir('.')))\n")
    assert r.passed and "marker" in r.stdout
    r2 = run_program("import os\nassert 'marker' not in os.listdir('.')\n")
    assert r2.passed
    # the working and log directories of both runs (two each) are gone
    assert len(made) == 4 and not [d for d in made if os.path.exists(d)], made


# --- verdicts that cannot be forged by ending the program early --------------------------------------------

FORGED = {
    "raise SystemExit": "raise SystemExit\nassert False\n",
    "SystemExit(0) in a function body": "def f(x):\n    raise SystemExit(0)\n\nassert f(1) == 2\n",
    "sys.exit(0) before the asserts": "import sys\nsys.exit(0)\nassert 1 == 2\n",
    "sys.exit(1)": "import sys\nsys.exit(1)\n",
    "exit()": "exit()\nassert False\n",
    "os._exit(0)": "import os\nos._exit(0)\nassert 1 == 2\n",
    "unittest.main(), 0 tests": 'import unittest\nif __name__ == "__main__":\n    unittest.main()\nassert False\n',
    "unittest.main() after passing tests": ("import unittest\nclass T(unittest.TestCase):\n"
                                            "    def test_ok(self):\n        self.assertEqual(1, 1)\n"
                                            "unittest.main()\nassert False\n"),
    "SIGKILL itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "SIGTERM itself": "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n",
    "exception in an atexit handler": ("import atexit\ndef bad():\n    raise AssertionError('late check')\n"
                                       "atexit.register(bad)\n"),
    "SystemExit in an atexit handler": "import atexit, sys\natexit.register(sys.exit, 0)\n",
    "os._exit(0) in an atexit handler": "import atexit, os\natexit.register(os._exit, 0)\n",
    "closes every inherited fd": "import os\nos.closerange(3, 1024)\n",
    "closes the fds, opens files on them": ("import os\nos.closerange(3, 1024)\n"
                                            "fs = [open(f'f{i}', 'w') for i in range(20)]\n"),
    "writes to every fd then ends": ("import os\nfor fd in range(3, 1024):\n    try:\n"
                                     "        os.write(fd, b'ready {}\\nstart\\nok')\n    except OSError:\n"
                                     "        pass\n"),
    "prints and writes a guessed token": ("import os, secrets\nt = secrets.token_hex(16)\nprint(t)\n"
                                          "for fd in range(3, 1024):\n    try:\n        os.write(fd, t.encode())\n"
                                          "    except OSError:\n        pass\nos._exit(0)\n"),
}


@pytest.mark.parametrize("name", list(FORGED))
def test_forged_exit_fails(name):
    r = run_program(FORGED[name], FAST)
    assert not r.passed and r.status == "failed", (name, r.status, r.stderr[-300:])


def test_programs_that_finish_still_pass():
    # The oracle side of the forged-exit tests: the same constructs, when the checks do complete, pass.
    progs = [
        'import unittest\nclass T(unittest.TestCase):\n    def test_ok(self):\n        self.assertEqual(1, 1)\n'
        'r = unittest.main(exit=False)\nassert r.result.wasSuccessful() and r.result.testsRun == 1\n',
        "import atexit\nseen = []\natexit.register(seen.append, 1)\nassert True\n",
        'if __name__ == "__main__":\n    print("main")\nelse:\n    raise AssertionError(__name__)\n',
        "try:\n    raise SystemExit(3)\nexcept SystemExit:\n    pass\n",
        "import sys\nassert sys.argv == ['prog.py'], sys.argv\n",
    ]
    rs = run_programs(progs, FAST)
    assert [r.status for r in rs] == ["passed"] * len(progs), [r.stderr[-300:] for r in rs]
    assert "main" in rs[2].stdout


def test_forged_exit_reasons_are_reported():
    r = run_program("import sys\nsys.exit(0)\n", FAST)
    assert r.returncode == 1 and "SystemExit(0)" in r.stderr
    r = run_program(FORGED["exception in an atexit handler"], FAST)
    assert "atexit" in r.stderr and "late check" in r.stderr


# --- isolation fails closed ---------------------------------------------------------------------------------

def test_missing_required_isolation_means_error_and_the_program_never_runs(monkeypatch):
    # An invalid clone flag makes every unshare() fail (EINVAL), so no network namespace can be made.
    monkeypatch.setattr(sandbox, "NS_FLAGS", {**sandbox.NS_FLAGS, "NEWNET": 0x80000000})
    prog = "print('RAN')\n"
    r = run_program(prog, SandboxConfig(timeout=5, require={"net": "namespace"}))
    assert r.status == "error" and not r.passed and "RAN" not in r.stdout and "setup failed" in r.stderr
    # The default requirement is what isolation() found: here a network namespace, if it found one.
    r = run_program(prog, SandboxConfig(timeout=5))
    if ISO.get("net") == "namespace":
        assert r.status == "error" and "RAN" not in r.stdout
    else:
        assert r.status == "passed" and "RAN" in r.stdout


def test_setup_step_that_raises_means_error_and_the_program_never_runs():
    # RLIMIT_NOFILE above the kernel's nr_open cannot be set, not even by root.
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    r = run_program("print('RAN')\n", SandboxConfig(timeout=5, max_open_files=nr_open + 1))
    assert r.status == "error" and "RAN" not in r.stdout and "setup failed" in r.stderr


def test_required_isolation_follows_settings():
    strong = {k: v for k, v in ISO.items() if v in ("namespace", "dedicated-uid")}
    assert sandbox.required_isolation(SandboxConfig()) == strong
    assert sandbox.required_isolation(SandboxConfig(namespaces=False)) == {
        k: v for k, v in strong.items() if k == "user"}
    assert sandbox.required_isolation(SandboxConfig(require=None)) == {}


def test_default_limits_fit_beside_the_evaluator():
    # Worst case the programs can hold at once, in GiB; docs/evaluation.md budgets 4 GiB next to the
    # evaluator on a 24 GB machine.
    c = SandboxConfig()
    assert sandbox.DEFAULT_WORKERS * c.max_procs * c.max_memory_mb / 1024 <= 4


@needs_strong
def test_process_limit_is_enforced():
    prog = ("import os\nn = 0\ntry:\n    for _ in range(10):\n        if os.fork() == 0:\n"
            "            import time; time.sleep(5); os._exit(0)\n        n += 1\nexcept OSError:\n    pass\n"
            "print('forked', n)\n")
    r = run_program(prog, SandboxConfig(timeout=8, max_procs=3))
    assert r.passed and "forked 2" in r.stdout, r.stderr  # 3 processes of the uid: itself and 2 children
