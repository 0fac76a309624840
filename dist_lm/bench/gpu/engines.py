"""Part `engines`: the distributed engines on one GPU, each run in its own process with a
bounded wait: 1-rank DDP over NCCL, 1-rank DeepSpeed ZeRO-1 and ZeRO-2 in bf16, and 2 ranks on
one GPU over gloo (torchrun; NCCL refuses two ranks on one GPU). Each runs a few steps of the
PTB AWD-LSTM recipe (dropout off, fp32 without TF32 for the reference) on Zipf tokens, and its
loss curve is compared with a 1-rank local run's. In the CPU rehearsal gloo stands in for NCCL.
Single-node groups use the loopback interface (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME = lo):
inside a VM the default interface may not route to itself.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ...fileio import write_text_atomic
from .common import (LOSS_RTOL, LOSS_RTOL_BF16, PTB_CONFIG, Plan, common_overrides,
                     corpus_sizes, loss_down, train_run, zipf_corpus)

WAIT_S = 120  # one engine's process, start to end (well under a device command's 10 minutes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(out: Path, nproc: int, config: str, over: dict, cwd: Path, wait_s: float) -> dict:
    """train_run(config, over) in a child process: torchrun with nproc ranks, or one plain
    process (the Trainer gives it a process group of one); rank 0's result."""
    spec = out.with_suffix(".spec.json")
    write_text_atomic(spec, json.dumps([config, over]))
    args = ["-m", "dist_lm.bench.gpu.engines", str(out), str(spec)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ, WANDB_MODE="disabled", GLOO_SOCKET_IFNAME="lo",
               NCCL_SOCKET_IFNAME="lo")
    if nproc > 1 or over.get("train.device") == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    t0 = time.perf_counter()
    # in the part's process group (the runner's kill of the part reaches it); on its own
    # timeout the launcher and every rank under it are killed here
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=cwd)
    try:
        output, _ = proc.communicate(timeout=wait_s)
    except subprocess.TimeoutExpired:
        import psutil  # a DeepSpeed requirement, in the image

        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        output, _ = proc.communicate()
        raise RuntimeError(f"{' '.join(cmd[:6])} ... did not end in {wait_s:.0f} s: "
                           f"{output[-2500:]}") from None
    if proc.returncode or not out.is_file():
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}: {output[-2500:]}")
    res = json.loads(out.read_text())
    res["process_seconds"] = time.perf_counter() - t0
    return res


def curve_check(label: str, got: dict, ref: dict, rtol: float) -> dict:
    a, b = got["losses"], ref["losses"]
    diff = math.inf if len(a) != len(b) or not a else max(abs(x - y) / abs(y)
                                                            for x, y in zip(a, b))
    return {"name": f"{label}: loss curve vs 1 rank (max rel diff)", "value": diff,
            "unit": "rel", "tolerance": rtol, "ok": diff <= rtol, "losses": a, "reference": b}


def cases(plan: Plan, ctx) -> list[tuple[str, object]]:
    tmp = Path(ctx["tmp"])
    B, T = (4, 12) if plan.dry else (20, 70)
    gpu = "CPU" if plan.dry else "GPU"
    backend = "gloo" if plan.dry else "nccl"
    # dropout off (masks come from per-rank generators), fp32 without TF32: equal curves
    base = {"model.dropout": 0.0, "model.dropouth": 0.0, "model.dropouti": 0.0,
            "model.dropoute": 0.0, "model.wdrop": 0.0, "train.tf32": False, "train.bf16": False}
    ref_file = tmp / "engines_ref.json"

    def data():
        return zipf_corpus(tmp / "data", plan.ptb_vocab,
                           corpus_sizes(plan, B, T, 2, plan.dist_steps))

    def over(name, **kw):
        return {**common_overrides(plan, tmp / "runs" / name, data(), plan.dist_steps, 1),
                **base, **kw}

    def reference():
        res = train_run(PTB_CONFIG, over("engines_ref"))
        write_text_atomic(ref_file, json.dumps(res, default=str))
        return [{"name": f"1 rank local fp32 on the {gpu}: tokens/s",
                 "value": res["tokens_per_s"], "unit": "tokens/s", "losses": res["losses"]}]

    def engine(label, nproc, rtol, **kw):
        def case():
            name = label.split(",")[0].replace(" ", "_").replace("-", "")
            res = worker(tmp / f"{name}.json", nproc, PTB_CONFIG, over(name, **kw), tmp,
                         min(WAIT_S, ctx.get("budget_s", WAIT_S)))
            rows = [{"name": f"{label}: tokens/s", "value": res["tokens_per_s"],
                     "unit": "tokens/s", "process_seconds": res["process_seconds"]},
                    loss_down(label, res["losses"])]
            if ref_file.is_file():
                rows.append(curve_check(label, res, json.loads(ref_file.read_text()), rtol))
            return rows
        return case

    ds = {"dist.engine": "deepspeed", "dist.backend": backend, "train.bf16": True}
    out = [("1 rank local", reference),
            (f"DDP {backend}", engine(f"1-rank DDP on {backend.upper()}", 1, LOSS_RTOL,
                                      **{"dist.engine": "ddp", "dist.backend": backend})),
            ("DeepSpeed ZeRO-1", engine("1-rank DeepSpeed ZeRO-1 bf16", 1, LOSS_RTOL_BF16,
                                        **ds, **{"dist.zero_stage": 1})),
            ("DeepSpeed ZeRO-2", engine("1-rank DeepSpeed ZeRO-2 bf16", 1, LOSS_RTOL_BF16,
                                        **ds, **{"dist.zero_stage": 2})),
            ("2 ranks gloo", engine(f"2 ranks on one {gpu}, DDP over gloo", 2, LOSS_RTOL,
                                    **{"dist.engine": "ddp", "dist.backend": "gloo"}))]
    if plan.dry:  # CI: one process per code path (1-rank DDP on gloo and ZeRO-2 repeat them)
        out = [c for c in out if c[0] not in (f"DDP {backend}", "DeepSpeed ZeRO-2")]
    return out


def _main(argv: list[str]) -> None:
    """`python -m dist_lm.bench.gpu.engines OUT SPEC`: train_run of SPEC's [config, overrides];
    rank 0 writes the result to OUT."""
    import torch

    out, spec = Path(argv[0]), Path(argv[1])
    config, over = json.loads(spec.read_text())
    res = train_run(config, over)
    if res["rank"] == 0:
        write_text_atomic(out, json.dumps(res, default=str))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv[1:])
