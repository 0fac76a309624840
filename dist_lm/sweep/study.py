"""`dist-lm sweep`: an Optuna study whose trials are ordinary `dist-lm train` runs.

    dist-lm sweep configs/sweeps/ptb_small_lr.toml --dir sweeps/ptb-lr --workers 2

Optuna does the sampling (TPE, random), the pruning (median, successive halving, Hyperband),
the storage (a journal file, or an RDB URL that many machines share) and the retry of
interrupted trials. This module only turns a trial into a subprocess
`python -m dist_lm train BASE --key=value ... --train.run_dir=STUDY_DIR/trials/N`, follows its
metrics.jsonl to report validation values (and stop it when pruned), and reads the objective
from the final record. A crash, a config the trainer refuses or a NaN fails that trial only.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from ..config import load_config
from ..errors import Stopped, UserError
from ..fileio import read_json, write_text_atomic
from ..run.directory import is_run_dir
from ..run.layout import METRICS
from ..train.lockstep import LOCKSTEP_ENV
from .space import Spec, closest, load_spec

POLL_S = 0.2  # how often a running trial's metrics.jsonl is read
STOP_GRACE_S = 10.0  # SIGTERM, then this long before SIGKILL
ORPHAN_AFTER = datetime.timedelta(seconds=60)  # RUNNING without a worker: one that died at once
SPEC_COPY = "study.toml"  # the study file as the study directory last ran it
STUDY_INFO = "study.json"  # where the base recipe and the storage were resolved to

# The child of a trial dies with its `dist-lm sweep` (PR_SET_PDEATHSIG survives exec): a
# SIGKILLed sweep would otherwise leave orphaned trainers writing into its trial directories.
_DEATHSIG = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
             "os.getppid() == int(sys.argv[1]) or sys.exit(143); "
             "os.execvp(sys.argv[2], sys.argv[2:])")


class TrialFailed(Exception):
    """A trial that crashed, diverged or was refused: recorded FAIL, the study goes on."""


class _QuietFailures(logging.Filter):
    """Optuna logs a failed trial with its traceback; ours carry their reason already, and a
    Ctrl-C (KeyboardInterrupt) is the user's own doing: one line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (TrialFailed, KeyboardInterrupt)):
            record.exc_info = None
        return True


# ---- storage, sampler, pruner ---------------------------------------------------------------

def storage_url(spec: Spec, study_dir: Path, override: str | None = None) -> str:
    url = override if override is not None else spec.storage
    return url or str(study_dir / "study.journal")


def open_storage(url: str, spec: Spec):
    """A journal file (a path) or an RDB (an SQLAlchemy URL) with heartbeats, so that a trial
    whose worker died is failed and re-queued by Optuna (RetryHeartbeatStaleTrialCallback)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    # Optuna 4.9 renamed failed_trial_callback (and its Retry* class); accept both
    name = "heartbeat_stale_trial_callback" if hasattr(
        optuna.storages, "RetryHeartbeatStaleTrialCallback") else "failed_trial_callback"
    for attempt in range(3):
        try:
            if "://" not in url:
                Path(url).parent.mkdir(parents=True, exist_ok=True)
                return JournalStorage(JournalFileBackend(url))
            # SQLite: wait for another sweep's write lock instead of failing after 5 s
            engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
            with _quiet_experimental():
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=spec.heartbeat,
                    grace_period=2 * spec.heartbeat, **{name: retry_callback(spec)})
        except Exception as exc:  # SQLAlchemy, driver and OS errors all mean "cannot open it"
            # ... except that two sweeps creating a new database at once race on its tables
            # ("already exists", "UNIQUE constraint failed"): the loser tries again
            if "://" in url and attempt < 2:
                time.sleep(0.5 + random.random())
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot open the study storage {url}: {first}. Give a writable "
                            f"journal file path or an SQLAlchemy URL such as "
                            f"sqlite:///sweeps/study.db.") from None


def retry_callback(spec: Spec):
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    with _quiet_experimental():
        return cls(max_retry=spec.retries)


@contextlib.contextmanager
def _quiet_experimental():
    """Optuna marks some of what we use (retry callback, some sampler options) experimental."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _build(kind_table: dict, classes: dict, what: str):
    options = {k: v for k, v in kind_table.items() if k != "kind"}
    kind = kind_table["kind"]
    if kind not in classes:
        raise UserError(f"study.{what} must be one of {', '.join(classes)}; got {kind!r}."
                        f"{closest(kind, classes)}")
    cls = classes[kind]
    try:
        with _quiet_experimental():
            return cls(**options)
    except (TypeError, ValueError) as exc:
        raise UserError(f"study.{what} = {kind} ({cls.__name__}): {exc}.") from None


