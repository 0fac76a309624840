"""Bad inputs, one table: every case runs the real CLI (`python -m dist_lm ...`) and must end
with a non-zero exit, one line on stderr naming the problem and the fix, no traceback, and every
existing run, corpus and folder it was pointed at byte-identical (every file hashed before and
after; a file or folder the command created and left behind fails too).

File-system faults are made for real: a read-only folder is read-only for the CLI (run without
root's CAP_DAC_OVERRIDE when the tests run as root), a full disk is the file-size limit
(`prlimit --fsize`, as tests/train/test_faults.py), which fails writes with EFBIG exactly where a
full disk fails them with ENOSPC.

To add a case, append a Case to CASES: argv may name {run} (a trained run, shared: no case may
change it), {corpus} (its prepared corpus), {other} (another corpus, another vocabulary),
{toml} (the tiny recipe) and {tmp} (the case's own folder, built by setup, and the command's
working directory, so that a stray relative write shows in its tree).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from helpers.cli import REPO, cli_env, run_cli
from helpers.config import FAULT_TOML, OPTION_TOML
from helpers.corpus import small_corpus
from helpers.runs import one_thread  # noqa: F401  (autouse: tiny models, one thread)


# ---- how a case runs ----------------------------------------------------------------------

def no_bypass() -> list[str]:
    """A prefix that makes permission bits hold for the CLI: root keeps its uid (it can still
    read the tests' 0700 tmp dirs as their owner) but loses the capabilities that bypass them."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--inh-caps=-all",
            "--bounding-set=-dac_override,-dac_read_search", "--"]


def file_limit(nbytes: int) -> list[str]:
    """A prefix under which no file may grow past nbytes (a full disk, as a write sees it)."""
    return ["prlimit", f"--fsize={nbytes}", "--"]


