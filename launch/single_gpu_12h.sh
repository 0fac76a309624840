#!/usr/bin/env bash
# The WikiText-103 QRNN recipe on one GPU (Merity et al. 2018, ~12 h on a V100; expected
# valid/test perplexity ~32.0/33.0): 4-layer QRNN, tied adaptive softmax, Adam, 14 epochs.
#   launch/single_gpu_12h.sh [--dotted.overrides ...]
# Variables: CONFIG (default configs/wt103_qrnn_12h.toml), RUN_DIR, RESUME (auto|PATH|empty).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/wt103_qrnn_12h.toml}
RUN_DIR=${RUN_DIR:-runs/wt103_qrnn_12h}
RESUME=${RESUME:-auto}
DIST_LM=${DIST_LM:-dist-lm}

[ -f shards/wikitext-103/manifest.json ] || { echo "+ $DIST_LM prepare wikitext-103"; $DIST_LM prepare wikitext-103; }
cmd=($DIST_LM train "$CONFIG" --train.run_dir="$RUN_DIR" --train.device=cuda --dist.engine=local)
[ -n "$RESUME" ] && cmd+=(--resume="$RESUME")
cmd+=("$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
