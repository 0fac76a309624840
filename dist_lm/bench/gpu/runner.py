"""Runs the GPU check's parts, each in its own process under its own time bound, and writes the
JSON and the summary table after each part.

A part is a list of named cases (each part module's `cases(plan, ctx)`). Its process runs them
in order and appends every case's rows to a JSON-lines file as soon as the case ends; a case
that raises becomes one failed row and the next case runs. When the process dies in a case
(a crash, an illegal memory access that poisons the CUDA context) that case is recorded as
failed and a fresh process runs the remaining cases; when the part's time is up, the case in
flight is recorded as timed out and the rest as not run. A part's bound is its own limit or
what the command's budget leaves after reserving the later parts' minimum, whichever is less.

Self-test switch: DIST_LM_BENCH_GPU_FAULT=PART:CASE:KIND makes the case whose name starts with
CASE in part PART fail in one of three ways: raise (an exception), exit (the process dies) or
hang (sleeps past the part's bound). The tests inject each one.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ...errors import UserError
from ...fileio import write_text_atomic
from .common import Plan
from .report import format_rows, summary

# (part, module, cases function, bound s on the GPU, minimum s reserved for it) in run order
PARTS = (("env", "env", "cases", 60, 10),
         ("kernels", "kernels", "cases", 120, 30),
         ("kernel_speed", "kernels", "speed_cases", 60, 20),
         ("sync", "sync", "cases", 60, 30),
         ("engines", "engines", "cases", 150, 60),
         ("model_step", "model_step", "cases", 75, 40),
         ("train", "train", "cases", 240, 100))
NAMES = tuple(p[0] for p in PARTS)
SECTIONS_ENV = "DIST_LM_BENCH_GPU_SECTIONS"
FAULT_ENV = "DIST_LM_BENCH_GPU_FAULT"
BUDGET_S = 450  # the parts together on one H100; launch/gpu_check.sh adds the kit's install
DRY_BOUND_S = 300  # each part's bound in the CPU rehearsal (CI)
RESTARTS = 3  # fresh processes a part may use after crashes


_ACTIVE: set[int] = set()  # process groups of the parts running now


def _on_term(signum, frame) -> None:
    """SIGTERM (the script's last-resort `timeout`): end the running part's process group too;
    it runs in its own session, which a device machine would leave running after the command."""
    for pid in list(_ACTIVE):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


def selected_parts() -> list[str]:
    raw = os.environ.get(SECTIONS_ENV, "").strip()
    if not raw:
        return list(NAMES)
    names = [s.strip() for s in raw.split(",") if s.strip()]
    bad = [s for s in names if s not in NAMES]
    if bad:
        raise UserError(f"{SECTIONS_ENV} names unknown part(s) {', '.join(bad)}; choose from "
                        f"{', '.join(NAMES)}.")
    return [s for s in NAMES if s in names]


def _fault(part: str, case: str) -> None:
    raw = os.environ.get(FAULT_ENV, "")
    if raw.count(":") != 2:
        return
    p, c, kind = raw.split(":")
    if p != part or not case.startswith(c):
        return
    if kind == "raise":
        raise RuntimeError(f"fault injected into {part}/{case} ({FAULT_ENV})")
    if kind == "exit":
        os._exit(3)
    if kind == "hang":
        time.sleep(3600)


def run_part(part: str, jsonl: Path, ctx: dict, skip: set[str]) -> None:
    """In the part's process: every case not in `skip`, rows appended to `jsonl` per case."""
    mod, fn = next((m, f) for n, m, f, _, _ in PARTS if n == part)
    module = importlib.import_module(f".{mod}", __package__)
    plan = Plan(ctx["dry"])
    cases = getattr(module, fn)(plan, ctx)

    def emit(rec: dict) -> None:
        with open(jsonl, "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")

    for name, case in cases:
        if name in skip:
            continue
        emit({"case": name, "event": "start", "time": time.time()})
        t0 = time.time()
        try:
            _fault(part, name)
            rows = case()
            state = "done"
        except BaseException as exc:  # noqa: BLE001 - a failed case is a row; the next runs
            if isinstance(exc, KeyboardInterrupt):
                raise
            traceback.print_exc()
            rows = [{"name": f"{part}/{name}: ran to its end", "value": type(exc).__name__,
                     "unit": "", "ok": False, "error": str(exc)[-3000:]}]
            state = "error"
        for r in rows:
            emit({"case": name, "row": r})
        emit({"case": name, "event": state, "seconds": time.time() - t0})
        print(format_rows(rows), flush=True)


def _read(jsonl: Path) -> list[dict]:
    if not jsonl.is_file():
        return []
    out = []
    for line in jsonl.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a dying process
            pass
    return out


def drive_part(part: str, ctx: dict, bound_s: float, log) -> tuple[list[dict], str]:
    """The part in child processes within bound_s; (rows, status)."""
    jsonl = Path(ctx["tmp"]) / f"part-{part}.jsonl"
    jsonl.unlink(missing_ok=True)
    deadline = time.time() + bound_s
    env = dict(os.environ)
    if ctx["dry"] and part == "kernels":
        env["TRITON_INTERPRET"] = "1"  # the Triton kernels on CPU tensors (before triton loads)
    rows: list[dict] = []
    skip: set[str] = set()
    status = "done"
    for attempt in range(RESTARTS + 1):
        left = deadline - time.time()
        if left <= 1:
            status = "timed out"
            break
        spec = Path(ctx["tmp"]) / f"part-{part}.ctx.json"
        write_text_atomic(spec, json.dumps({**ctx, "budget_s": left, "skip": sorted(skip)}))
        proc = subprocess.Popen([sys.executable, "-m", "dist_lm.bench.gpu.runner", "_part", part,
                                 str(jsonl), str(spec)], env=env, stdout=log, stderr=log,
                                start_new_session=True)
        _ACTIVE.add(proc.pid)
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and any children it started
            proc.wait()
            rc = None
        finally:
            _ACTIVE.discard(proc.pid)
        recs = _read(jsonl)
        started = [r["case"] for r in recs if r.get("event") == "start"]
        ended = {r["case"] for r in recs if r.get("event") in ("done", "error")}
        inflight = [c for c in started if c not in ended and c not in skip]
        if rc == 0 and not inflight:
            break
        if rc is None:
            what = f"timed out (part bound {bound_s:.0f} s)"
            status = "timed out"
        else:
            what = f"the part's process died (exit code {rc})"
            status = "restarted"
        for c in inflight:
            rows.append({"name": f"{part}/{c}: ran to its end", "value": "lost", "unit": "",
                         "ok": False, "error": what, "case": c})
            skip.add(c)
        skip |= ended
        if rc is None:
            break
    recs = _read(jsonl)
    rows = [{**r["row"], "case": r["case"]} for r in recs if "row" in r] + rows
    # cases never started (the part ran out of time or restarts)
    known = {r["case"] for r in recs}
    if status in ("timed out", "restarted"):
        mod, fn = next((m, f) for n, m, f, _, _ in PARTS if n == part)
        names = [n for n, _ in getattr(importlib.import_module(f".{mod}", __package__), fn)(
            Plan(ctx["dry"]), ctx)]
        for n in names:
            if n not in known and n not in skip:
                rows.append({"name": f"{part}/{n}: not run ({status})", "value": "not run",
                             "unit": "", "ok": False, "case": n})
    return rows, status


def run(dry: bool, json_path: str | None, budget_s: float | None = None) -> list[dict]:
    """Every selected part; the JSON (and the table beside it, .txt) rewritten after each."""
    from .. import machine_summary

    parts = selected_parts()
    budget = budget_s or (BUDGET_S if not dry else DRY_BOUND_S * len(PARTS))
    started = time.time()
    rows: list[dict] = []
    status: dict[str, dict] = {}
    table = Path(json_path).with_suffix(".txt") if json_path else None

    def flush(complete: bool) -> None:
        if not json_path:
            return
        doc = {"machine": machine_summary(), "group": "gpu", "dry": dry,
               "seconds": time.time() - started, "complete": complete, "parts": status,
               "failed": [r["name"] for r in rows if r.get("ok") is False], "results": rows}
        write_text_atomic(json_path, json.dumps(doc, indent=1, default=str) + "\n")
        write_text_atomic(table, summary(doc))

    signal.signal(signal.SIGTERM, _on_term)
    with tempfile.TemporaryDirectory(prefix="dist-lm-gpu-check-") as tmp:
        ctx = {"tmp": tmp, "dry": dry}
        for i, part in enumerate(parts):
            own = next(b for n, _, _, b, _ in PARTS if n == part)
            reserve = sum(r for n, _, _, _, r in PARTS if n in parts[i + 1:])
            left = budget - (time.time() - started) - reserve
            bound = DRY_BOUND_S if dry else max(10.0, min(own, left))
            print(f"== gpu check: {part} (at most {bound:.0f} s)"
                  f"{' (CPU rehearsal, tiny sizes)' if dry else ''}", flush=True)
            t0 = time.time()
            got, state = drive_part(part, ctx, bound, sys.stdout)
            for r in got:
                r["part"] = part
                r["section"] = part
            rows.extend(got)
            status[part] = {"status": state, "seconds": time.time() - t0, "bound_s": bound}
            print(format_rows(got), flush=True)
            print(f"({part}: {state}, {status[part]['seconds']:.1f} s)", flush=True)
            flush(complete=False)
    total = time.time() - started
    rows.append({"name": "gpu check wall time", "value": total, "unit": "s", "part": "total",
                 "section": "total", "target": BUDGET_S, "target_met": total <= BUDGET_S,
                 "target_text": f"<= {BUDGET_S} s"})
    status["total"] = {"status": "done", "seconds": total, "bound_s": budget}
    print(format_rows(rows[-1:]), flush=True)
    flush(complete=True)
    return rows


def _main(argv: list[str]) -> None:
    """`python -m dist_lm.bench.gpu.runner _part PART JSONL CTX`: one part's process."""
    if len(argv) != 4 or argv[0] != "_part":
        raise SystemExit("usage: python -m dist_lm.bench.gpu.runner _part PART JSONL CTX")
    ctx = json.loads(Path(argv[3]).read_text())
    run_part(argv[1], Path(argv[2]), ctx, set(ctx.pop("skip", [])))


if __name__ == "__main__":
    _main(sys.argv[1:])