def read_only(path: Path) -> None:
    """Take the write bits off path and everything under it."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o222)


def writable(path: Path) -> None:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod(stat.S_IMODE(p.stat().st_mode) | 0o200)


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256 (files) or 'dir' (folders)} of everything under root."""
    if not root.exists():
        return {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---- the cases ----------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    argv: list[str]  # after `python -m dist_lm`, with {run} {corpus} {other} {toml} {tmp}
    expect_in_stderr: list[str]  # the problem and the fix, each a substring of the one line
    setup: Callable[[dict], None] | None = None  # builds the case's folders in {tmp}
    prefix: list[str] = field(default_factory=list)  # no_bypass(), file_limit(n)
    env: dict[str, str | None] = field(default_factory=dict)  # set (None: unset) for the CLI


def train(*args: str) -> list[str]:
    return ["train", "{toml}", "--data.shards={corpus}", "--train.max_steps=2", *args]


def copy_run(read_only_too: bool):
    def setup(p):
        shutil.copytree(p["run"], p["tmp"] / "run")
        if read_only_too:
            read_only(p["tmp"] / "run")
    return setup


def copy_corpus(p):  # a copy: the session's corpus serves other test files too
    shutil.copytree(p["corpus"], p["tmp"] / "corpus")


def foreign_folder(p):
    mine = p["tmp"] / "mine"
    (mine / "wandb").mkdir(parents=True)
    (mine / "config.json").write_text('{"mine": 1}\n')
    (mine / "vocab.json").write_text('["a", "b"]\n')
    (mine / "wandb" / "notes.txt").write_text("my notes\n")


def a_file(p):
    (p["tmp"] / "afile").write_text("not a folder\n")


def read_only_parent(p):
    (p["tmp"] / "parent").mkdir()
    read_only(p["tmp"] / "parent")


def text_corpus(p):
    src = p["tmp"] / "src"
    src.mkdir()
    for split in ("train", "valid", "test"):
        (src / f"{split}.txt").write_text("the cat sat on the mat\n" * 400)


def text_corpus_read_only_out(p):
    text_corpus(p)
    read_only_parent(p)


def score_read_only_out(p):
    (p["tmp"] / "in.txt").write_text("the cat\n")
    read_only_parent(p)


RESUME_FIX = "Resume with the run's own values"
CASES = [
    # a resume that changes what the checkpoint cannot carry: refused before anything is written
    Case("resume-changed-hidden-size", train("--train.run_dir={run}", "--resume=auto",
                                             "--model.hidden_size=64"),
         ["model.hidden_size: checkpoint 24, now 64", "--model.hidden_size=24", RESUME_FIX]),
    Case("resume-changed-n-layers", train("--train.run_dir={run}", "--resume=auto",
                                          "--model.n_layers=3"),
         ["model.n_layers: checkpoint 2, now 3", "--model.n_layers=2", "--overwrite"]),
    Case("resume-changed-optimizer", train("--train.run_dir={run}", "--resume=auto",
                                           "--optim.name=adam"),
         ["optim.name: checkpoint momentum, now adam", "--optim.name=momentum"]),
    Case("resume-changed-corpus", ["train", "{toml}", "--data.shards={other}",
                                   "--train.run_dir={run}", "--resume=auto"],
         ["data.corpus: checkpoint text:", "--data.shards=", RESUME_FIX]),
    Case("resume-changed-global-batch", train("--train.run_dir={run}", "--resume=auto",
                                              "--train.global_batch=2"),
         ["train.global_batch: checkpoint 4, now 2", "--train.global_batch=4"]),
    Case("resume-other-run-into-new-dir", train("--train.run_dir={tmp}/new", "--resume={run}",
                                                "--model.emb_size=8"),
         ["model.emb_size: checkpoint 16, now 8", "--train.run_dir"]),
    # a fresh start never deletes what is not a run's to replace
    Case("fresh-start-into-a-run", train("--train.run_dir={run}"),
         ["already holds a run", "--resume auto", "--overwrite"]),
    Case("fresh-start-into-a-corpus", train("--train.run_dir={tmp}/corpus"),
         ["holds no dist-lm run (a prepared corpus)", "choose a new or empty folder"],
         setup=copy_corpus),
    Case("overwrite-into-a-corpus", train("--train.run_dir={tmp}/corpus", "--overwrite"),
         ["holds no dist-lm run (a prepared corpus)", "--overwrite only replaces"],
         setup=copy_corpus),
    Case("fresh-start-into-a-foreign-folder", train("--train.run_dir={tmp}/mine"),
         ["is not empty and holds no dist-lm run", "config.json", "--train.run_dir"],
         setup=foreign_folder),
    Case("resume-auto-into-a-foreign-folder", train("--train.run_dir={tmp}/mine",
                                                    "--resume=auto"),
         ["is not empty and holds no dist-lm run", "--train.run_dir"], setup=foreign_folder),
    # file-system errors: one line each
    Case("run-dir-is-a-file", train("--train.run_dir={tmp}/afile"),
         ["is a file, not a folder", "--train.run_dir"], setup=a_file),
    Case("resume-a-read-only-run", train("--train.run_dir={tmp}/run", "--resume=auto"),
         ["Permission denied", "choose a folder you can write"],
         setup=copy_run(read_only_too=True), prefix=no_bypass()),
    Case("run-dir-in-a-read-only-parent", train("--train.run_dir={tmp}/parent/new"),
         ["Permission denied", "choose a folder you can write"],
         setup=read_only_parent, prefix=no_bypass()),
    Case("full-disk-at-the-start-of-a-run", train("--train.run_dir={tmp}/new"),
         ["cannot start the run", "File too large", "run the command again"],
         prefix=file_limit(200)),
    Case("full-disk-during-prepare", ["prepare", "text:{tmp}/src", "--out={tmp}/out",
                                      "--download=false"],
         ["File too large", "run the command again"], setup=text_corpus,
         prefix=file_limit(2000)),
    Case("prepare-into-a-read-only-folder", ["prepare", "text:{tmp}/src",
                                             "--out={tmp}/parent/out", "--download=false"],
         ["Permission denied", "fix its permissions or choose another"],
         setup=text_corpus_read_only_out, prefix=no_bypass()),
    Case("score-into-a-read-only-folder", ["score", "{run}", "{tmp}/in.txt",
                                           "--out={tmp}/parent/scores.jsonl"],
         ["Permission denied", "fix its permissions or choose another"],
         setup=score_read_only_out, prefix=no_bypass()),
    Case("compare-into-a-read-only-folder", ["compare", "{run}", "--out={tmp}/parent/cmp"],
         ["Permission denied", "fix its permissions or choose another"],
         setup=read_only_parent, prefix=no_bypass()),
]

# Options refused before anything starts: a tiny recipe ({tmp}/tiny.toml) with one bad value

def tiny(p):
    (p["tmp"] / "tiny.toml").write_text(OPTION_TOML)
    (p["tmp"] / "folder").mkdir()


def study_file(p):
    tiny(p)
    (p["tmp"] / "study.toml").write_text(
        '[study]\nname = "s"\nbase = "tiny.toml"\ntrials = "many"\nbudget = { steps = 2 }\n'
        '[space."optim.lr"]\ntype = "loguniform"\nlow = 1\nhigh = 50\n')


def option(name: str, args: list[str], needles: list[str], **kw) -> Case:
    return Case(name, ["train", "{tmp}/tiny.toml", *args], needles, setup=tiny, **kw)


NO_WANDB_LOGIN = {"WANDB_API_KEY": None, "WANDB_IDENTITY_TOKEN_FILE": None, "WANDB_MODE": None,
                  "NETRC": "{tmp}/no-netrc", "WANDB_CONFIG_DIR": "{tmp}/no-wandb-config"}
CASES += [
    option("hidden_size=0", ["--model.hidden_size=0"], ["model.hidden_size must be >= 1",
                                                        "got 0"]),
    option("emb_size<0", ["--model.emb_size=-4"], ["model.emb_size must be >= 1"]),
    option("n_experts=0", ["--model.n_experts=0"], ["model.n_experts must be >= 1"]),
    option("lr=nan", ["--optim.lr=nan"], ["optim.lr", "finite number"]),
    option("lr=inf", ["--optim.lr=inf"], ["optim.lr", "finite number"]),
    option("epochs=0", ["--train.epochs=0", "--train.max_steps=0"],
           ["train.epochs = 0 with train.max_steps = 0 trains nothing", "train.epochs >= 1"]),
    option("clip=-1", ["--optim.clip=-1"], ["optim.clip must be >= 0", "0 turns clipping off"]),
    option("wandb-online-no-login", ["--log.wandb_mode=online"],
           ["log.wandb_mode is online", "wandb login", "--log.wandb_mode=offline"],
           env=NO_WANDB_LOGIN),
    option("corpus=ptbb", ["--data.corpus=ptbb"],
           ["data.corpus 'ptbb' is not a corpus preset", "Did you mean --data.corpus=ptb?"]),
    option("nhid", ["--model.nhid=64"], ["'model.nhid'", "'model.hidden_size'"]),
    option("lr-without-section", ["--lr=3"], ["'lr'", "Did you mean 'optim.lr'?"]),
    option("key-in-wrong-section", ["--train.lr=3"], ["Did you mean 'optim.lr'?"]),
    Case("config-is-a-folder", ["train", "{tmp}/folder"], ["is a directory", "TOML file"],
         setup=tiny),
    Case("cache.theta<0", ["eval", "{run}", "--cache.theta=-1"], ["--cache.theta", ">= 0"]),
    Case("eval-a-folder-that-is-not-a-run", ["eval", "{tmp}/folder"],
         ["is not a dist-lm run directory", "--train.run_dir"], setup=tiny),
    # option groups beyond the run config, read and checked by config.py the same way
    Case("cache.window=abc", ["eval", "{run}", "--cache.window=abc"],
         ["eval option --cache.window expects an integer", "'abc'"]),
    option("search.reward_c=0", ["--search.reward_c=0"], ["search.reward_c must be > 0"]),
    Case("study-trials-not-a-number", ["sweep", "{tmp}/study.toml", "--dir={tmp}/sweep"],
         ["[study] key 'trials' expects an integer", "'many'"], setup=study_file),
]


# ---- fixtures and the test ----------------------------------------------------------------

@pytest.fixture(scope="module")
def places(tmp_path_factory, ptb_slice, shared_data):
    """The shared run (2 steps of the tiny recipe through the CLI, trained once), its corpus,
    another corpus (another vocabulary) and the recipe."""
    root = tmp_path_factory.mktemp("bad-inputs")
    toml = root / "tiny.toml"
    toml.write_text(FAULT_TOML)
    run = root / "run"
    p = {"run": run, "corpus": ptb_slice, "toml": toml}
    proc = run_cli(*[a.format(**p) for a in train("--train.run_dir={run}")], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    p["other"] = small_corpus(root, shared_data, name="other-slice", max_vocab=150)
    return p


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(case, places, tmp_path):
    p = {**places, "tmp": tmp_path}
    if case.setup is not None:
        case.setup(p)
    argv = [a.format(**p) for a in case.argv]
    watched = [places["run"], places["corpus"], places["other"], tmp_path]
    before = [tree(w) for w in watched]
    try:
        extra = {k: None if v is None else v.format(**p) for k, v in case.env.items()}
        proc = run_cli(*argv, cwd=tmp_path, env=extra, prefix=case.prefix)
    finally:
        writable(tmp_path)  # so that pytest can clean up
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("dist-lm: error: "), proc.stderr
    for text in case.expect_in_stderr:
        assert text in lines[0], lines[0]
    assert len(lines[0]) < 600, lines[0]  # a suggestion, not the list of every key
    for w, was in zip(watched, before):
        assert tree(w) == was, f"{case.name} changed {w}"


def test_the_shared_run_resumes_with_its_own_flags_and_what_a_resume_may_change(places,
                                                                               tmp_path):
    """The control of the resume cases: the same recipe resumes (with budgets and logging
    changed, which a resume may), so each case above is refused for the one key it changes."""
    shutil.copytree(places["run"], tmp_path / "run")
    p = {**places, "tmp": tmp_path}
    argv = [a.format(**p) for a in ["train", "{toml}", "--data.shards={corpus}",
                                    "--train.run_dir={tmp}/run", "--resume=auto",
                                    "--train.max_steps=3", "--log.every_steps=2",
                                    "--train.max_seconds=600"]]
    proc = run_cli(*argv, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "step-00000002" in proc.stdout


def test_eval_generate_and_score_work_on_a_read_only_run(places, tmp_path):
    """Someone else's run: eval computes and prints the number, and says in one line that it
    could not save it beside the checkpoint; generate and score (to stdout) just work."""
    shutil.copytree(places["run"], tmp_path / "run")
    run = tmp_path / "run"
    read_only(run)
    (tmp_path / "in.txt").write_text("the cat\n")
    before = tree(run)
    try:
        for argv, out in ((["eval", str(run), "--split", "valid"], "valid ppl"),
                          (["generate", str(run), "--length", "5"], ""),
                          (["score", str(run), str(tmp_path / "in.txt")], '"tokens"')):
            proc = run_cli(*argv, cwd=REPO, prefix=no_bypass())
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
            assert out in proc.stdout, proc.stdout
            if argv[0] == "eval":
                assert "| not saved" in proc.stdout
                warn = [ln for ln in proc.stderr.splitlines() if "could not be saved" in ln]
                assert len(warn) == 1 and "eval-valid.json" in warn[0], proc.stderr
    finally:
        writable(run)
    assert tree(run) == before


def test_write_text_atomic_leaves_no_temporary_file(tmp_path):
    """A write that fails (here: the file-size limit, as a full disk) leaves the old file as it
    was and no NAME.PID.tmp beside it."""
    target = tmp_path / "vocab.json"
    target.write_text("old\n")
    code = ("import sys; from dist_lm.fileio import write_text_atomic\n"
            "try:\n    write_text_atomic(sys.argv[1], 'x' * 100000)\n"
            "except OSError as e:\n    print(e.errno)\n")
    proc = subprocess.run([*file_limit(1000), sys.executable, "-c", code, str(target)],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "27", proc  # EFBIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.json"]
    assert target.read_text() == "old\n"
