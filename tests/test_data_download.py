"""Downloads against a real HTTP server on 127.0.0.1 serving ../shared/data (no internet)."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile

import pytest

from _data_helpers import assert_clean_failure, http_server, run_cli
from dist_lm.data.prepare import prepare_corpus
from dist_lm.errors import UserError


def test_ptb_is_downloaded_verified_and_prepared(shared_data, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    with http_server(shared_data) as url:
        monkeypatch.setenv("DIST_LM_MIRROR", url)
        out = prepare_corpus("ptb", out=tmp_path / "ptb", data_dir=data_dir, quiet=True)
    for s in ("train", "valid", "test"):
        got = (data_dir / "ptb" / f"ptb.{s}.txt").read_bytes()
        assert got == (shared_data / "ptb" / f"ptb.{s}.txt").read_bytes()
    assert sorted(p.name for p in (data_dir / "ptb").iterdir()) == \
        ["ptb.test.txt", "ptb.train.txt", "ptb.valid.txt"]  # no .part files left
    assert json.loads((out / "manifest.json").read_text())["splits"]["valid"]["tokens"] == 73_760


def test_corrupted_download_is_refused(shared_data, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(shared_data / "ptb", served / "ptb")
    bad = served / "ptb" / "ptb.valid.txt"
    bad.chmod(0o644)
    data = bytearray(bad.read_bytes())
    data[1234] ^= 0x20
    bad.write_bytes(bytes(data))
    data_dir = tmp_path / "data"
    with http_server(served) as url:
        res = run_cli("prepare", "ptb", "--data_dir", str(data_dir), "--out", str(tmp_path / "o"),
                      env={"DIST_LM_MIRROR": url})
    assert_clean_failure(res, "checksum mismatch", f"{url}/ptb/ptb.valid.txt", "sha256")
    assert not (data_dir / "ptb" / "ptb.valid.txt").exists()
    assert not list((data_dir / "ptb").glob("*.part"))
    assert not (tmp_path / "o").exists()


def test_ptb_char_archive_is_extracted_and_members_verified(shared_data, tmp_path, monkeypatch):
    served = tmp_path / "served" / "ptb-char"
    served.mkdir(parents=True)
    with tarfile.open(served / "simple-examples.tgz", "w:gz", compresslevel=1) as tf:
        for s in ("train", "valid", "test"):
            tf.add(shared_data / "ptb-char" / f"ptb.char.{s}.txt",
                   arcname=f"./simple-examples/data/ptb.char.{s}.txt")
    data_dir = tmp_path / "data"
    (data_dir / "ptb-char").mkdir(parents=True)
    shutil.copy(shared_data / "ptb-char" / "ptb.char.train.txt", data_dir / "ptb-char")
    with http_server(tmp_path / "served") as url:
        monkeypatch.setenv("DIST_LM_MIRROR", url)
        prepare_corpus("ptb-char", out=tmp_path / "pc", data_dir=data_dir, quiet=True)
    # only the missing members were extracted; the archive itself is removed
    assert sorted(p.name for p in (data_dir / "ptb-char").iterdir()) == \
        ["ptb.char.test.txt", "ptb.char.train.txt", "ptb.char.valid.txt"]
    assert (data_dir / "ptb-char" / "ptb.char.test.txt").read_bytes() == \
        (shared_data / "ptb-char" / "ptb.char.test.txt").read_bytes()


def test_wrong_archive_and_missing_url_are_refused(shared_data, tmp_path):
    served = tmp_path / "served" / "wikitext-2"
    served.mkdir(parents=True)
    with zipfile.ZipFile(served / "wikitext-2-v1.zip", "w") as zf:  # not the official zip
        for s in ("valid", "test"):
            zf.write(shared_data / "wikitext-2" / f"wiki.{s}.tokens", f"wikitext-2/wiki.{s}.tokens")
        zf.writestr("wikitext-2/wiki.train.tokens", " a b c \n")
    data_dir = tmp_path / "data"
    with http_server(tmp_path / "served") as url:
        with pytest.raises(UserError, match="checksum mismatch.*md5"):
            prepare_corpus("wikitext-2", out=tmp_path / "w", data_dir=data_dir, mirror=url)
        with pytest.raises(UserError, match="download of .*text8.zip failed.*404"):
            prepare_corpus("text8", out=tmp_path / "t", data_dir=data_dir, mirror=url)
    assert not any(p.is_file() for p in data_dir.rglob("*"))
    assert not (tmp_path / "w").exists() and not (tmp_path / "t").exists()
