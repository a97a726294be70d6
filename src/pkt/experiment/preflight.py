"""Checks that ``pkt run`` makes before any stage, so a study that cannot succeed fails in seconds.

Each failed check raises one :class:`~pkt.errors.PktError` line (the CLI exits with status 2):

1. every model resolves: an embedded name whose chunk packages are installed, a local directory holding
   a causal-LM config and weights, or a hub id reachable (or cached) from here;
2. tokenizers are identical where a method needs it (LaTen, on-policy distillation and the analysis
   compare or move token-indexed quantities);
3. the teacher is at least as large as the student in every dimension a parametric transfer reads:
   layers and every projection's (out, in) shape (hidden size, FFN width, query and key/value widths),
   read from the models' configs on the ``meta`` device, without loading a weight;
4. the code sandbox's isolation holds when a code task is selected (or ``allow_weak_sandbox``);
5. the disk holds what the plan writes (see :mod:`pkt.experiment.plan`; the estimate is printed).

Model facts come from ``model.config``. In a plan (``pkt run --dry-run``) a hub model that is not
reachable offline may use the config snapshot shipped in ``configs/model-configs/`` (noted in the plan);
a real run never does.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pkt.errors import ModelError, PktError

CODE_TASKS = ("humaneval", "mbpp")
SNAPSHOTS = Path(__file__).resolve().parents[3] / "configs" / "model-configs"


def transfers(method: str) -> bool:
    """Methods that move teacher weights into the student (and their controls)."""
    return method.startswith(("seeking", "laten"))


def needs_same_tokenizer(method: str) -> bool:
    return method.startswith(("laten", "gkd"))


@dataclass
class ModelFacts:
    ref: str
    source: str  # embedded | dir | hub | snapshot
    config: object = None
    params: int | None = None
    spec: object = None
    notes: list[str] = field(default_factory=list)
    path: str | None = None  # where from_pretrained finds config + tokenizer, when known
    tokenizer: object = None  # loaded by the tokenizer check, reused by the plan


def _snapshot(ref: str) -> Path:
    return SNAPSHOTS / (ref.replace("/", "--") + ".json")


def _causal_lm_config(where: str, ref: str):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        cfg = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise ModelError(f"model {ref!r}: no usable config ({str(e).splitlines()[0]})") from None
    archs = getattr(cfg, "architectures", None) or []
    causal = [a for a in archs if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (archs and not causal):
        what = f"{'/'.join(archs)} ({cfg.model_type})" if archs else repr(cfg.model_type)
        raise ModelError(f"model {ref!r}: {what} is not a causal language model")
    return cfg


def model_facts(ref: str, plan: bool = False) -> ModelFacts:
    """Resolve a model reference far enough to read its config, without loading (or preparing) weights."""
    from pkt.models.load import cache_dir, is_prepared
    from pkt.models.registry import EMBEDDED

    ref = str(ref)
    if ref in EMBEDDED:
        facts = ModelFacts(ref, "embedded")
        if not is_prepared(ref) and not plan:
            from pkt.models.load import prepare

            prepare(ref)  # the first stage needs it anyway; the config check needs its config now
        if is_prepared(ref):
            facts.path = str(cache_dir(ref))
            facts.config = _causal_lm_config(facts.path, ref)
        else:
            EMBEDDED[ref].chunk_paths()  # raises if a chunk package is missing
            facts.notes.append(f"{ref} is not prepared yet: the first stage prepares it (~1-2 min, once)")
    elif Path(ref).expanduser().is_dir():
        path = Path(ref).expanduser()
        facts = ModelFacts(ref, "dir", path=str(path))
        if not (path / "config.json").is_file():
            raise ModelError(f"model {ref!r}: directory has no config.json")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ModelError(f"model {ref!r}: directory has no weights (*.safetensors or *.bin)")
        facts.config = _causal_lm_config(str(path), ref)
    else:
        from pkt.models.load import resolve

        resolve(ref)  # the shape of a hub id, or a clear error
        facts = ModelFacts(ref, "hub", path=ref)
        try:
            facts.config = _causal_lm_config(ref, ref)
        except ModelError as e:
            snap = _snapshot(ref)
            if not (plan and snap.is_file()):
                raise ModelError(f"model {ref!r}: not a local directory and not reachable on the hub from here "
                                 f"(offline, gated or misspelt?): {e}") from None
            from transformers import AutoConfig

            facts.source, facts.path = "snapshot", None
            facts.config = AutoConfig.for_model(**{k: v for k, v in _read_json(snap).items() if k != "_source"})
            facts.notes.append(f"{ref}: not reachable offline; the plan uses {snap.relative_to(SNAPSHOTS.parents[1])}")
    return facts


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def meta_facts(facts: ModelFacts) -> ModelFacts:
    """Fill ``params`` and ``spec`` (for the plan) from the config, once: from the safetensors headers and the
    config when the weights are local (milliseconds), else by building the model on the meta device."""
    if facts.config is not None and facts.params is None:
        fast = _local_facts(facts)
        facts.params, facts.spec = fast if fast is not None else _meta_facts(facts.config, facts.ref)
    return facts


def safetensors_params(directory: str | Path) -> int | None:
    """Number of parameters stored in a directory's *.safetensors files, read from their JSON headers only
    (tied weights are stored once, as ``model.parameters()`` counts them); None if a header is unreadable."""
    import json
    import math
    import struct

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return None
    return total


def _local_facts(facts: ModelFacts):
    """(parameter count, :class:`~pkt.models.arch.ConfigDims`) from the safetensors headers and the config,
    or None when the weights are not local or the family is not one pkt reads."""
    from pkt.models.arch import FAMILIES, ConfigDims

    if not facts.path or not Path(facts.path).is_dir() or facts.config.model_type not in FAMILIES:
        return None
    params = safetensors_params(facts.path)
    if params is None:
        return None
    return params, ConfigDims.from_config(facts.config)


def _meta_facts(config, ref: str):
    """(parameter count, ArchSpec) of the model a config describes, built on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from pkt.models.arch import ArchSpec

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a meta-device build is not a model the user will run: no advice
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    finally:
        hf_logging.set_verbosity(level)
    params = sum(p.numel() for p in model.parameters())
    try:
        spec = ArchSpec.from_model(model)
    except ModelError:
        spec = None  # an architecture pkt cannot transfer: fine for teacher/student rows, checked below
    return params, spec


