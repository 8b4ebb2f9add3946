"""Fetches the public MovieLens archives from GroupLens into a local cache, verified and unpacked.

Only the standard library (urllib, hashlib, zipfile). A download is verified against the MD5 that GroupLens
publishes next to each archive (``ml-100k.zip.md5`` ...) before anything is unpacked, and appears in the cache
atomically: it is unpacked into a temporary folder and renamed into place, so an interrupted download never leaves a
half-written data set that a later run would trust. Every failure (HTTP error, unreachable host, checksum mismatch,
not a zip) raises :class:`~kdray.errors.DataError` naming the URL and what went wrong.

Example::

    path = download_movielens("ml-100k", Path("~/.cache/kdray").expanduser())   # -> ~/.cache/kdray/ml-100k
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kdray.errors import DataError

BASE_URL = "https://files.grouplens.org/datasets/movielens"
MARKER = ".kdray-download.json"  # written last into an unpacked archive: its presence means "complete"
OFFICIAL = "official"


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str  # GroupLens' published checksum of the zip
    folder: str  # the folder the zip unpacks to


MOVIELENS: dict[str, Archive] = {
    "ml-100k": Archive(f"{BASE_URL}/ml-100k.zip", "0e33842e24a9c977be4e0107933c0723", "ml-100k"),
    "ml-1m": Archive(f"{BASE_URL}/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", "ml-1m"),
    "ml-10m": Archive(f"{BASE_URL}/ml-10m.zip", "ce571fd55effeba0271552578f2648bd", "ml-10M100K"),
    "ml-20m": Archive(f"{BASE_URL}/ml-20m.zip", "cd245b17a1ae2cc31bb14903e1204af3", "ml-20m"),
    "ml-25m": Archive(f"{BASE_URL}/ml-25m.zip", "6b51fb2759a8657d3bfcbfc42b592ada", "ml-25m"),
}


def _parse_checksum(checksum: str) -> tuple[str, str]:
    """``"md5:<hex>"``, ``"sha256:<hex>"`` or a bare hex digest (32 digits = MD5, 64 = SHA-256)."""
    algo, _, digest = checksum.rpartition(":")
    digest = digest.strip().lower()
    algo = algo.lower() or {32: "md5", 64: "sha256"}.get(len(digest), "")
    if algo not in ("md5", "sha256") or len(digest) != {"md5": 32, "sha256": 64}[algo]:
        raise DataError(f"checksum {checksum!r}: expected 'md5:<32 hex digits>' or 'sha256:<64 hex digits>'")
    return algo, digest


def _fetch(url: str, dest: Path, algo: str, timeout: float) -> str:
    """Streams ``url`` into ``dest``; returns the hex digest of what was written."""
    digest = hashlib.new(algo)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, dest.open("wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except urllib.error.HTTPError as e:
        raise DataError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DataError(f"downloading {url} failed: {e.reason} (is the host reachable? data.url overrides the URL)") \
            from None
    except OSError as e:  # timeouts, connection resets, a full disk
        raise DataError(f"downloading {url} failed: {e}") from None
    return digest.hexdigest()


def download_movielens(name: str, cache_dir: Path, url: str | None = None, *, checksum: str | None = OFFICIAL,
                       timeout: float = 60.0) -> Path:
    """Downloads and unpacks a MovieLens archive; returns the folder holding its files (``cache_dir/ml-100k`` ...).

    A complete earlier download in ``cache_dir`` is reused without touching the network. ``url`` overrides the
    GroupLens address (a mirror, a test server). ``checksum``: ``"official"`` verifies GroupLens' MD5 of that
    archive (right for mirrors too); ``"md5:<hex>"`` / ``"sha256:<hex>"`` verifies another digest (an archive you
    built); ``None`` skips verification explicitly.
    """
    if name not in MOVIELENS:
        raise DataError(f"unknown MovieLens archive {name!r}; known: {', '.join(MOVIELENS)}")
    archive = MOVIELENS[name]
    url = url or archive.url
    expected = _parse_checksum(f"md5:{archive.md5}" if checksum == OFFICIAL else checksum) if checksum else None
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / archive.folder
    if (final / MARKER).is_file():
        return final

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        zip_path = tmp / f"{name}.zip"
        algo = expected[0] if expected else "sha256"
        got = _fetch(url, zip_path, algo, timeout)
        if expected and got != expected[1]:
            raise DataError(f"downloading {url}: {algo} checksum mismatch: expected {expected[1]}, got {got} "
                            "(a corrupt or different archive; nothing was unpacked)")
        unpacked = tmp / "unpacked"
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(unpacked)  # ZipFile.extract strips absolute paths and '..' (no escape from tmp)
        except zipfile.BadZipFile:
            raise DataError(f"downloading {url}: the file is not a zip archive") from None
        entries = list(unpacked.iterdir())
        # GroupLens zips hold one top folder (ml-100k/...); an archive with the files at its root is accepted too
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else unpacked
        (root / MARKER).write_text(json.dumps({"name": name, "url": url, algo: got}))
        try:
            os.rename(root, final)
        except OSError:
            if not (final / MARKER).is_file():  # not a concurrent download of the same archive that won the race
                shutil.rmtree(final, ignore_errors=True)
                os.rename(root, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