def make_sampler(spec: Spec, tried: int = 0):
    """The study's sampler; a seeded one starts at seed + `tried` (the trials already in the
    storage): a seeded sampler replays its sequence from the start in every process, so a
    study continued after Ctrl-C, or joined by another machine, would sample the points it
    already tried again. A new study (tried = 0) keeps the seed's own, reproducible points."""
    import optuna

    table = dict(spec.sampler)
    if isinstance(table.get("seed"), int) and not isinstance(table["seed"], bool) and tried:
        table["seed"] += tried
    return _build(table, {"tpe": optuna.samplers.TPESampler,
                          "random": optuna.samplers.RandomSampler}, "sampler")


def make_pruner(spec: Spec):
    import optuna

    return _build(spec.pruner, {"median": optuna.pruners.MedianPruner,
                                "percentile": optuna.pruners.PercentilePruner,
                                "halving": optuna.pruners.SuccessiveHalvingPruner,
                                "hyperband": optuna.pruners.HyperbandPruner,
                                "none": optuna.pruners.NopPruner}, "pruner")


def open_study(spec: Spec, url: str, create: bool = True):
    import optuna

    storage = open_storage(url, spec)
    sampler, pruner = make_sampler(spec), make_pruner(spec)
    if not create:
        try:
            return optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler,
                                     pruner=pruner)
        except KeyError:
            raise UserError(f"storage {url} holds no study named {spec.name!r}; run "
                            f"`dist-lm sweep {spec.path}` first.") from None
    study = optuna.create_study(study_name=spec.name, storage=storage, sampler=sampler,
                                pruner=pruner, direction="minimize", load_if_exists=True)
    tried = len(study.get_trials(deepcopy=False))
    if tried:
        study.sampler = make_sampler(spec, tried)
    return study


# ---- interrupted trials ---------------------------------------------------------------------

