"""``pkt run --executor ray``: the stages of a study as Ray tasks over the one stage store.

The sequential executor (the default) walks the study in one process. The Ray executor first asks the
study for the stages a run would compute, exactly as the plan of ``pkt run --dry-run`` does
(:meth:`pkt.experiment.runner.Study.plan_stages` against a dry cache), but keeps, for each stage that is
not cached, the function that computes it (:func:`stage_graph`). A stage depends on the stages it reads, as
its method declares them (:attr:`pkt.methods.base.Method.reads`: a Seeking build reads its task's
extraction, SeqKD the teacher's answers, laten-lora its seed's LaTen build); an evaluation reads the build
it evaluates; the analysis comes after every other stage. Each stage becomes
one Ray task that computes it through a :class:`~pkt.experiment.cache.StageCache` on the same directory
(the same keys, the same atomic stage directories), with the resources its kind asks for in the config
(``resources:``; CPU only when no GPU is requested). When every stage is in the store, the study's
ordinary walk runs in the driver: it finds each stage cached, so the results, the report and the manifest
are made by the same code as a sequential run.

The driver holds the output directory's runner lock for the whole run; a task writes only after checking
that the lock is held by the driver that submitted it (:class:`StageCache` ``worker=True``). A task whose
worker dies (killed, out of memory, node lost) is retried by Ray up to ``stage_retries`` times; a stage
that raises stops new submissions, the stages already running finish and are recorded, and the run fails
with the stage's one-line error. Re-running the command resumes from the store.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pkt import methods
from pkt.errors import PktError
from pkt.experiment.cache import LOCK_NAME, StageCache, StageRecord
from pkt.stage import ANALYSIS, BUILD, EVAL, Stage, build

# what a worker must see as the driver does (data, prepared models, offline switches)
FORWARDED_ENV = ("PKT_DATA_DIR", "PKT_HOME", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")


def stage_kind(stage: Stage) -> str:
    """The resource kind of a stage (a key of the config's ``resources:``): its method's for a build, else
    its own kind (eval, analysis, extract, kd-data)."""
    return methods.get(stage.method).resource if stage.kind == BUILD else stage.kind


def stage_reads(stage: Stage) -> list[Stage]:
    """The stages ``stage`` reads: what its method declares for a build, the evaluated build for an
    evaluation of a built model, nothing for a shared stage (the analysis reads every stage before it)."""
    if stage.kind == BUILD:
        return methods.get(stage.method).read_stages(stage.task, stage.seed, methods.SHARED)
    if stage.kind == EVAL and not methods.is_vanilla(stage.method):
        return [build(stage.method, stage.task, stage.seed)]
    return []


@dataclass
class StageNode:
    """One stage to compute: the stage, its directory, key, the function that fills it, and what it waits for."""

    stage: Stage
    path: Path
    key: dict
    fn: Callable[[Path], dict]
    deps: list[str] = field(default_factory=list)  # directory names of stages that must finish first

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def kind(self) -> str:
        return stage_kind(self.stage)


@dataclass
class _Collector(StageCache):
    """A dry cache that also keeps, per stage directory, what is needed to compute the stage elsewhere."""

    nodes: dict = field(default_factory=dict)

    def run(self, stage, key_payload, fn):
        path, result = super().run(stage, key_payload, fn)
        self.nodes.setdefault(path.name, StageNode(stage, path, key_payload, fn))
        return path, result


def stage_graph(study) -> list[StageNode]:
    """The stages a run of ``study`` would compute (the plan's non-cached ones), in the sequential order,
    each with its dependencies among them."""
    real = study.cache
    study.cache = _Collector(real.root, log=real.log)
    try:
        collected, records = study.cache.nodes, study.plan_stages()
    finally:
        study.cache = real
    nodes: list[StageNode] = []
    for r in records:
        if not r.cached and r.key not in {n.id for n in nodes}:
            nodes.append(collected[r.key])
    for i, node in enumerate(nodes):
        if node.stage.kind == ANALYSIS:  # after every evaluation, as in the sequential order
            node.deps = [n.id for n in nodes if n is not node]
            continue
        reads = set(stage_reads(node.stage))
        node.deps = [n.id for n in nodes[:i] if n.stage in reads]
    return nodes


def _check_lock(root: Path, holder: str) -> None:
    """Refuse to write unless the run that submitted this task still holds the output directory."""
    lock = Path(root) / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        raise PktError(f"output directory {root}: no runner lock ({LOCK_NAME}); stages are written only "
                       "under the run that holds it") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            free = True
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            free = False
        pid = os.pread(fd, 64, 0).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if free or pid != holder:
        raise PktError(f"output directory {root} is no longer held by the run that started this stage "
                       f"(pid {holder}); re-run pkt run to resume")


def compute_stage(root: str, holder: str, code: dict, stage: Stage, key: dict, fn, threads: int) -> StageRecord:
    """Body of one Ray task: compute (or find cached) one stage in the store, as the sequential walk would."""
    import torch

    from pkt.experiment.fingerprint import code_identity
    from pkt.seeding import seed_everything

    _check_lock(Path(root), holder)
    # the stage's key names the driver's pkt source; a node with other source (another install, or files
    # edited during the run) would store different code's output under it
    here = code_identity.__wrapped__()
    if here != code:
        raise PktError(f"stage {stage}: pkt's source on this node ({here['pkt']}, {here['source']}) differs from "
                       f"the driver's ({code['pkt']}, {code['source']}); install the same pkt on every node and "
                       "re-run")
    torch.set_num_threads(threads)
    # accelerate's process state, which a sequential run has from its first training stage on (its trackers
    # log through it); a worker may start with any stage
    from pkt.dist import dist_state

    dist_state()
    if stage.seed is not None:  # the sequential walk seeds every RNG with a per-seed stage's seed first
        seed_everything(stage.seed)
    cache = StageCache(Path(root), log=lambda s: print(s, flush=True), worker=True)
    try:
        cache.run(stage, key, fn)
    except PktError as e:
        raise PktError(f"stage {stage}: {e}") from None
    return cache.records[-1]


class RayExecutor:
    """Runs a study's stages as Ray tasks; use as a context manager around :meth:`Study.run`.

    ``address``: a running cluster (``ray start --head`` / ``ray.init(address=...)``); None connects to
    ``RAY_ADDRESS`` if set, else starts a local instance. A Ray instance already started in this process
    (e.g. by a test) is used as it is and left running.
    """

    def __init__(self, address: str | None = None, log: Callable[[str], None] = print):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise PktError("--executor ray: Ray is not installed; pip install 'pkt[ray]'") from None
        self.address, self.log = address, log
        self._started = False

    def __enter__(self):
        import ray

        if not ray.is_initialized():
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            try:
                ray.init(address=self.address, include_dashboard=False, runtime_env={"env_vars": env},
                         logging_level="WARNING")
            except (ConnectionError, ValueError, RuntimeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise PktError(f"--address {self.address or 'auto'}: cannot connect to Ray ({first})") from None
            self._started = True
        return self

    def __exit__(self, *exc):
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
        return False

    # ---- resources -----------------------------------------------------------------------------
    @staticmethod
    def options(cfg, kind: str) -> dict:
        """Ray task options of a stage kind: the config's request, CPU only when it asks for no GPU."""
        r = cfg.resources_for(kind)
        opts = {"num_cpus": r.cpus, "num_gpus": r.gpus, "max_retries": cfg.stage_retries,
                "retry_exceptions": False}
        if r.memory_gb:
            opts["memory"] = int(r.memory_gb * 2**30)
        return opts

    def _check_fits(self, cfg, kinds: set[str]) -> None:
        """Each stage kind's request fits on some node of the cluster (else it would wait forever)."""
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        for kind in sorted(kinds):
            o = self.options(cfg, kind)
            need = {"CPU": o["num_cpus"], "GPU": o["num_gpus"], "memory": o.get("memory", 0)}
            if not any(all(res.get(k, 0) >= v for k, v in need.items() if v) for res in nodes):
                have = ", ".join(f"{res.get('CPU', 0):g} CPU/{res.get('GPU', 0):g} GPU/"
                                 f"{res.get('memory', 0) / 2**30:.0f} GiB" for res in nodes) or "none"
                raise PktError(f"resources.{kind}: no node of the Ray cluster has {need['CPU']:g} CPU, "
                               f"{need['GPU']:g} GPU, {need['memory'] / 2**30:.0f} GiB memory (nodes: {have})")

    # ---- the run -------------------------------------------------------------------------------
    def graph(self, study) -> list[StageNode]:
        return stage_graph(study)

    def run_stages(self, study) -> list[StageRecord]:
        """Compute every stage the study still needs into its store (the caller holds the lock)."""
        import ray

        nodes = self.graph(study)
        if not nodes:
            return []
        cfg = study.cfg
        self._check_fits(cfg, {n.kind for n in nodes})
        remote = ray.remote(compute_stage)
        import torch

        from pkt.experiment.fingerprint import code_identity

        root, holder, code = str(study.cache.root), str(os.getpid()), code_identity()
        pending = {n.id: n for n in nodes}
        done: set[str] = set()
        running: dict = {}
        records: list[StageRecord] = []
        failure: tuple[StageNode, BaseException] | None = None
        while True:
            if failure is None:
                for n in [n for n in pending.values() if all(d in done for d in n.deps)]:
                    o = self.options(cfg, n.kind)
                    threads = cfg.resources_for(n.kind).threads or torch.get_num_threads()
                    running[remote.options(**o).remote(root, holder, code, n.stage, n.key, n.fn, threads)] = n
                    del pending[n.id]
                    study.echo(f"[ray]    {n.name} submitted ({o['num_cpus']:g} CPU, {o['num_gpus']:g} GPU)")
            if not running:
                break
            (ref,), _ = ray.wait(list(running), num_returns=1)
            node = running.pop(ref)
            try:
                rec = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a stage's failure: kept until the running ones are done
                failure = failure or (node, e)
                continue
            finally:
                # a killed attempt leaves its temporary directory behind; the stage is settled now
                for tmp in study.cache.stages.glob(f".{node.id}.tmp*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            records.append(rec)
            done.add(node.id)
            study.echo(f"[ray]    {node.name} {'cached' if rec.cached else 'done'} in {rec.seconds:.1f} s "
                       f"({len(done)}/{len(nodes)})")
            if node.stage.kind == EVAL and node.key["settings"].get("precision"):
                study._prune(node.key["settings"]["model"])  # as the sequential walk does after an evaluation
        if failure is not None:
            raise _one_line(*failure, retries=cfg.stage_retries)
        if pending:
            raise RuntimeError(f"stages never became ready: {sorted(pending)}")
        return records


def _one_line(node: StageNode, e: BaseException, retries: int) -> BaseException:
    """The run's error for a failed stage: the stage's own one line, or how its workers died."""
    import ray.exceptions as rx

    cause = getattr(e, "cause", None) if isinstance(e, rx.RayTaskError) else e
    if isinstance(cause, PktError):
        return PktError(str(cause))
    if isinstance(e, (rx.WorkerCrashedError, rx.OutOfMemoryError, rx.NodeDiedError, rx.TaskUnschedulableError)):
        return PktError(f"stage {node.name}: its worker died {retries + 1} time(s) ({type(e).__name__}); the "
                        "finished stages are in the store, re-run to resume")
    return cause if isinstance(cause, BaseException) else e
