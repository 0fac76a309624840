"""Downloads against real HTTP servers on 127.0.0.1 serving ../shared/data (no internet)."""

from __future__ import annotations

import json
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from helpers.cli import assert_clean_failure, run_cli
from helpers.corpus import http_server
from dist_lm.data.corpora import PRESETS, USER_AGENT
from dist_lm.data.prepare import prepare_corpus
from dist_lm.errors import UserError

PTB = [f"ptb.{s}.txt" for s in ("train", "valid", "test")]


def _ptb_copy(shared_data: Path, root: Path, names=PTB, corrupt: str | None = None) -> Path:
    """root/ptb/ with copies of `names`; one byte of `corrupt` flipped. Returns root."""
    (root / "ptb").mkdir(parents=True)
    for n in names:
        data = bytearray((shared_data / "ptb" / n).read_bytes())
        if n == corrupt:
            data[1234] ^= 0x20
        (root / "ptb" / n).write_bytes(bytes(data))
    return root


def _simple_examples(shared_data: Path, root: Path, corrupt: str | None = None) -> Path:
    """root/ptb/simple-examples.tgz holding the PTB files where Mikolov's archive has them."""
    src = _ptb_copy(shared_data, root / "members", corrupt=corrupt) / "ptb"
    (root / "ptb").mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "ptb" / "simple-examples.tgz", "w:gz", compresslevel=1) as tf:
        for n in PTB:
            tf.add(src / n, arcname=f"./simple-examples/data/{n}")
    shutil.rmtree(root / "members")
    return root


