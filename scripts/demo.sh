#!/usr/bin/env bash
# Set up (idempotent), then run the whole pipeline on the embedded default data with DVC:
# prepare -> shard -> pretrain -> finetune -> evaluate -> report (reports/benchmark.{md,html}).
# `D2V_PROFILE=smoke bash scripts/demo.sh` runs the seconds-per-stage profile instead of the CPU demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
if [ -n "${D2V_PROFILE:-}" ]; then
  dvc exp run -S "profile=${D2V_PROFILE}" "$@"
else
  dvc repro "$@"
fi
echo "report: $(pwd)/reports/benchmark.html (and benchmark.md)"
