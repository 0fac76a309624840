#!/usr/bin/env bash
# The GPU check, run on the GPU machine with the device kit beside it (docs/gpu.md):
#   bash launch/gpu_check.sh OUTDIR        # e.g. bash launch/gpu_check.sh $OUT
# Installs the kit's wheels (launch/gpu_kit.sh, carried as .gpu_kit) into a target folder,
# prints the versions, then runs `dist-lm bench gpu`: every part in its own process under its
# own time bound (dist_lm/bench/gpu/runner.py), the whole within 8 minutes on one H100.
# Writes OUTDIR/gpu_check.json, OUTDIR/gpu_check.txt (the summary table), OUTDIR/gpu_check.log.
# Variables: KIT (default .gpu_kit), SITE (default /tmp/dist-lm-site), PYTHON (default python3),
# DRY=1 for the CPU rehearsal (tiny sizes; what CI runs through tests/bench/test_bench_gpu_kit.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: launch/gpu_check.sh OUTDIR}
KIT=${KIT:-.gpu_kit}
case $KIT in /*) ;; *) KIT="$PWD/$KIT" ;; esac
SITE=${SITE:-/tmp/dist-lm-site}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG="$OUTDIR/gpu_check.log"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled GLOO_SOCKET_IFNAME=lo NCCL_SOCKET_IFNAME=lo
export DIST_LM_GPU_KIT="$KIT"
{
  echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
  if ls "$KIT"/wheels/*.whl >/dev/null 2>&1; then
    echo "+ pip install --no-index --no-deps --target $SITE $KIT/wheels/*.whl"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$KIT"/wheels/*.whl || echo "gpu_check: the kit did not install" >&2
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: no kit at $KIT/wheels (run launch/gpu_kit.sh here first); going on" >&2
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PYTHON" - <<'PY'
import importlib.metadata as md, platform
print("python", platform.python_version())
for d in ("torch", "triton", "numpy", "deepspeed", "pydantic", "pydantic-core",
          "typing-extensions", "fire", "termcolor", "webdataset", "braceexpand", "hjson"):
    try:
        print(f"{d:18} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"{d:18} not installed")
PY
  args=(bench gpu --json "$OUTDIR/gpu_check.json")
  [ "${DRY:-0}" = 1 ] && args+=(--dry)
  echo "+ $PYTHON -m dist_lm ${args[*]}"
  # the runner bounds every part; this bound is the last resort (a device command: 10 min)
  timeout -k 10 "${GPU_CHECK_TIMEOUT:-540}" "$PYTHON" -m dist_lm "${args[@]}"
  rc=$?
  echo "gpu_check: exit code $rc"
  exit $rc
} 2>&1 | tee "$LOG"
