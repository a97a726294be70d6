"""Run untrusted generated Python programs in a locked-down subprocess.

One program = one fresh process tree, started through a tiny launcher (``python -I -S -c LAUNCHER``) so no
``preexec_fn`` is needed (safe with the thread pool). The launcher, before ``exec``-ing the program:

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

The evaluator waits with a wall-clock timeout, then ``killpg``'s the process group and, when a dedicated uid
was used, SIGKILLs every remaining process of that uid (children that called ``setsid`` to escape the group).
The working directory is removed afterwards. Every failure mode (timeout, crash, limit, setup error, even an
exception in the evaluator-side code) becomes a result with ``passed=False``; nothing propagates.

**Not covered** (see docs/evaluation.md): reading world-readable files (source trees, ``/etc/passwd``),
seeing other processes in ``/proc`` (no PID namespace), total memory across a fork tree (limits are per
process: up to ``max_procs x max_memory_mb``), CPU contention, and kernel exploits. Without root or user
namespaces the isolation degrades to rlimits + process group + the socket prelude; ``isolation()`` reports
what is in effect.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

UID_BASE = 61000
UID_COUNT = 64
TMP_DIRS = ("/var/tmp", "/dev/shm", "/run/lock", "/tmp")  # /tmp last: the workdir usually lives under it

_LAUNCHER = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
work = cfg["workdir"]
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWNET, NEWUSER = 0x00020000, 0x40000000, 0x10000000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
net = fs = "none"
root = os.geteuid() == 0
def unshare(flags):
    return libc.unshare(flags) == 0
if cfg["namespaces"]:
    if root:
        if unshare(NEWNS | NEWNET):
            net = fs = "namespace"
        elif unshare(NEWNET):
            net = "namespace"
    else:
        uid, gid = os.getuid(), os.getgid()
        if unshare(NEWUSER | NEWNS | NEWNET):
            try:
                open("/proc/self/setgroups", "w").write("deny")
            except OSError:
                pass
            open("/proc/self/uid_map", "w").write(f"{uid} {uid} 1")
            open("/proc/self/gid_map", "w").write(f"{gid} {gid} 1")
            net = fs = "namespace"
os.chdir(work)
if fs == "namespace":
    ok = libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0
    src = f"/proc/self/fd/{os.open(work, os.O_RDONLY | os.O_DIRECTORY)}".encode()
    for d in cfg["tmp_dirs"]:
        if os.path.isdir(d) and not os.path.islink(d):
            ok = ok and libc.mount(src, d.encode(), None, MS_BIND | MS_REC, None) == 0
    if not ok:
        fs = "partial"
if net == "none":
    with open("prog.py", "r+", encoding="utf-8") as f:
        body = f.read(); f.seek(0); f.write(cfg["net_prelude"] + body)
for name, value in cfg["rlimits"].items():
    soft, hard = value if isinstance(value, list) else (value, value)
    resource.setrlimit(getattr(resource, name), (soft, hard))
user = "self"
if root and cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
    user = "dedicated-uid"
if cfg["report"]:
    sys.stderr.write("PKT-SANDBOX " + json.dumps({"net": net, "fs": fs, "user": user}) + "\n")
    sys.stderr.flush()
env = dict(cfg["env"])
if fs == "namespace":
    os.chdir("/tmp")
else:
    env["HOME"] = env["TMPDIR"] = work
os.execve(cfg["python"], [cfg["python"], "-I", "prog.py"], env)
"""

# Used only when no network namespace could be created (weak, bypassable: documented).
_NET_PRELUDE = """import socket as _s
def _pkt_blocked(*a, **k):
    raise OSError("network disabled by the pkt sandbox")
for _n in ("connect", "connect_ex", "bind", "sendto", "listen"):
    setattr(_s.socket, _n, _pkt_blocked)
_s.create_connection = _pkt_blocked; _s.getaddrinfo = _pkt_blocked
del _s, _n
"""


