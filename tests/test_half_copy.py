"""An embedded model loaded in half precision is read from its half-precision cache entry: the same weights as the
cast of the float32 cache, without holding the float32 file's pages during the load (pkt.models.load.half_copy)."""

from __future__ import annotations

import torch

from pkt.models import load as load_mod
from pkt.testing import save_tiny, tiny_model, tiny_tokenizer


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_half_copy_holds_exactly_the_cast_weights_and_is_made_once(tmp_path):
    tok = tiny_tokenizer()
    src = save_tiny(tiny_model("qwen2", "student", len(tok)), tok, tmp_path / "fp32")
    cast = _weights(load_mod.load_model(src, dtype="bfloat16"))  # a local directory: the float32 file, cast
    dst = load_mod.half_copy(src, tmp_path / "m@bfloat16", torch.bfloat16, log=lambda s: None)
    copy = load_mod.load_model(dst, dtype="bfloat16")
    got = _weights(copy)
    assert got.keys() == cast.keys()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, cast[k]) for k, v in got.items())
    stamp = (dst / "model.safetensors").stat().st_mtime_ns
    logs = []
    assert load_mod.half_copy(src, dst, torch.bfloat16, log=logs.append) == dst
    assert logs == [] and (dst / "model.safetensors").stat().st_mtime_ns == stamp  # made once


def test_a_half_copy_interrupted_before_its_marker_is_made_again(tmp_path):
    tok = tiny_tokenizer()
    src = save_tiny(tiny_model("qwen2", "student", len(tok)), tok, tmp_path / "fp32")
    dst = tmp_path / "m@bfloat16"
    dst.mkdir()
    (dst / "model.safetensors").write_bytes(b"half-written")  # no marker: not a usable entry
    load_mod.half_copy(src, dst, torch.bfloat16, log=lambda s: None)
    assert (dst / load_mod.MARKER).is_file()
    assert not list(tmp_path.glob(".m@bfloat16.tmp*"))  # nothing half-written left beside it
    load_mod.load_model(dst, dtype="bfloat16")  # loads


def test_load_model_reads_an_embedded_name_in_bf16_from_its_half_entry(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    src = save_tiny(tiny_model("qwen2", "student", len(tok)), tok, tmp_path / "fp32")
    monkeypatch.setenv("PKT_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(load_mod.EMBEDDED, "tiny-embedded", object())
    monkeypatch.setattr(load_mod, "prepare", lambda name, **kw: __import__("pathlib").Path(src))
    expected = _weights(load_mod.load_model(src, dtype="bfloat16"))
    model = load_mod.load_model("tiny-embedded", dtype="bfloat16")
    entry = load_mod.cache_dir("tiny-embedded@bfloat16")
    assert (entry / load_mod.MARKER).is_file()
    assert all(torch.equal(v, expected[k]) for k, v in _weights(model).items())
    fp32 = load_mod.load_model("tiny-embedded", dtype="float32")  # float32 reads the float32 entry itself
    assert next(fp32.parameters()).dtype == torch.float32
    assert not load_mod.cache_dir("tiny-embedded@float32").exists()


def test_writing_into_a_model_read_from_the_half_entry_leaves_the_entry_as_it_was(tmp_path):
    """The half entry is read in place (mapped): a method that changes a loaded model's weights in place (a
    fused delta) changes its own copy, never the file the next stage loads."""
    tok = tiny_tokenizer()
    src = save_tiny(tiny_model("qwen2", "student", len(tok)), tok, tmp_path / "fp32")
    dst = load_mod.half_copy(src, tmp_path / "m@bfloat16", torch.bfloat16, log=lambda s: None)
    before = (dst / "model.safetensors").read_bytes()
    model = load_mod.load_model(dst, dtype="bfloat16")
    w = next(p for n, p in model.named_parameters() if n.endswith("up_proj.weight"))
    expected = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    assert (dst / "model.safetensors").read_bytes() == before
    again = load_mod.load_model(dst, dtype="bfloat16")
    w2 = next(p for n, p in again.named_parameters() if n.endswith("up_proj.weight"))
    assert torch.equal(w2, expected)
