"""The two trusted programs the code sandbox (:mod:`pkt.evaluate.sandbox`) starts, as source text: the launcher,
which sets up namespaces, limits and the unprivileged uid before the untrusted program exists, and the runner,
which executes the program and alone can write the completion token. Kept apart from the orchestration so each
reads on its own; they are run with ``python -I -S -c``, so they import nothing of pkt.
"""

# The launcher is trusted code that runs before the program exists: every line it writes to the channel is
# authentic. It exits 3 without starting the program when the setup falls short of ``require``.
LAUNCHER = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
chan = cfg["channel_fd"]
def refuse(why):
    os.write(chan, ("setup-failed " + json.dumps(why) + "\n").encode())
    os._exit(3)
try:
    work = cfg["workdir"]
    libc = ctypes.CDLL(None, use_errno=True)
    NEWNS, NEWNET, NEWUSER = (cfg["ns_flags"][k] for k in ("NEWNS", "NEWNET", "NEWUSER"))
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
        net = "prelude"
    for name, value in cfg["rlimits"].items():
        soft, hard = value if isinstance(value, list) else (value, value)
        resource.setrlimit(getattr(resource, name), (soft, hard))
    user = "self"
    if root and cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
        user = "dedicated-uid"
    got = {"net": net, "fs": fs, "user": user}
    short = {k: v for k, v in cfg["require"].items() if got.get(k) != v}
    if short:
        refuse({"required": cfg["require"], "got": got})
    env = dict(cfg["env"])
    if fs == "namespace":
        os.chdir("/tmp")
    else:
        env["HOME"] = env["TMPDIR"] = work
    # The token reaches the runner through a pipe that is drained and closed before the program starts:
    # it is never in an argument, the environment or a file the program could read.
    r, w = os.pipe()
    os.write(w, cfg["token"].encode())
    os.close(w)
    os.set_inheritable(r, True)
    os.write(chan, ("ready " + json.dumps(got) + "\n").encode())
except Exception as e:
    refuse({"error": f"{type(e).__name__}: {e}"})
os.execve(cfg["python"], [cfg["python"], "-I", "-c", cfg["runner"], str(chan), str(r), str(int(net == "prelude"))],
          env)
"""

# Runs in the program's own interpreter (any Python >= 3.8: it may be the system python3). It execs the
# program inside try/except BaseException and writes the token only after exec returned and the atexit
# handlers ran without an exception, so exiting early in any way (SystemExit, os._exit, a signal,
# unittest.main()) leaves no token. The program can write to the channel too, but not the token, and the
# evaluator accepts only the exact expected bytes.
RUNNER = r"""
import os, sys
def _pkt_run():
    import atexit, builtins, traceback, types
    write, exit_ = os.write, os._exit
    chan, token_fd, prelude = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    token = b""
    while True:
        part = os.read(token_fd, 256)
        if not part:
            break
        token += part
    os.close(token_fd)
    write(chan, b"start\n")
    def fail(why):
        try:
            sys.stdout.flush()
        except BaseException:
            pass
        try:
            write(2, ("pkt-sandbox: " + why + "\n").encode("utf-8", "replace"))
        except BaseException:
            pass
        exit_(1)
    def trace(exc_type, exc, tb):
        try:
            write(2, "".join(traceback.format_exception(exc_type, exc, tb)).encode("utf-8", "replace"))
        except BaseException:
            pass
    del sys.argv[1:]
    sys.argv[0] = "prog.py"
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__="prog.py", __builtins__=builtins)
    sys.modules["__main__"] = main
    if prelude:
        exec(__PKT_PRELUDE__, {"__builtins__": builtins})
    try:
        with open("prog.py", "rb") as f:
            code = compile(f.read(), "prog.py", "exec")
        exec(code, main.__dict__)
    except SystemExit as e:
        trace(type(e), e, e.__traceback__.tb_next)
        fail("SystemExit(%r) before the checks finished: not passed" % (e.code,))
    except BaseException as e:
        trace(type(e), e, e.__traceback__.tb_next)
        fail("the program raised " + type(e).__name__)
    errors = []
    def unraisable(u):
        errors.append(u)
        trace(u.exc_type, u.exc_value, u.exc_traceback)
    sys.unraisablehook = unraisable
    try:
        atexit._run_exitfuncs()
    except BaseException as e:
        errors.append(e)
    if errors:
        fail("an exception in an atexit handler: not passed")
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass
    write(chan, token)
    exit_(0)
_pkt_run()
"""

# Used only when no network namespace could be created (weak, bypassable: documented).
NET_PRELUDE = """import socket as _s
def _pkt_blocked(*a, **k):
    raise OSError("network disabled by the pkt sandbox")
for _n in ("connect", "connect_ex", "bind", "sendto", "listen"):
    setattr(_s.socket, _n, _pkt_blocked)
_s.create_connection = _pkt_blocked; _s.getaddrinfo = _pkt_blocked
del _s, _n
"""
RUNNER = RUNNER.replace("__PKT_PRELUDE__", repr(NET_PRELUDE))
