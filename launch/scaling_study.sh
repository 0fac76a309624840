#!/usr/bin/env bash
# The scaling study of docs/scaling.md on PTB, on one CPU machine: every run trains the same
# number of tokens (TOKENS), so runs differ in optimizer steps, not in data seen.
#   bash launch/scaling_study.sh                      # everything: batch, bptt, ddp
#   ONLY=batch bash launch/scaling_study.sh           # one part (or a list: ONLY=batch,ddp)
#   TOKENS=5577534 bash launch/scaling_study.sh       # 6 PTB epochs (929,589 tokens each) per run
#   DRY=1 bash launch/scaling_study.sh                # print the commands, run nothing
#
# Parts (each writes runs under $OUT/<part>/, then `dist-lm compare ... --out DIR --x tokens`:
# compare.md and valid_ppl_vs_tokens.png, one line per run, into $OUT/<part>/compare-<model>/):
#   batch  global batch 20 (the recipe), 80, 320 for each rule in $RULES (none linear sqrt),
#          for the small AWD-LSTM (configs/ptb_small_cpu.toml) and a QRNN of the same parameter
#          count (hidden 700, 3 layers: 4.74M parameters; the awd-lstm-lm PTB QRNN's
#          regularisation: clip 0.2, wdrop 0.1, dropouth 0.3). At batch 20 every rule is the
#          recipe (ratio 1), so it runs once. Above it the micro batch is chosen by
#          train.max_micro_tokens (printed), the rest is gradient accumulation.
#   bptt   the QRNN at bptt 70, 140, 280 (batch 20, lr as the recipe: no rule scales bptt).
#   ddp    one scaled point (LSTM, batch 80, sqrt) as real 2-rank DDP on gloo (torchrun, one
#          thread per rank) and its accumulation twin on one process (2 micro batches of 40);
#          prints the largest relative difference of their logged losses. Dropout and weight
#          drop are off in this pair (DDP_DROPOUT=1 keeps the recipe's): each rank draws its own
#          masks, so with them the twins agree in distribution, not step for step.
#
# Environment: TOKENS (1500000), ONLY (batch,bptt,ddp), MODELS (of the batch part: "lstm qrnn"),
# OUT (runs/scaling), RULES
# ("none linear sqrt"), BATCHES ("20 80 320"), BPTTS ("70 140 280"), EVALS (validations per
# run, at the same token fractions in every run: 6), WARMUP_BASE (schedule.warmup_base_steps
# for the scaled runs; default 1/20 of the recipe run's steps, see docs/scaling.md), DDP_TOKENS
# (TOKENS / 5), DDP_DROPOUT, THREADS (torch threads of one-process runs: 2), DRY. Extra
# arguments are passed to every `dist-lm train` (e.g. --train.seed=1). Runs start afresh
# (--overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_common.sh  # run: print each command shell-quoted, then run it
export PATH="$PWD/.venv/bin:$PATH"

TOKENS=${TOKENS:-1500000}
ONLY=${ONLY:-batch,bptt,ddp}
OUT=${OUT:-runs/scaling}
MODELS=${MODELS:-lstm qrnn}
RULES=${RULES:-none linear sqrt}
BATCHES=${BATCHES:-20 80 320}
BPTTS=${BPTTS:-70 140 280}
EVALS=${EVALS:-6}
DDP_TOKENS=${DDP_TOKENS:-$((TOKENS / 5))}
THREADS=${THREADS:-2}
CONFIG=configs/ptb_small_cpu.toml
BASE_BATCH=20  # the recipe's train.global_batch (configs/ptb_small_cpu.toml)
BASE_BPTT=70
WARMUP_BASE=${WARMUP_BASE:-$(( (TOKENS / (BASE_BATCH * BASE_BPTT) + 19) / 20 ))}
EXTRA=("$@")

QRNN=(--model.arch=qrnn --model.hidden_size=700 --optim.clip=0.2 --model.wdrop=0.1
      --model.dropouth=0.3)