def check_dimensions(teacher: ModelFacts, student: ModelFacts, methods: list[str]) -> None:
    from pkt.models.arch import FAMILIES, LINEAR_KINDS, ConfigDims

    moving = [m for m in methods if transfers(m)]
    if not moving or teacher.config is None or student.config is None:
        return
    for f in (teacher, student):
        if f.config.model_type not in FAMILIES:
            raise ModelError(f"model {f.ref!r}: architecture {f.config.model_type!r} is not supported by "
                             f"{', '.join(moving)} (supported: {', '.join(FAMILIES)})")
    t, s = ConfigDims.from_config(teacher.config), ConfigDims.from_config(student.config)
    small = []
    if t.num_layers < s.num_layers:
        small.append(f"layers {t.num_layers} < {s.num_layers}")
    for kind in LINEAR_KINDS:
        ts, ss = t.weight_shape(kind), s.weight_shape(kind)
        if ts[0] < ss[0] or ts[1] < ss[1]:
            small.append(f"{kind}_proj {ts[0]}x{ts[1]} < {ss[0]}x{ss[1]}")
    if small:
        raise PktError(f"teacher {teacher.ref!r} is smaller than student {student.ref!r} in {'; '.join(small)}: "
                       f"{', '.join(moving)} move teacher weights into the student and need the teacher at least "
                       "as large in every transferred dimension")


