#!/usr/bin/env bash
# Steps to a target perplexity against the global batch (issue 22; docs/scaling.md, "Steps to
# target"): the PTB 5-minute recipe's model (configs/ptb_5min_cpu.toml: one LSTM layer of 300,
# adaptive softmax, Adam at 6e-3) with a constant lr, so that a run's length does not change its
# schedule and a run can stop at the target.
#
#   bash launch/steps_to_target.sh                 # everything below, runs under $OUT
#   ONLY=batch bash launch/steps_to_target.sh      # one part (batch, bptt, ddp)
#   DRY=1 bash launch/steps_to_target.sh           # print the commands, run nothing
#
# batch  the base run (the recipe's global batch 32, S0 steps) sets the target: its final valid
#        ppl. Then global batch 64, 128, 256, 512 (2x-16x) with each rule in $RULES: `none` and
#        `sqrt` stop at the target (train.target_ppl) or at min(S0, CAP x the base run's tokens),
#        `adascale` runs its S0 steps of progress tau (its own end) and is compared at its end.
#        Every run has 2 micro batches per step (train.micro_batch = B/2), so every run measures
#        the gradient noise scale.
# bptt   the same model as a QRNN at bptt 35 (base), 70, 140 and equal streams (32): 2x and 4x
#        the tokens per step, with `none` and `adascale` (its base batch in streams of the
#        longer window: schedule.base_batch = 32 x 35 / bptt, the base run's tokens per step).
# ddp    one adascale point (batch 128) as 2-rank DDP on gloo and its accumulation twin (one
#        process, 2 micro batches of 64), dropout off in both (each rank draws its own masks).
# Then `python -m dist_lm.metrics.steps` writes steps.md and steps_vs_batch.png per part.
#
# Environment: SHARDS (shards/ptb; prepared here when missing), OUT (runs/steps), S0 (400), CAP (8), RULES ("none sqrt adascale"), BATCHES
# ("64 128 256 512"), BPTTS ("70 140"), EVALS (validations over S0 steps: 20), THREADS (2), DRY.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_common.sh  # run: print each command shell-quoted, then run it
export PATH="$PWD/.venv/bin:$PATH"

OUT=${OUT:-runs/steps}
ONLY=${ONLY:-batch,bptt,ddp}
S0=${S0:-400}
CAP=${CAP:-8}
RULES=${RULES:-none sqrt adascale}
BATCHES=${BATCHES:-64 128 256 512}
BPTTS=${BPTTS:-70 140}
EVALS=${EVALS:-20}
THREADS=${THREADS:-2}
CONFIG=configs/ptb_5min_cpu.toml
BASE=32
BASE_BPTT=35
SHARDS=${SHARDS:-shards/ptb}
COMMON=(--data.shards="$SHARDS" --train.max_seconds=0 --schedule.kind=constant --log.every_steps=10 --log.progress=false
        --data.eval_batch_size=80 --log.wandb_mode=disabled --overwrite)

