#!/usr/bin/env bash
# Build the device kit: what the GPU machine's image lacks for `launch/gpu_check.sh`.
#   bash launch/gpu_kit.sh            # run here (needs pip and PyPI), fills .gpu_kit/
# The GPU machine is offline and starts bare. Its image (Python 3.12, torch 2.11.0+cu130,
# Triton 3.6.0; launch/gpu_image_packages.txt lists every package in it) lacks the packages
# below, which travel as wheels in the git-ignored folder .gpu_kit/ (the device call names it in
# `carry`; docs/gpu.md). Also in the kit: PTB prepared as shards (`dist-lm prepare ptb`), since
# the device cannot download it. tests/bench/test_bench_gpu_kit.py checks, from KIT_WHEELS and the
# image list, that every import the check's code path needs is in one of the two.
# Variables: KIT (default .gpu_kit), DATA_DIR (default ../shared/data; PTB is downloaded when it
# does not hold ptb/), PYTHON (default: the README's .venv, set up here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.gpu_kit}
DATA_DIR=${DATA_DIR:-../shared/data}
if [ -z "${PYTHON:-}" ]; then
  # dist-lm itself prepares the PTB shards: set up the README's venv on a fresh clone
  if [ ! -x .venv/bin/dist-lm ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c .ci/constraints.txt -e .  # the CPU torch, pinned
  fi
  PYTHON=.venv/bin/python
fi
# PTB from DATA_DIR when it holds it, else downloaded by `dist-lm prepare` (sha256-checked)
data_args=(--download=True)
if [ -f "$DATA_DIR/ptb/ptb.train.txt" ]; then data_args=(--data_dir "$DATA_DIR" --download=False); fi

# One version each; the device installs them with --no-deps, so this list is closed under
# Requires-Dist up to what the image holds. Pure-python wheels except pydantic-core (cp312).
# Not here: wandb (the check runs with log.wandb_mode=disabled, and metrics/writer.py imports
# it only when W&B is on), optuna (only `dist-lm sweep` imports it), tokenizers/pyyaml/numpy/tqdm/
# einops/msgpack/ninja/psutil/py-cpuinfo/packaging (in the image).
KIT_WHEELS=(
  fire==0.7.1               # the CLI (dist_lm/__main__.py)
  termcolor==3.3.0          # fire's need
  webdataset==1.0.2         # the shard writer and reader (data/shards.py, data/streams.py)
  braceexpand==0.1.7        # webdataset's need
  deepspeed==0.19.8         # dist.engine=deepspeed (sdist only on PyPI: built here, no ops)
  hjson==3.1.0              # deepspeed's need
  pydantic==2.14.4          # deepspeed's config
  pydantic-core==2.50.5     # pydantic's need (binary, cp312 manylinux2014)
  annotated-types==0.8.0    # pydantic's need
  typing-inspection==0.4.5  # pydantic's need
  typing-extensions==4.16.0 # pydantic needs >= 4.16; the image's may be older
)
# Built here from the sdist when PyPI has no wheel (deepspeed: pure Python with DS_BUILD_OPS=0,
# its ops JIT-compile on first use).
SDIST_ONLY=(deepspeed)

PLATFORM=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64)
mkdir -p "$KIT"
rm -rf "$KIT.tmp"
mkdir -p "$KIT.tmp/wheels"
binary=()
sdist=()
for spec in "${KIT_WHEELS[@]}"; do
  name=${spec%%==*}
  if [[ " ${SDIST_ONLY[*]} " == *" $name "* ]]; then sdist+=("$spec"); else binary+=("$spec"); fi
done
echo "+ pip download ${binary[*]}"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORM[@]}" -d "$KIT.tmp/wheels" "${binary[@]}"
for spec in "${sdist[@]}"; do
  echo "+ pip wheel $spec (from its sdist, DS_BUILD_OPS=0)"
  "$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$KIT.tmp/src" "$spec"
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps -w "$KIT.tmp/wheels" "$KIT.tmp/src"/*
done
rm -rf "$KIT.tmp/src"
n=$(ls "$KIT.tmp/wheels"/*.whl | wc -l)
if [ "$n" -ne "${#KIT_WHEELS[@]}" ]; then
  echo "gpu_kit: expected ${#KIT_WHEELS[@]} wheels, got $n:" >&2
  ls "$KIT.tmp/wheels" >&2
  exit 1
fi

echo "+ dist-lm prepare ptb ${data_args[*]} --out $KIT.tmp/ptb"
"$PYTHON" -m dist_lm prepare ptb "${data_args[@]}" --out "$KIT.tmp/ptb"

printf '%s\n' "${KIT_WHEELS[@]}" > "$KIT.tmp/wheels.txt"
rm -rf "$KIT"
mv "$KIT.tmp" "$KIT"
echo "kit: $KIT"
ls -l "$KIT/wheels"
kit_kib=$(du -sk "$KIT" | cut -f1)
tree_kib=$(git ls-files -z --cached --others --exclude-standard \
  | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "kit size: $((kit_kib / 1024)).$(( (kit_kib % 1024) * 10 / 1024 )) MiB; with the working" \
  "tree: $(( (kit_kib + tree_kib) / 1024 )) MiB of the 64 MiB a device call may carry"
if [ $((kit_kib + tree_kib)) -gt $((64 * 1024)) ]; then
  echo "gpu_kit: kit and working tree exceed 64 MiB" >&2
  exit 1
fi