want() { [[ ",$ONLY," == *",$1,"* ]]; }
maybe() {  # run, or with DRY only print
  if [ -n "${DRY:-}" ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else run "$@"; fi
}

# train RUN_DIR GLOBAL_BATCH BPTT TOKEN_BUDGET ARGS...: a run of TOKEN_BUDGET tokens (max_steps
# from the tokens per step), validated EVALS times at equal token fractions
train() {
  local dir=$1 batch=$2 bptt=$3 budget=$4; shift 4
  local steps=$(( (budget + batch * bptt / 2) / (batch * bptt) ))
  local every=$(( (steps + EVALS - 1) / EVALS ))
  maybe env OMP_NUM_THREADS="$THREADS" dist-lm train "$CONFIG" --train.run_dir="$dir" --overwrite \
    --train.global_batch="$batch" --train.bptt="$bptt" --train.max_steps="$steps" \
    --train.eval_every_steps="$every" --log.every_steps="$(( every < 50 ? every : 50 ))" \
    --log.progress=false "$@" "${EXTRA[@]}"
}

rule_args() {  # rule_args RULE BATCH: the scaling flags of one run
  if [ "$2" = "$BASE_BATCH" ] || [ "$1" = none ]; then echo "--schedule.scaling=none"
  else echo "--schedule.scaling=$1 --schedule.warmup_base_steps=$WARMUP_BASE"; fi
}

echo "scaling study: $TOKENS tokens per run, parts $ONLY, warm-up base $WARMUP_BASE steps," \
  "under $OUT"

if want batch; then
  for model in $MODELS; do
    args=(); [ "$model" = qrnn ] && args=("${QRNN[@]}")
    runs=()
    for batch in $BATCHES; do
      for rule in $RULES; do
        if [ "$batch" = "$BASE_BATCH" ]; then name=b$batch; else name=b$batch-$rule; fi
        dir=$OUT/batch/$model/$name
        if [[ " ${runs[*]-} " == *" $dir "* ]]; then continue; fi  # batch 20: once
        # shellcheck disable=SC2046  # rule_args is a list of flags
        train "$dir" "$batch" "$BASE_BPTT" "$TOKENS" "${args[@]}" $(rule_args "$rule" "$batch")
        runs+=("$dir")
      done
    done
    maybe dist-lm compare "${runs[@]}" --out "$OUT/batch/compare-$model" --x tokens
  done
fi

if want bptt; then
  runs=()
  for bptt in $BPTTS; do
    dir=$OUT/bptt/qrnn/t$bptt
    train "$dir" "$BASE_BATCH" "$bptt" "$TOKENS" "${QRNN[@]}" --schedule.scaling=none
    runs+=("$dir")
  done
  maybe dist-lm compare "${runs[@]}" --out "$OUT/bptt/compare-qrnn" --x tokens
fi

if want ddp; then
  # the same point twice: 2 ranks x 40 streams (DDP) and 1 process x 2 micro batches of 40
  steps=$(( (DDP_TOKENS + 80 * BASE_BPTT / 2) / (80 * BASE_BPTT) ))
  every=$(( (steps + EVALS - 1) / EVALS ))
  common=(--train.global_batch=80 --train.bptt=$BASE_BPTT --train.max_steps=$steps
          --train.eval_every_steps=$every --log.every_steps=1 --log.progress=false
          --schedule.scaling=sqrt --schedule.warmup_base_steps="$WARMUP_BASE" --overwrite)
  if [ -z "${DDP_DROPOUT:-}" ]; then
    common+=(--model.dropout=0 --model.dropouth=0 --model.dropouti=0 --model.dropoute=0
             --model.wdrop=0)
  fi
  maybe env OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m dist_lm train "$CONFIG" \
    --dist.engine=ddp --dist.backend=gloo --train.device=cpu --train.run_dir="$OUT/ddp/ddp2" \
    "${common[@]}" "${EXTRA[@]}"
  maybe env OMP_NUM_THREADS=1 dist-lm train "$CONFIG" --train.device=cpu --train.micro_batch=40 \
    --train.run_dir="$OUT/ddp/accum2" "${common[@]}" "${EXTRA[@]}"
  maybe dist-lm compare "$OUT/ddp/ddp2" "$OUT/ddp/accum2" --out "$OUT/ddp/compare"
  maybe python - "$OUT/ddp/ddp2" "$OUT/ddp/accum2" <<'EOF'
import sys
from dist_lm.metrics.compare import read_metrics
a, b = ([m["loss"] for m in read_metrics(r) if "grad_norm" in m] for r in sys.argv[1:3])
assert len(a) == len(b) and a, (len(a), len(b))
print(f"DDP vs accumulation: {len(a)} steps, largest relative loss difference "
      f"{max(abs(x - y) / abs(y) for x, y in zip(a, b)):.2e}")
EOF
fi
echo "done: tables and plots under $OUT/*/compare*"