def retried_numbers(trials) -> set[int]:
    """Trials that were re-queued (their numbers are in some trial's retry history)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(study, spec: Spec) -> list[int]:
    """Fail the RUNNING trials whose `dist-lm sweep` on this host is gone (killed, machine
    rebooted), and re-queue them and any interrupted trial not yet re-queued, with Optuna's
    retry callback; returns the numbers re-queued. RDB storages also do this across machines
    through heartbeats."""
    import optuna
    from optuna.trial import TrialState

    storage, host = study._storage, socket.gethostname()
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    requeue = []
    now = datetime.datetime.now()
    for t in trials:
        owner = t.user_attrs.get("worker")
        if t.state != TrialState.RUNNING:
            dead = False
        elif owner is None:  # its worker died between Optuna's ask and our first write
            dead = t.datetime_start is not None and now - t.datetime_start > ORPHAN_AFTER
        else:
            dead = owner.get("host") == host and owner.get("pid") != os.getpid() \
                and not _pid_alive(int(owner.get("pid", 0)))
        if dead:
            storage.set_trial_user_attr(t._trial_id, "fail_reason",
                                        f"interrupted: its dist-lm sweep ({owner or 'unknown'}) "
                                        f"died")
            try:
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first
            requeue.append(t)
        elif t.state == TrialState.FAIL and t.user_attrs.get("interrupted") \
                and t.number not in retried:
            requeue.append(t)
    callback, done = retry_callback(spec), []
    for t in requeue:
        before = len(study.get_trials(deepcopy=False))
        callback(study, storage.get_trial(t._trial_id))  # a no-op past study.retries
        if len(study.get_trials(deepcopy=False)) > before:
            done.append(t.number)
    return done


class _StopWhenDone:
    """Stop after `trials` counted trials: finished ones that were not interrupted, plus
    the ones running now (on any worker), once nothing is waiting in the queue. Workers that
    finish at the same moment may each start one more (as with Optuna's MaxTrialsCallback)."""

    def __init__(self, trials: int):
        self.trials = trials

    def remaining(self, study) -> tuple[int, int]:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        counted = sum(1 for t in trials if t.state == TrialState.RUNNING or (
            t.state.is_finished() and t.number not in retried
            and not t.user_attrs.get("interrupted")))
        waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
        return self.trials - counted, waiting

    def __call__(self, study, trial) -> None:
        left, waiting = self.remaining(study)
        if left <= 0 and not waiting:
            study.stop()


# ---- one trial ------------------------------------------------------------------------------

def _arg(value: Any) -> str:
    """A value as fire parses it back: strings quoted (so '1e3' stays text), lists as JSON."""
    if isinstance(value, (str, list)):
        return json.dumps(value)
    return repr(value)


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class _Follower:
    """New complete lines of a JSONL file that another process appends to. A file that is
    there at the start (an earlier attempt's, which `--overwrite` removes) is skipped; a file
    replaced or truncated later is read from its beginning."""

    def __init__(self, path: Path):
        self.path, self.partial = path, ""
        try:
            st = os.stat(path)
            self.inode, self.offset = st.st_ino, st.st_size
        except FileNotFoundError:
            self.inode, self.offset = None, 0

    def records(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self.inode or st.st_size < self.offset:
                    self.inode, self.offset, self.partial = st.st_ino, 0, ""
                f.seek(self.offset)
                text = f.read().decode("utf-8", errors="replace")
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        text, out = self.partial + text, []
        *lines, self.partial = text.split("\n")
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def _ranks(launcher: list[str]) -> int:
    """Processes per trial that a torchrun-style launcher starts (--nproc_per_node N)."""
    for i, arg in enumerate(launcher):
        for flag in ("--nproc_per_node", "--nproc-per-node"):
            value = arg[len(flag) + 1:] if arg.startswith(flag + "=") else (
                launcher[i + 1] if arg == flag and i + 1 < len(launcher) else None)
            if value is not None and value.isdigit():
                return max(1, int(value))
    return 1


def _objective_key(spec: Spec, rec: dict) -> str | None:
    if spec.objective != "valid":
        return spec.objective if spec.objective in rec else None
    return next((k for k in ("valid_ppl", "valid_bpc") if k in rec), None)


class TrialRunner:
    """The Optuna objective: one subprocess `dist-lm train` per trial."""

    def __init__(self, spec: Spec, study_dir: Path, workers: int, stop: threading.Event):
        self.spec, self.study_dir, self.stop = spec, study_dir, stop
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        self.launcher = shlex.split(spec.launcher) if spec.launcher else [sys.executable]
        self.threads = str(max(1, cores // (max(1, workers) * _ranks(self.launcher))))

    def command(self, number: int, point: dict[str, Any], run_dir: Path) -> list[str]:
        spec = self.spec
        tags = list(spec.base_values.get("log.tags", [])) + [f"trial-{number}"]
        args = [f"--{k}={_arg(v)}" for k, v in spec.overrides(point).items()]
        args += [f"--train.run_dir={_arg(str(run_dir))}", f"--log.group={_arg(spec.name)}",
                 f"--log.name={_arg(f'{spec.name}-trial-{number}')}", f"--log.tags={_arg(tags)}"]
        if is_run_dir(run_dir):  # left by an earlier attempt with this number (a lost storage)
            args.append("--overwrite")
        return [*self.launcher, "-m", "dist_lm", "train", str(spec.base), *args]

    def fail(self, trial, reason: str):
        trial.set_user_attr("fail_reason", reason)
        return TrialFailed(reason)

    def __call__(self, trial) -> float:
        import optuna

        spec, n = self.spec, trial.number
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        point = spec.suggest(trial)
        run_dir = (self.study_dir / "trials" / str(n)).resolve()
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("point", point)
        for stale in ("fail_reason", "interrupted"):  # a re-queued trial inherits its original's
            if stale in trial.user_attrs:
                trial.set_user_attr(stale, None)
        try:
            load_config(spec.base, spec.overrides(point))
        except UserError as exc:
            raise self.fail(trial, f"config refused: {exc}") from None

        logs = self.study_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cmd = self.command(n, point, run_dir)
        if sys.platform == "linux":
            cmd = [sys.executable, "-c", _DEATHSIG, str(os.getpid()), *cmd]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", self.threads)
        # Lockstep: the trainer waits after each validation until the pruner has seen it, so
        # a pruned trial stops at the validation that pruned it however late this loop reads
        # (without it, a trial of a few seconds could finish before its first record is read).
        # Only for a trainer started directly: a launcher need not pass its stdin to rank 0.
        lockstep = not spec.launcher
        if lockstep:
            env[LOCKSTEP_ENV] = "1"
        err_path = logs / f"trial-{n}.err"
        with open(logs / f"trial-{n}.out", "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env,
                                    stdin=subprocess.PIPE if lockstep else subprocess.DEVNULL)
        follower, final, key = _Follower(run_dir / METRICS), None, None
        try:
            while True:
                exited = proc.poll() is not None
                for rec in follower.records():
                    step = int(rec.get("step", 0))
                    for name in ("loss", "valid_loss"):
                        if isinstance(rec.get(name), float) and not math.isfinite(rec[name]):
                            raise self.fail(trial, f"diverged: {name} = {rec[name]} at step {step}")
                    if rec.get("final"):
                        final = rec
                        continue
                    key = _objective_key(spec, rec)
                    if key is not None:
                        trial.report(float(rec[key]), step)
                        if trial.should_prune():
                            raise optuna.TrialPruned(f"{key} = {rec[key]:.4g} at step {step}")
                    if lockstep and "valid_loss" in rec:
                        _resume(proc)
                if exited:
                    break
                if self.stop.is_set():
                    trial.set_user_attr("interrupted", True)
                    raise self.fail(trial, "interrupted: the sweep was stopped")
                time.sleep(POLL_S)
        except KeyboardInterrupt:  # one worker: the signal lands in this loop
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("fail_reason", "interrupted: the sweep was stopped")
            raise
        finally:
            _terminate(proc)
        rc = proc.returncode
        if rc == Stopped.exit_code:  # stopped from outside (preempted), checkpointed: run it again
            trial.set_user_attr("interrupted", True)
            retry_callback(spec)(trial.study, trial.study._storage.get_trial(trial._trial_id))
            raise self.fail(trial, f"interrupted: {_last_line(err_path) or 'the trainer stopped'}")
        if rc != 0:
            last = _last_line(err_path)
            if rc < 0:
                last = f"killed by {signal.Signals(-rc).name}" + (f" ({last})" if last else "")
            raise self.fail(trial, last or f"exit code {rc}")
        if final is None:
            raise self.fail(trial, f"no final record in {run_dir / METRICS}")
        key = _objective_key(spec, final)
        if key is None:
            has = ", ".join(k for k in final if k.startswith("valid"))
            raise self.fail(trial, f"the final record has no {spec.objective} (it has {has}); "
                                   f"set study.objective")
        value = float(final[key])
        if not math.isfinite(value):
            raise self.fail(trial, f"diverged: final {key} = {value}")
        trial.set_user_attr("objective", key)
        trial.set_user_attr("steps", int(final.get("step", 0)))
        for k, v in final.items():
            if k.startswith("test_") and isinstance(v, (int, float)):
                trial.set_user_attr(k, v)
        return value


def _resume(proc: subprocess.Popen) -> None:
    """Let a lockstep trainer go on past the validation it waits at."""
    try:
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    except (BrokenPipeError, OSError):  # it has exited: the loop sees that
        pass


def _terminate(proc: subprocess.Popen) -> None:
    if proc.stdin is not None:  # a lockstep trainer waiting at a validation reads EOF
        try:
            proc.stdin.close()
        except OSError:
            pass
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- the command ----------------------------------------------------------------------------

def default_dir(spec: Spec) -> Path:
    return Path("sweeps") / spec.name


def sweep_command(space: str, study_dir: str | None = None, workers: int = 0, trials: int = 0,
                  storage: str | None = None) -> None:
    """Run (or continue) the study that `space` describes; see dist_lm.__main__.sweep."""
    spec = load_spec(space)
    if workers < 0 or trials < 0:
        raise UserError("--workers and --trials must be >= 0 (0 keeps the study file's value).")
    workers = workers or spec.workers
    spec.trials = trials or spec.trials
    if spec.launcher and not shutil.which(shlex.split(spec.launcher)[0]):
        raise UserError(f"study.launcher: {shlex.split(spec.launcher)[0]!r} is not a command "
                        f"found on PATH (e.g. launcher = \"torchrun --standalone "
                        f"--nproc_per_node 2\").")
    sdir = Path(study_dir) if study_dir else default_dir(spec)
    if (sdir / STUDY_INFO).is_file():  # its trials/N would be overwritten by another study's
        other = read_json(sdir / STUDY_INFO, "remove it or give another --dir").get("name")
        if other != spec.name:
            raise UserError(f"{sdir} holds study {other!r}, not {spec.name!r}; give another "
                            f"--dir (or the same study.name).")
    url = storage_url(spec, sdir, storage)
    study = open_study(spec, url)  # a bad storage fails here, before any trial
    sdir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sdir / SPEC_COPY, Path(space).read_text(encoding="utf-8"))
    write_text_atomic(sdir / STUDY_INFO, json.dumps(
        {"name": spec.name, "space": str(Path(space).resolve()), "base": str(spec.base),
         "storage": url}, indent=2) + "\n")
    for point in spec.enqueue:
        study.enqueue_trial(spec.optuna_params(point), skip_if_exists=True)

    requeued = recover(study, spec)
    if requeued:
        print(f"dist-lm: re-queued interrupted trial(s) {', '.join(map(str, requeued))}",
              flush=True)
    stopper = _StopWhenDone(spec.trials)
    left, waiting = stopper.remaining(study)
    if left <= 0 and not waiting:
        print(f"dist-lm: study {spec.name} already has its {spec.trials} trials; "
              f"`dist-lm sweep report {sdir}` summarises it (--trials raises the count).")
        return
    to_run = max(left, waiting)  # enqueued and re-queued points are part of the count
    jobs = max(1, min(workers, to_run))
    print(f"dist-lm: study {spec.name} ({url}): {to_run} trial(s) to run, "
          f"{jobs} at a time, {spec.budget_text()} each; trials in {sdir / 'trials'}", flush=True)

    stop = threading.Event()
    runner = TrialRunner(spec, sdir, jobs, stop)
    quiet = _QuietFailures()
    logging.getLogger("optuna.study._optimize").addFilter(quiet)

    def on_signal(signum, frame):  # stop the running trials, then leave (they are re-queued)
        stop.set()
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        study.optimize(runner, n_jobs=jobs, catch=(TrialFailed,), callbacks=[stopper])
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        logging.getLogger("optuna.study._optimize").removeFilter(quiet)
        if stop.is_set():  # the trials stopped here go back into the queue
            requeued = recover(study, spec)
            if requeued:
                again = shlex.join(["dist-lm", "sweep", str(space)]
                                   + (["--dir", str(study_dir)] if study_dir else [])
                                   + (["--storage", storage] if storage else []))
                print(f"dist-lm: stopped; trial(s) {', '.join(map(str, requeued))} re-queued "
                      f"for the next `{again}`", file=sys.stderr, flush=True)
    done = study.get_trials(deepcopy=False)
    states = {s: sum(1 for t in done if t.state.name == s) for s in ("COMPLETE", "PRUNED", "FAIL")}
    interrupted = len(retried_numbers(done))
    best = ""
    if states["COMPLETE"]:
        best = f"; best: trial {study.best_trial.number}, {study.best_value:.4g}"
    print(f"dist-lm: study {spec.name}: {states['COMPLETE']} complete, {states['PRUNED']} "
          f"pruned, {states['FAIL']} failed"
          f"{f' ({interrupted} interrupted, re-queued)' if interrupted else ''}{best}. "
          f"Report: dist-lm sweep report {sdir}", flush=True)
