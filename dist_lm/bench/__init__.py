"""`dist-lm bench GROUP`: speed measurements in one process, printed as a table.

Each group module (data, kernels, model, train, eval) has `run(quick: bool) -> list[dict]`
returning figures {"name", "value", "unit"} plus "baseline" and "ratio" where a figure
is compared against something measured in the same run. docs/benchmarks.md records them.
`gpu` (not part of `all`) is the GPU machine's checks and figures (gpu/; `--dry` on CPU).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from pathlib import Path

from ..errors import UserError
from ..fileio import write_text_atomic

GROUPS = ("data", "kernels", "model", "train", "eval")
REPO = Path(__file__).resolve().parents[2]


def benchmark_corpora() -> Path:
    """The benchmark corpora (ptb/, ptb-char/, wikitext-2/): $DIST_LM_SHARED_DATA, else
    ../shared/data beside the repository, else $DIST_LM_DATA_DIR. Tests use it too."""
    cands = [os.environ.get("DIST_LM_SHARED_DATA"), REPO.parent / "shared" / "data",
             os.environ.get("DIST_LM_DATA_DIR")]
    for c in cands:
        if c and (Path(c) / "ptb" / "ptb.train.txt").is_file():
            return Path(c)
    raise UserError("PTB (ptb/ptb.train.txt) not found; set DIST_LM_SHARED_DATA or "
                    "DIST_LM_DATA_DIR to the folder that holds ptb/.")


def machine_summary() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": gpu, "threads": torch.get_num_threads()}


def format_table(rows: list[dict]) -> str:
    head = f"{'benchmark':<52} {'value':>14} {'unit':<10} {'baseline':>12} {'ratio':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        base = r.get("baseline")
        ratio = r.get("ratio")
        lines.append(f"{r['name']:<52} {r['value']:>14.4g} {r['unit']:<10} "
                     f"{'' if base is None else format(base, '.4g'):>12} "
                     f"{'' if ratio is None else format(ratio, '.2f') + 'x':>8}")
    return "\n".join(lines)


def bench_command(group: str = "all", json_path: str | None = None, quick: bool = False,
                  dry: bool = False) -> None:
    if group == "gpu":  # checks as well as figures, its own JSON and exit code (bench/gpu/)
        from .gpu import gpu_command

        return gpu_command(json_path, dry=dry)
    if dry:
        raise UserError("--dry applies to `dist-lm bench gpu` only.")
    groups = GROUPS if group == "all" else (group,)
    for g in groups:
        if g not in GROUPS:
            raise UserError(f"unknown benchmark group '{g}'; choose one of {', '.join(GROUPS)}, "
                            f"all, or gpu.")
    rows: list[dict] = []
    started = time.time()
    for g in groups:
        mod = importlib.import_module(f".{g}", __name__)
        print(f"== bench {g}{' (quick)' if quick else ''}", flush=True)
        got = mod.run(quick=quick)
        for r in got:
            r["group"] = g
        print(format_table(got), flush=True)
        rows.extend(got)
    if json_path:
        out = {"machine": machine_summary(), "quick": quick, "seconds": time.time() - started,
               "results": rows}
        write_text_atomic(json_path, json.dumps(out, indent=2) + "\n")
