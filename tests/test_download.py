"""kdray.download against a local http.server on 127.0.0.1 serving a tiny zip the test builds (no internet)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from kdray.data import download
from kdray.config import DataConfig
from kdray.data.prepare import prepare
from kdray.data.download import MARKER, download_movielens
from kdray.errors import DataError

U_DATA = "".join(f"{u}\t{i}\t{1 + (u + i) % 5}\t{880000000 + 7 * u + i}\n" for u in range(1, 6) for i in range(1, 7))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www on an ephemeral port; yields the base URL; stops the thread afterwards."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def tiny_zip(path: Path, top: str = "ml-100k/") -> str:
    """A MovieLens-like archive (one top folder holding u.data); returns its sha256."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}u.data", U_DATA)
        zf.writestr(f"{top}README", "tiny test archive")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_unpacks_verifies_and_caches(server, tmp_path):
    url, root = server
    digest = tiny_zip(root / "ml-100k.zip")
    cache = tmp_path / "cache"
    path = download_movielens("ml-100k", cache, url=f"{url}/ml-100k.zip", checksum=f"sha256:{digest}")
    assert path == cache / "ml-100k" and (path / "u.data").read_text() == U_DATA and (path / MARKER).is_file()
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k"]  # no temporary files left
    (root / "ml-100k.zip").unlink()  # a second call must not need the server
    assert download_movielens("ml-100k", cache, url=f"{url}/ml-100k.zip", checksum=f"sha256:{digest}") == path


def test_files_at_the_root_and_md5_or_no_checksum(server, tmp_path):
    url, root = server
    tiny_zip(root / "flat.zip", top="")
    md5 = hashlib.md5((root / "flat.zip").read_bytes()).hexdigest()
    path = download_movielens("ml-1m", tmp_path / "a", url=f"{url}/flat.zip", checksum=md5)
    assert path == tmp_path / "a" / "ml-1m" and (path / "u.data").is_file()
    path = download_movielens("ml-10m", tmp_path / "b", url=f"{url}/flat.zip", checksum=None)
    assert path.name == "ml-10M100K" and (path / "u.data").is_file()


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    url, root = server
    tiny_zip(root / "ml-100k.zip")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"ml-100k.zip: sha256 checksum mismatch: expected 0{64}, got [0-9a-f]{64}"):
        download_movielens("ml-100k", cache, url=f"{url}/ml-100k.zip", checksum="sha256:" + "0" * 64)
    # the default verifies GroupLens' official MD5, which the tiny archive does not have
    with pytest.raises(DataError, match=r"md5 checksum mismatch: expected 0e33842e24a9c977be4e0107933c0723"):
        download_movielens("ml-100k", cache, url=f"{url}/ml-100k.zip")
    assert list(cache.iterdir()) == []


def test_http_404_and_other_failures(server, tmp_path):
    url, root = server
    with pytest.raises(DataError, match=r"downloading http://127.0.0.1:\d+/missing.zip failed: HTTP 404"):
        download_movielens("ml-100k", tmp_path / "c", url=f"{url}/missing.zip", checksum=None)
    (root / "bad.zip").write_bytes(b"this is not a zip")
    with pytest.raises(DataError, match=r"bad.zip: the file is not a zip archive"):
        download_movielens("ml-100k", tmp_path / "c", url=f"{url}/bad.zip", checksum=None)
    with pytest.raises(DataError, match=r"unknown MovieLens archive 'ml-5m'; known: ml-100k, ml-1m"):
        download_movielens("ml-5m", tmp_path / "c")
    with pytest.raises(DataError, match=r"checksum 'md5:xyz': expected 'md5:<32 hex digits>'"):
        download_movielens("ml-100k", tmp_path / "c", url=f"{url}/bad.zip", checksum="md5:xyz")
    assert list((tmp_path / "c").iterdir()) == []


def test_prepare_downloads_when_the_path_is_missing(server, tmp_path, monkeypatch):
    url, root = server
    tiny_zip(root / "ml-100k.zip")
    md5 = hashlib.md5((root / "ml-100k.zip").read_bytes()).hexdigest()
    cfg = DataConfig(source="ml-100k", download=True, cache_dir=str(tmp_path / "cache"),
                     url=f"{url}/ml-100k.zip", side_features=False)
    with pytest.raises(DataError, match="checksum mismatch"):  # data.url is a mirror: the official MD5 applies
        prepare(cfg, tmp_path / "data")
    monkeypatch.setitem(download.MOVIELENS, "ml-100k", download.Archive(f"{url}/ml-100k.zip", md5, "ml-100k"))
    data = prepare(cfg, tmp_path / "data")
    assert data.n_users == 5 and data.n_items == 6
    assert data.train.nnz + data.valid.nnz + data.test.nnz == 30