def _same_as_shared(shared_data: Path, folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(PTB)  # no .part, no archive
    for n in PTB:
        assert (folder / n).read_bytes() == (shared_data / "ptb" / n).read_bytes(), n


def test_ptb_is_downloaded_verified_and_prepared(shared_data, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    log = []
    with http_server(shared_data, log=log) as url:
        # the server refuses Python's default agent (as wikitext.smerity.com does) ...
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(f"{url}/ptb/ptb.test.txt", timeout=10)
        monkeypatch.setenv("DIST_LM_MIRROR", url)
        out = prepare_corpus("ptb", out=tmp_path / "ptb", data_dir=data_dir, quiet=True)
    # ... and every download names itself
    assert USER_AGENT.startswith("dist-lm/") and "urllib" not in USER_AGENT
    assert sorted(log[1:]) == sorted((f"/ptb/{n}", 200, USER_AGENT) for n in PTB)
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
        with pytest.raises(UserError, match="text8.zip: download failed: HTTP 404"):
            prepare_corpus("text8", out=tmp_path / "t", data_dir=data_dir, mirror=url)
    assert not any(p.is_file() for p in data_dir.rglob("*"))
    assert not (tmp_path / "w").exists() and not (tmp_path / "t").exists()


def test_wikitext_comes_from_the_authors_host_checked_by_md5():
    for name in ("wikitext-2", "wikitext-103"):
        (remote,) = PRESETS[name].remotes
        assert remote.urls == (f"https://wikitext.smerity.com/{name}-v1.zip",)
        assert len(remote.check.md5) == 32


def test_a_refused_or_missing_source_falls_back_to_the_next(shared_data, tmp_path, capsys):
    a = _ptb_copy(shared_data, tmp_path / "a", names=["ptb.test.txt"])  # valid: 404
    log_a, log_b = [], []
    with http_server(a, log=log_a, forbid=("/ptb/ptb.train.txt",)) as url_a, \
            http_server(shared_data, log=log_b) as url_b:
        prepare_corpus("ptb", out=tmp_path / "o", data_dir=tmp_path / "data",
                       mirror=f"{url_a} {url_b}", quiet=True)
    _same_as_shared(shared_data, tmp_path / "data" / "ptb")
    assert [(p, c) for p, c, _ in log_a] == [("/ptb/ptb.train.txt", 403), ("/ptb/ptb.valid.txt", 404),
                                             ("/ptb/ptb.test.txt", 200)]
    assert [(p, c) for p, c, _ in log_b] == [("/ptb/ptb.train.txt", 200), ("/ptb/ptb.valid.txt", 200)]
    err = capsys.readouterr().err
    assert f"dist-lm: warning: {url_a}/ptb/ptb.train.txt: download failed: HTTP 403 Forbidden; " \
           f"trying {url_b}/ptb/ptb.train.txt" in err
    assert f"{url_a}/ptb/ptb.valid.txt: download failed: HTTP 404" in err
    assert f"fetched ptb.test.txt from {url_a}/ptb/ptb.test.txt" in err


def test_a_dropped_connection_falls_back_to_the_next_source(shared_data, tmp_path, capsys):
    with http_server(shared_data, cut=("/ptb/ptb.train.txt",)) as url_a, \
            http_server(shared_data) as url_b:
        prepare_corpus("ptb", out=tmp_path / "o", data_dir=tmp_path / "data",
                       mirror=f"{url_a} {url_b}", quiet=True)
    _same_as_shared(shared_data, tmp_path / "data" / "ptb")
    err = capsys.readouterr().err
    half = (shared_data / "ptb" / "ptb.train.txt").stat().st_size // 2
    assert f"dist-lm: warning: {url_a}/ptb/ptb.train.txt: download failed: connection closed " \
           f"after {half} of {2 * half} bytes" in err
    assert f"fetched ptb.train.txt from {url_b}/ptb/ptb.train.txt" in err


def test_a_checksum_mismatch_falls_back_to_the_next_source(shared_data, tmp_path, capsys):
    a = _ptb_copy(shared_data, tmp_path / "a", corrupt="ptb.valid.txt")
    log_b = []
    with http_server(a) as url_a, http_server(shared_data, log=log_b) as url_b:
        prepare_corpus("ptb", out=tmp_path / "o", data_dir=tmp_path / "data",
                       mirror=f"{url_a},{url_b}", quiet=True)
    _same_as_shared(shared_data, tmp_path / "data" / "ptb")
    assert [p for p, _, _ in log_b] == ["/ptb/ptb.valid.txt"]
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"dist-lm: warning: {url_a}/ptb/ptb.valid.txt: checksum mismatch")
    assert "sha256" in warnings[0] and warnings[0].endswith(f"trying {url_b}/ptb/ptb.valid.txt")


def test_the_archive_is_the_next_source_and_its_members_are_checked(shared_data, tmp_path, capsys):
    """No plain PTB file anywhere; the first simple-examples.tgz has a corrupt member, so none
    of its members is kept and all three come from the second one."""
    a = _simple_examples(shared_data, tmp_path / "a", corrupt="ptb.train.txt")
    b = _simple_examples(shared_data, tmp_path / "b")
    log_b = []
    with http_server(a) as url_a, http_server(b, log=log_b) as url_b:
        prepare_corpus("ptb", out=tmp_path / "o", data_dir=tmp_path / "data",
                       mirror=f"{url_a} {url_b}", quiet=True)
    _same_as_shared(shared_data, tmp_path / "data" / "ptb")
    assert [(p, c) for p, c, _ in log_b if c == 200] == [("/ptb/simple-examples.tgz", 200)]
    err = capsys.readouterr().err
    assert f"{url_a}/ptb/simple-examples.tgz: checksum mismatch for ptb.train.txt from " \
           f"simple-examples.tgz" in err
    assert f"fetched ptb.train.txt, ptb.valid.txt, ptb.test.txt from {url_b}/ptb/simple-examples.tgz" in err


def test_all_sources_failing_is_one_message_naming_each_and_the_local_layout(shared_data, tmp_path):
    b = tmp_path / "b" / "wikitext-103"
    b.mkdir(parents=True)
    with zipfile.ZipFile(b / "wikitext-103-v1.zip", "w") as zf:  # not the official zip
        zf.writestr("wikitext-103/wiki.train.tokens", " a b c \n")
    data_dir = tmp_path / "data"
    with http_server(tmp_path / "a", forbid=("/",)) as url_a, http_server(tmp_path / "b") as url_b:
        res = run_cli("prepare", "wikitext-103", "--data_dir", str(data_dir), "--out",
                      str(tmp_path / "o"), env={"DIST_LM_MIRROR": f"{url_a} {url_b}"})
    msg = assert_clean_failure(
        res, "cannot download wikitext-103", "every source failed: ",
        f"{url_a}/wikitext-103/wikitext-103-v1.zip: download failed: HTTP 403 Forbidden",
        f"{url_b}/wikitext-103/wikitext-103-v1.zip: checksum mismatch for wikitext-103-v1.zip (md5",
        "wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens in DIR/wikitext-103/",
        "--data_dir DIR")
    assert str(data_dir / "wikitext-103") in msg
    assert f"dist-lm: warning: {url_a}/wikitext-103/wikitext-103-v1.zip" in res.stderr
    assert not any(p.is_file() for p in data_dir.rglob("*"))
    assert not (tmp_path / "o").exists()
