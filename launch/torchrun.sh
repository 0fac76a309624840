#!/usr/bin/env bash
# Data-parallel training with torchrun (DDP; nccl on GPU, gloo on CPU), one or several nodes.
#   launch/torchrun.sh configs/ptb_awd_lstm.toml [--dotted.overrides ...]
# One node, 8 GPUs:       NPROC=8 launch/torchrun.sh configs/wt103_qrnn_12h.toml
# Two nodes (run on each): NNODES=2 NODE_RANK=0|1 RDZV_ENDPOINT=node0.example:29500 NPROC=8 \
#                          launch/torchrun.sh configs/wt103_qrnn_12h.toml
# train.global_batch is the total number of streams over all ranks: keep it to reproduce a
# single-GPU recipe exactly, or scale it with --schedule.base_batch (linear scaling rule) and
# --schedule.warmup_steps. Resume is automatic (RESUME=auto) and needs the same world size.
# Elastic restarts: torchrun restarts every rank when one dies (MAX_RESTARTS times, default 3),
# and with --resume auto the job continues from its last complete checkpoint. The config is
# checked once before torchrun starts: a refused one is one error line, not one per restart.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/torchrun.sh CONFIG [--overrides]}; shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC=${NPROC:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29500}
RDZV_ID=${RDZV_ID:-dist-lm}
RESUME=${RESUME:-auto}
TORCHRUN=${TORCHRUN:-torchrun}
PYTHON=${PYTHON:-$(dirname "$(command -v "$TORCHRUN" || echo .)")/python}  # torchrun's own
[ -x "$PYTHON" ] || PYTHON=python
MAX_RESTARTS=${MAX_RESTARTS:-3}

if [ "$NNODES" = 1 ]; then
  launch=($TORCHRUN --standalone --nnodes 1 --nproc_per_node "$NPROC" --max-restarts "$MAX_RESTARTS")
else
  launch=($TORCHRUN --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC"
          --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID"
          --max-restarts "$MAX_RESTARTS")
fi
args=("$CONFIG" --dist.engine=ddp)
[ -n "$RESUME" ] && args+=(--resume="$RESUME")
args+=("$@")
# A config the trainer refuses is refused by every rank of every elastic restart: check it once
# here (the same parsing as `dist-lm train`, one error line, exit 2) before starting the ranks.
"$PYTHON" -c 'import sys; from dist_lm.config import check_main; check_main(sys.argv[1:])' \
  "${args[@]}"
cmd=("${launch[@]}" -m dist_lm train "${args[@]}")
printf '+'; printf ' %q' "${cmd[@]}"; echo  # shell-quoted: the line can be copied as is
exec "${cmd[@]}"
