"""What the tests of the record-backed studies (`pkt study pilot`, `steps-saved`, `laten-dose`) share: a tiny
study's config file, the tiny Qwen2 pair saved as model directories, the bytes of a records directory, and its
report re-derived from a copy of the records alone (the guarantee every committed study rests on)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml


def config_file(path: Path, data: dict) -> str:
    """``data`` written to ``path`` as a study's YAML config; its path."""
    path.write_text(yaml.safe_dump(data))
    return str(path)


def saved_pair(qwen_pair, tmp_path: Path) -> tuple[str, str]:
    """(teacher, student) directories of the tiny Qwen2 pair, saved under ``tmp_path``."""
    from pkt.testing import save_tiny

    teacher, student, tok = qwen_pair
    return save_tiny(teacher, tok, tmp_path / "teacher"), save_tiny(student, tok, tmp_path / "student")


def tree(root: Path) -> dict:
    """Every file under ``root`` by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rederived(pkt_cli, study: str, report, records: Path, copy: Path, config: str) -> dict:
    """The :func:`tree` of ``copy``: the records of ``records`` alone, copied elsewhere without the report and its
    figure, which ``pkt study <study> CONFIG --report`` then rebuilds (``config``: a config whose records are
    ``copy``; ``report``: the study's report module)."""
    shutil.copytree(records, copy)
    (copy / report.REPORT).unlink()
    (copy / report.PLOT).unlink()
    code, _, err = pkt_cli("study", study, config, "--report")
    assert code == 0, err
    return tree(copy)
