"""`pkt data prepare` / `verify`: real downloads from a local HTTP server (and file://), checksums, atomicity."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from pkt.data import prepare as P
from pkt.data.checksums import SHA256
from pkt.errors import DataError
from pkt.testing import invoke_cli

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def served(tmp_path):
    """(root URL, served directory): a layout copied from the test fixtures, served over HTTP by this test."""
    site = tmp_path / "site"
    (site / "gsm8k").mkdir(parents=True)
    shutil.copy(FIXTURES / "gsm8k_tiny.jsonl", site / "gsm8k" / "test.jsonl")
    shutil.copytree(FIXTURES / "pkt_splits_tiny", site / "pkt_splits")
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", site
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _sources(base: str, site: Path) -> list[P.Source]:
    files = sorted(p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file())
    return [P.Source(f, f"{base}/{f}", hashlib.sha256((site / f).read_bytes()).hexdigest()) for f in files]


def test_prepare_downloads_over_http_checks_and_records_sha256(served, tmp_path):
    base, site = served
    sources = _sources(base, site)
    out = tmp_path / "data"
    digests = P.prepare(out, sources, log=lambda m: None)
    assert len(digests) == len(sources) >= 4
    for src in sources:
        assert (out / src.path).read_bytes() == (site / src.path).read_bytes()
    # SHA256SUMS is `sha256sum -c` format with the digests of the served bytes
    lines = (out / P.SUMS).read_text().splitlines()
    expect = [f"{hashlib.sha256((site / s.path).read_bytes()).hexdigest()}  {s.path}"
              for s in sorted(sources, key=lambda s: s.path)]
    assert lines == expect
    assert P.verify(out) == digests


def test_prepared_directory_is_what_the_task_loaders_read(served, tmp_path, monkeypatch):
    from pkt.data.tasks import gsm8k_test, load_split

    base, site = served
    out = tmp_path / "data"
    P.prepare(out, _sources(base, site), log=lambda m: None)
    monkeypatch.setenv("PKT_DATA_DIR", str(out))
    n_lines = sum(1 for line in (site / "pkt_splits" / "gsm" / "align.jsonl").open() if line.strip())
    assert len(load_split("gsm8k", "align")) == n_lines
    assert len(gsm8k_test()) == sum(1 for line in (site / "gsm8k" / "test.jsonl").open() if line.strip())


def test_file_urls_work(tmp_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    (src_dir / "a.jsonl").write_bytes(b'{"x": 1}\n')
    digest = hashlib.sha256(b'{"x": 1}\n').hexdigest()
    out = tmp_path / "data"
    P.prepare(out, [P.Source("gsm8k/test.jsonl", (src_dir / "a.jsonl").as_uri(), digest)], log=lambda m: None)
    assert (out / "gsm8k" / "test.jsonl").read_bytes() == b'{"x": 1}\n'


def test_checksum_mismatch_fails_and_leaves_nothing(served, tmp_path):
    base, site = served
    sources = _sources(base, site)
    sources[-1] = P.Source(sources[-1].path, sources[-1].url, "0" * 64)
    out = tmp_path / "data"
    with pytest.raises(DataError, match=sources[-1].path.replace(".", r"\.") + ": sha256 of .* expected 0{64}"):
        P.prepare(out, sources, log=lambda m: None)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["site"]  # no temporary sibling left behind


def test_http_error_names_the_url(served, tmp_path):
    base, _ = served
    with pytest.raises(DataError, match=f"{base}/nope.jsonl: download failed"):
        P.prepare(tmp_path / "data", [P.Source("gsm8k/test.jsonl", f"{base}/nope.jsonl", None)], log=lambda m: None)
    assert not (tmp_path / "data").exists()


def test_verify_is_offline_and_names_the_bad_file(served, tmp_path):
    base, site = served
    out = tmp_path / "data"
    P.prepare(out, _sources(base, site), log=lambda m: None)
    target = out / "pkt_splits" / "gsm" / "align.jsonl"
    target.write_text(target.read_text() + "\n ")
    with pytest.raises(DataError, match=r"gsm/align\.jsonl: sha256 differs"):
        P.verify(out)
    (out / "gsm8k" / "test.jsonl").unlink()
    with pytest.raises(DataError, match=r"missing.*\(and 1 more\)|differs.*\(and 1 more\)"):
        P.verify(out)


def test_existing_prepared_dir_is_not_downloaded_again(served, tmp_path):
    base, site = served
    sources = _sources(base, site)
    out = tmp_path / "data"
    first = P.prepare(out, sources, log=lambda m: None)
    dead = [P.Source(s.path, "http://127.0.0.1:9/unreachable", s.sha256) for s in sources]
    assert P.prepare(out, dead, log=lambda m: None) == first


def test_foreign_directory_needs_force(served, tmp_path):
    base, site = served
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="--force"):
        P.prepare(out, _sources(base, site), log=lambda m: None)
    assert (out / "mine.txt").read_text() == "keep me"
    P.prepare(out, _sources(base, site), force=True, log=lambda m: None)
    assert not (out / "mine.txt").exists() and (out / P.SUMS).is_file()


def test_default_sources_cover_the_layout_the_loaders_read():
    from pkt.data.tasks import SPLITS, SPLITS_URL, TASKS

    paths = {s.path: s for s in P.default_sources()}
    for t in TASKS.values():
        for split in SPLITS:
            src = paths[f"pkt_splits/{t.split_dir}/{split}.jsonl"]
            # the same file the loaders read online when PKT_DATA_DIR is unset
            assert src.url == SPLITS_URL.format(d=t.split_dir, s=split)
    for split in ("dev", "test"):
        assert len([p for p in paths if p.startswith(f"mmlu/{split}/") and p.endswith(f"_{split}.csv")]) == 57
    assert {"gsm8k/test.jsonl", "mbpp/mbpp.jsonl", "mbpp/sanitized-mbpp.json"} <= set(paths)
    assert all(s.url.startswith("https://") and len(s.sha256) == 64 for s in paths.values())


def test_recorded_checksums_match_the_shared_data_directory(shared_data):
    """The recorded digests are those of the files the study runs on (docs/data.md §1-2), offline."""
    for rel, digest in SHA256.items():
        assert P.sha256_file(shared_data / rel) == digest, rel


def test_cli_verify(served, tmp_path):
    import subprocess
    import sys

    base, site = served
    out = tmp_path / "data"
    P.prepare(out, _sources(base, site), log=lambda m: None)
    ok = invoke_cli(["data", "verify", out])
    assert ok.exit_code == 0, ok.output
    assert f"{len(_sources(base, site))} files" in ok.output
    (out / "gsm8k" / "test.jsonl").write_text("changed\n")
    bad = subprocess.run([sys.executable, "-m", "pkt.cli", "data", "verify", str(out)], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "gsm8k/test.jsonl: sha256 differs" in lines[0], bad.stderr