want() { [[ ",$ONLY," == *",$1,"* ]]; }
maybe() {
  if [ -n "${DRY:-}" ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else run "$@" || echo "(exit $?)"; fi
}
final_ppl() {  # the last validation's ppl of a run
  python -c 'import sys; from dist_lm.metrics.compare import read_metrics
v = [r["valid_ppl"] for r in read_metrics(sys.argv[1]) if "valid_ppl" in r]; print(f"{v[-1]:.4f}")' "$1"
}
# train DIR BATCH BPTT MAX_STEPS ARGS...: validated about every S0/EVALS steps
train() {
  local dir=$1 batch=$2 bptt=$3 steps=$4; shift 4
  local every=$(( S0 / EVALS * BASE * BASE_BPTT / (batch * bptt) ))
  maybe env OMP_NUM_THREADS="$THREADS" dist-lm train "$CONFIG" --train.run_dir="$dir" \
    --train.global_batch="$batch" --train.micro_batch=$(( batch / 2 )) --train.bptt="$bptt" \
    --train.max_steps="$steps" --train.eval_every_steps=$(( every < 5 ? 5 : every )) \
    "${COMMON[@]}" "$@"
}
# study PART: the table and plot of one part's runs
study() {
  local part=$1; shift
  maybe python -m dist_lm.metrics.steps "$OUT/$part"/* --out "$OUT/$part" --base "$OUT/$part/base"
}

[ -f "$SHARDS/manifest.json" ] || maybe dist-lm prepare ptb --out "$SHARDS"

if want batch; then
  train "$OUT/batch/base" $BASE $BASE_BPTT "$S0" --schedule.scaling=none
  target=$( [ -n "${DRY:-}" ] && echo TARGET || final_ppl "$OUT/batch/base")
  echo "target: valid ppl $target (the base run's after $S0 steps)"
  for batch in $BATCHES; do
    cap=$(( CAP * S0 * BASE / batch )); [ "$cap" -gt "$S0" ] && cap=$S0
    for rule in $RULES; do
      if [ "$rule" = adascale ]; then
        train "$OUT/batch/b$batch-$rule" "$batch" $BASE_BPTT "$S0" --schedule.scaling=adascale
      else
        train "$OUT/batch/b$batch-$rule" "$batch" $BASE_BPTT "$cap" --schedule.scaling="$rule" \
          --train.target_ppl="$target"
      fi
    done
  done
  study batch
fi

if want bptt; then
  train "$OUT/bptt/base" $BASE $BASE_BPTT "$S0" --model.arch=qrnn --schedule.scaling=none
  target=$( [ -n "${DRY:-}" ] && echo TARGET || final_ppl "$OUT/bptt/base")
  echo "target: valid ppl $target (the QRNN base run's after $S0 steps)"
  for bptt in $BPTTS; do
    train "$OUT/bptt/t$bptt-none" $BASE "$bptt" "$S0" --model.arch=qrnn --schedule.scaling=none \
      --train.target_ppl="$target"
    train "$OUT/bptt/t$bptt-adascale" $BASE "$bptt" "$S0" --model.arch=qrnn \
      --schedule.scaling=adascale --schedule.base_batch=$(( BASE * BASE_BPTT / bptt ))
  done
  study bptt
fi

if want ddp; then
  steps=$(( S0 / 4 ))
  nodrop=("${COMMON[@]}" --model.dropout=0 --model.dropouth=0 --model.dropouti=0 --model.dropoute=0
          --model.wdrop=0 --train.max_steps=$steps --train.eval_every_steps=$(( steps / 4 ))
          --train.global_batch=128 --schedule.scaling=adascale --log.every_steps=1)
  maybe env OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m dist_lm train "$CONFIG" \
    --dist.engine=ddp --dist.backend=gloo --train.device=cpu --train.run_dir="$OUT/ddp/ddp2" \
    "${nodrop[@]}"
  maybe env OMP_NUM_THREADS=1 dist-lm train "$CONFIG" --train.device=cpu --train.micro_batch=64 \
    --train.run_dir="$OUT/ddp/accum2" "${nodrop[@]}"
  maybe python - "$OUT/ddp/ddp2" "$OUT/ddp/accum2" <<'EOF'
import sys
from dist_lm.metrics.compare import read_metrics
recs = [[m for m in read_metrics(r) if "adascale_gain" in m] for r in sys.argv[1:3]]
a, b = recs
assert len(a) == len(b) and a, (len(a), len(b))
for key in ("loss", "b_noise", "adascale_gain"):
    d = max(abs(x[key] - y[key]) / abs(y[key]) for x, y in zip(a, b))
    print(f"DDP vs accumulation: {len(a)} logged steps, largest relative {key} difference {d:.2e}")
EOF
fi
echo "done: steps.md and steps_vs_batch.png under $OUT/*/"
