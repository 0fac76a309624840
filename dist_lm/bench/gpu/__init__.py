"""`dist-lm bench gpu`: the GPU machine's check, checks and figures in under 8 minutes.

    bash launch/gpu_check.sh OUTDIR              # on the GPU machine (installs the kit first)
    dist-lm bench gpu --json OUTDIR/gpu_check.json
    dist-lm bench gpu --dry --json dry.json      # every part at tiny sizes on CPU (CI)

Parts, in this order, each in its own process under its own time bound (runner.py); the JSON
and the summary table beside it (same name, .txt) are rewritten after each part, so a run cut
short still holds what it measured, and a failed or crashed case loses no other result:

  env           versions (torch, CUDA, cuDNN, NCCL, Triton, the kit's packages), the imports the
                check needs, a C compiler for Triton's launcher, TF32, the GPU (env.py)
  kernels       forget-mult and the fused QRNN op against fp64 references, every dtype, T = 1
                and T = 1000, b*H not a multiple of 16, above 2^31 elements (kernels.py)
  kernel_speed  the kernels' bandwidth against a device-to-device copy, and forward + backward
                against the unfused path (kernels.py)
  sync          host syncs per training step, named by source line (sync.py)
  engines       1-rank DDP on NCCL, 1-rank DeepSpeed ZeRO-1 and ZeRO-2 bf16, 2 ranks over gloo,
                each its own process, loss curves against a 1-rank run (engines.py)
  model_step    tokens/s of a full training step of the WT-103 QRNN and the PTB AWD-LSTM at
                1x, 4x, 16x the recipe batch, and the largest batch that fits (model_step.py)
  train         a time-bounded `dist-lm train` of each recipe: tokens/s, peak memory, projected
                hours for the 14-epoch WikiText-103 recipe (train.py)

A failed check (an "ok": false row) makes the command exit non-zero (UserError naming them).
--dry runs the same code at tiny sizes on the CPU: the Triton kernels under TRITON_INTERPRET=1,
the C kernels timed, gloo for NCCL, DeepSpeed in fp32 (its bf16 needs CUDA); host syncs and GPU
memory read "n/a".

Self-test switches (environment variables):
  DIST_LM_BENCH_GPU_TOL_SCALE=F    multiply every kernel tolerance by F (0: every kernel case
                                   fails, which is how the failure path is tested)
  DIST_LM_BENCH_GPU_SECTIONS=a,b   run only these parts (e.g. to rerun one)
  DIST_LM_BENCH_GPU_FAULT=P:C:K    make case C of part P raise, exit or hang (runner.py)
"""

from __future__ import annotations

import time

import torch

from ...errors import UserError
from .common import TOL_ENV
from .runner import FAULT_ENV, NAMES, SECTIONS_ENV, run, selected_parts

__all__ = ["FAULT_ENV", "NAMES", "SECTIONS_ENV", "TOL_ENV", "gpu_command", "run"]


def gpu_command(json_path: str | None = None, dry: bool = False) -> None:
    """`dist-lm bench gpu [--dry] [--json FILE]`: raises UserError naming the failed checks."""
    if not dry and not torch.cuda.is_available():
        raise UserError(f"bench gpu needs a CUDA GPU, and this torch ({torch.__version__}) sees "
                        f"none; run `dist-lm bench gpu --dry` for the CPU rehearsal of every "
                        f"part.")
    selected_parts()  # a bad DIST_LM_BENCH_GPU_SECTIONS fails before anything runs
    t0 = time.time()
    rows = run(dry, json_path)
    failed = [r["name"] for r in rows if r.get("ok") is False]
    print(f"bench gpu: {len(rows)} rows, {sum('ok' in r for r in rows)} checks, "
          f"{len(failed)} failed, {time.time() - t0:.0f} s", flush=True)
    if failed:
        more = f" (and {len(failed) - 8} more)" if len(failed) > 8 else ""
        raise UserError(f"bench gpu: {len(failed)} check(s) failed: {'; '.join(failed[:8])}"
                        f"{more}; see the table above"
                        + (f" and {json_path}" if json_path else "") + ".")