@dataclass
class SandboxConfig:
    timeout: float = 10.0  # wall seconds
    cpu_seconds: int | None = None  # default: ceil(timeout) + 1
    max_memory_mb: int = 1024  # RLIMIT_AS per process
    max_file_mb: int = 16  # RLIMIT_FSIZE (also caps captured output)
    max_procs: int = 16  # RLIMIT_NPROC (processes + threads of the uid)
    max_open_files: int = 256
    namespaces: bool = True  # network + mount namespaces when possible
    drop_privileges: bool = True  # as root: run as a dedicated unprivileged uid
    output_chars: int = 2000  # tail of stdout/stderr kept in the result
    python: str | None = None  # interpreter for the program; default: see program_python()


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

    def acquire(self, wait: float = 60.0) -> tuple[int, int] | None:
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                for uid in range(self.base, self.base + self.count):
                    if uid in self._held:
                        continue
                    fd = os.open(f"/tmp/.pkt-sandbox-uid-{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        os.close(fd)
                        continue
                    self._held[uid] = fd
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


def _uid_processes(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    import psutil

    pids = []
    for p in psutil.process_iter(["uids", "status"]):
        try:
            if p.info["uids"] and p.info["uids"].real == uid and p.info["status"] != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


def _kill_uid(uid: int, deadline_s: float = 10.0) -> None:
    """SIGKILL every process owned by ``uid``; repeat until none is left (a fork bomb spawns while we sweep).
    Zombies are ignored: they hold no resources and are reaped by init."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        pids = _uid_processes(uid)
        if not pids:
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


def _run(program: str, cfg: SandboxConfig, report: bool) -> ExecResult:
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
    try:
        with open(os.path.join(workdir, "prog.py"), "w", encoding="utf-8") as f:
            f.write(program)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "prog.py"), uid, uid)
            os.chmod(workdir, 0o700)
        cpu = cfg.cpu_seconds if cfg.cpu_seconds is not None else int(cfg.timeout) + 1
        mib = 1024 * 1024
        launcher_cfg = {
            "workdir": workdir,
            "namespaces": cfg.namespaces,
            "tmp_dirs": list(TMP_DIRS),
            "net_prelude": _NET_PRELUDE,
            "uid": uid,
            "python": cfg.python or program_python(cfg.drop_privileges),
            "report": report,
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
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(launcher_cfg)],
                cwd=workdir, env=_env(workdir), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
            )
            status = None
            try:
                rc = proc.wait(timeout=cfg.timeout)
            except subprocess.TimeoutExpired:
                status, rc = "timeout", None
        stdout, stderr = _tail(out_path, cfg.output_chars), _tail(err_path, cfg.output_chars)
        isolation = {}
        if report and stderr.startswith("PKT-SANDBOX "):
            line, _, stderr = stderr.partition("\n")
            isolation = json.loads(line[len("PKT-SANDBOX "):])
        if status is None:
            status = "passed" if rc == 0 else "failed"
        return ExecResult(status == "passed", status, rc, time.monotonic() - t0, stdout, stderr, isolation)
    except Exception as e:  # noqa: BLE001 - the evaluation must survive anything
        return ExecResult(False, "error", None, time.monotonic() - t0, stderr=f"{type(e).__name__}: {e}")
    finally:
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


def run_program(program: str, config: SandboxConfig | None = None, report: bool = False) -> ExecResult:
    """Run one Python program in the sandbox; passed iff it exits 0 within the limits. Never raises."""
    try:
        return _run(program, config or SandboxConfig(), report)
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        return ExecResult(False, "error", None, 0.0, stderr=f"{type(e).__name__}: {e}")


def run_programs(programs: list[str], config: SandboxConfig | None = None, workers: int = 2,
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
    """What isolation is in effect here: {"net": namespace|prelude-less none, "fs": ..., "user": ...}."""
    global _ISOLATION
    if _ISOLATION is None:
        r = run_program("pass\n", config, report=True)
        _ISOLATION = dict(r.isolation) or {"error": r.stderr[-300:]}
        if _ISOLATION.get("net") == "none":
            _ISOLATION["net"] = "prelude"
    return dict(_ISOLATION)
