#!/usr/bin/env bash
# Run here, before a session's GPU checks (issue 25): makes ready what the lent GPU machine lacks, in .gpu/
# (git-ignored), for scripts/gpu_check.sh there. That machine reaches no network and takes 64 MiB a call, so
# SmolLM2's 94 MiB GGUF goes in two halves over two calls, and gguf, the one package the checks need that its
# image lacks (its torch, transformers, triton and tokenizers are its own), as a wheel for its Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
model=$("$PY" -c 'from tokenmill.loader import catalog; print(catalog.pull("smollm2-135m"))')
gguf_version=$("$PY" -c 'from importlib.metadata import version; print(version("gguf"))')
rm -rf .gpu
mkdir -p .gpu/first .gpu/second
half=$(( $(stat -c %s "$model") / 2 ))
head -c "$half" "$model" > .gpu/first/model.part
tail -c +$(( half + 1 )) "$model" > .gpu/second/model.part
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp -d .gpu/second "gguf==$gguf_version"
du -sh .gpu/first .gpu/second
echo "now: run 'bash scripts/gpu_check.sh receive' carrying .gpu/first, then at once (the machine goes back after"
echo "30 s idle) 'bash scripts/gpu_check.sh run' carrying .gpu/second"
