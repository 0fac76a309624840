#!/usr/bin/env bash
# Training with the DeepSpeed engine (ds_config generated from the project config: micro batch,
# accumulation, clipping, bf16, ZeRO stage, optimizer).
#   launch/deepspeed.sh configs/wt103_qrnn_12h.toml [--dotted.overrides ...]
# One node:   NUM_GPUS=8 launch/deepspeed.sh configs/wt103_qrnn_12h.toml --dist.zero_stage=1
# Several:    HOSTFILE=launch/hostfile.example launch/deepspeed.sh CONFIG   (passwordless ssh,
#             same path and environment on every host; see launch/hostfile.example)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/deepspeed.sh CONFIG [--overrides]}; shift
NUM_GPUS=${NUM_GPUS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
ZERO=${ZERO:-1}
RESUME=${RESUME:-auto}
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-deepspeed}

launch=($DEEPSPEED --no_local_rank --master_port "$MASTER_PORT")  # LOCAL_RANK comes from the environment
if [ -n "${HOSTFILE:-}" ]; then
  launch+=(--hostfile "$HOSTFILE")
else
  launch+=(--num_gpus "$NUM_GPUS")
fi
cmd=("${launch[@]}" --module dist_lm train "$CONFIG" --dist.engine=deepspeed --dist.zero_stage="$ZERO")
[ -n "$RESUME" ] && cmd+=(--resume="$RESUME")
cmd+=("$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