def check_tokenizers(teacher: ModelFacts, student: ModelFacts, methods: list[str], analysis: bool) -> None:
    need = [m for m in methods if needs_same_tokenizer(m)] + (["analysis"] if analysis else [])
    if not need or teacher.path is None or student.path is None:
        return
    from transformers import AutoTokenizer

    from pkt.models.load import assert_same_tokenizer

    if _same_tokenizer_files(teacher.path, student.path):
        # byte-identical tokenizer files make identical tokenizers: load the student's (the plan counts tokens
        # with it), skip the comparison (seconds for a 150k-token vocabulary)
        try:
            student.tokenizer = AutoTokenizer.from_pretrained(student.path)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load the tokenizer of {student.ref!r}: {str(e).splitlines()[0]}") from None
        return
    va, vb = _file_vocab(teacher.path), _file_vocab(student.path)
    if va is not None and vb is not None and va != vb:
        # different vocabularies: known from tokenizer.json alone, without building two tokenizers (seconds)
        only_a, only_b = len(set(va) - set(vb)), len(set(vb) - set(va))
        moved = sum(1 for k in set(va) & set(vb) if va[k] != vb[k])
        raise PktError(f"{', '.join(need)}: teacher and student tokenizers differ: vocab sizes {len(va)} vs "
                       f"{len(vb)}, {only_a}/{only_b} tokens only in one, {moved} with different ids; "
                       "this stage needs identical vocabularies")
    try:
        a, b = AutoTokenizer.from_pretrained(teacher.path), AutoTokenizer.from_pretrained(student.path)
        teacher.tokenizer, student.tokenizer = a, b
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizers of {teacher.ref!r} / {student.ref!r}: "
                         f"{str(e).splitlines()[0]}") from None
    try:
        assert_same_tokenizer(a, b)
    except PktError as e:
        raise PktError(f"{', '.join(need)}: {e}") from None


# what determines the vocabulary, the special tokens and the encodings (a chat template does not: the embedded
# 0.5B and 1.5B differ only there)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def _same_tokenizer_files(a: str, b: str) -> bool:
    """True when both directories hold a tokenizer.json and the same bytes in every tokenizer file."""
    pa, pb = Path(a), Path(b)
    if not (pa.is_dir() and pb.is_dir() and (pa / "tokenizer.json").is_file()):
        return False
    for name in TOKENIZER_FILES:
        fa, fb = pa / name, pb / name
        if fa.is_file() != fb.is_file():
            return False
        if fa.is_file() and (fa.stat().st_size != fb.stat().st_size or fa.read_bytes() != fb.read_bytes()):
            return False
    return True


def _file_vocab(path: str) -> dict | None:
    """{token: id} of a fast tokenizer's tokenizer.json (BPE/WordPiece vocab or Unigram list, plus added
    tokens), or None when there is no such file (then the tokenizers are loaded and compared)."""
    import json

    f = Path(path) / "tokenizer.json" if path and Path(path).is_dir() else None
    if f is None or not f.is_file():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        vocab = dict(vocab) if isinstance(vocab, dict) else {tok: i for i, (tok, _) in enumerate(vocab)}
        vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
        return vocab
    except (ValueError, KeyError, TypeError):
        return None


def check_sandbox(tasks: list[str], allow_weak: bool) -> dict | None:
    code = [t for t in tasks if t in CODE_TASKS]
    if not code:
        return None
    from pkt.evaluate import sandbox

    iso = sandbox.isolation()
    strong = iso.get("net") == "namespace" and iso.get("fs") == "namespace" and iso.get("user") != "self"
    if not strong and not allow_weak:
        raise PktError(f"{', '.join(code)} run generated code, but the sandbox isolation is incomplete here "
                       f"({iso}); run as root or with user namespaces, or set allow_weak_sandbox: true")
    return iso


def free_bytes(out: Path) -> int:
    p = Path(out).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_disk(out: Path, need: int) -> int:
    free = free_bytes(out)
    if free < need:
        raise PktError(f"disk: {out} has {free / 1e9:.1f} GB free, the plan writes up to {need / 1e9:.1f} GB "
                       "(free space, shrink the study, or choose another --out)")
    return free


def check_models(cfg, plan: bool = False) -> tuple[ModelFacts, ModelFacts]:
    """Checks 1-3: resolve both models, then tokenizers and dimensions."""
    teacher, student = model_facts(cfg.teacher, plan), model_facts(cfg.student, plan)
    check_dimensions(teacher, student, list(cfg.methods))
    check_tokenizers(teacher, student, list(cfg.methods), cfg.analysis)
    return teacher, student
