#!/usr/bin/env bash
# Quickstart on a fresh CPU machine: set up, prepare PTB, train the 5-minute PTB recipe
# (configs/ptb_5min_cpu.toml, found by `dist-lm sweep`: docs/tuning.md), evaluate validation
# and test perplexity, print a sample.
#   bash launch/quickstart.sh                 # the recipe's 5 minutes of training
#   MINUTES=15 bash launch/quickstart.sh      # the 15-minute recipe (configs/ptb_15min_cpu.toml)
#   MINUTES=8 bash launch/quickstart.sh       # the 5-minute recipe with another time budget
# Corpus files come from $DIST_LM_DATA_DIR, else ../shared/data when present, else they are
# downloaded from the official source and checked by sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-5}
case "$MINUTES" in
  ''|*[!0-9]*|0|00*) echo "quickstart: MINUTES must be a whole number of minutes >= 1, got '$MINUTES'" >&2; exit 2 ;;
esac
RECIPE=configs/ptb_5min_cpu.toml
if [ "$MINUTES" -ge 15 ]; then RECIPE=configs/ptb_15min_cpu.toml; fi
RUN=${RUN:-runs/quickstart}

source launch/_common.sh  # run: print each command shell-quoted, then run it

if [ ! -x .venv/bin/dist-lm ]; then
  run python3 -m venv .venv
  run .venv/bin/python -m pip install -q --upgrade pip
  # torch pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build)
  run .venv/bin/python -m pip install -q -c .ci/constraints.txt -e .
fi
export PATH="$PWD/.venv/bin:$PATH"

data_args=()
if [ -n "${DIST_LM_DATA_DIR:-}" ]; then
  data_args=(--data_dir "$DIST_LM_DATA_DIR")
elif [ -f ../shared/data/ptb/ptb.train.txt ]; then
  data_args=(--data_dir ../shared/data)
fi
if [ -f shards/ptb/manifest.json ]; then
  run dist-lm verify shards/ptb
else
  run dist-lm prepare ptb "${data_args[@]}"
fi

# The budgeted PTB recipe, trained for $MINUTES minutes of wall-clock (validation included;
# the lr decays by the clock); a validation pass and a checkpoint close the run, then the
# test pass. Starts afresh (--overwrite replaces an earlier quickstart run in $RUN).
run dist-lm train "$RECIPE" --train.run_dir="$RUN" --overwrite \
  --train.max_seconds=$((MINUTES * 60)) --log.every_steps=50
# train ends with validation and test perplexity; `eval` is how a finished run is scored later
run dist-lm eval "$RUN" --split test
run dist-lm generate "$RUN" --prompt "the company said" --length 40 --seed 1
echo "run directory: $RUN (config.json, metrics.jsonl, checkpoints/, wandb/)"
