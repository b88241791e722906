#!/usr/bin/env bash
# Run on the lent GPU machine, in the repo's root (issue 25's checks; scripts/gpu_prepare.sh made .gpu/ here):
#   receive  (carrying .gpu/first)   keeps the model's first half in /tmp for the next call
#   run      (carrying .gpu/second)  joins the model, checks its checksum, then runs the GPU tests and `bench gpu`
# Logs go to $OUT (the device tool brings them back). PYTHON and BENCH_ARGS let a CPU machine rehearse it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # there, the python3 that holds PyTorch
STASH=/tmp/tokenmill-gpu
OUT=${OUT:-$STASH/out}
export TOKENMILL_HOME=$STASH/home PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$STASH/site
mkdir -p "$STASH" "$OUT"
case "${1:-}" in
  receive)
    cp .gpu/first/model.part "$STASH/first.part"
    ls -l "$STASH/first.part"
    ;;
  run)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STASH/site" \
      .gpu/second/*.whl
    model=$("$PYTHON" -c 'from tokenmill.loader import catalog; print(catalog.model_path("smollm2-135m"))')
    mkdir -p "$(dirname "$model")"
    cat "$STASH/first.part" .gpu/second/model.part > "$model"
    "$PYTHON" - "$model" <<'PY'
import hashlib, sys
from tokenmill.loader import catalog
digest = hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()
assert digest == catalog.entry_for("smollm2-135m").sha256, f"the joined model's checksum is {digest}"
PY
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
      "$PYTHON" -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers",
transformers.__version__, "triton", triton.__version__)'; } 2>&1 | tee "$OUT/machine.txt"
    status=0
    "$PYTHON" -m pytest -q -p no:cacheprovider --durations=15 tests/gpu tests/layers/test_triton_attention.py 2>&1 \
      | tee "$OUT/pytest.txt" || status=1
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
    "$PYTHON" -m tokenmill.cli bench gpu ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_gpu.txt" || status=1
    exit "$status"
    ;;
  *)
    echo "usage: $0 receive|run" >&2
    exit 2
    ;;
esac
