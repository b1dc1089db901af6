#!/usr/bin/env bash
# Set up (idempotent), then run the whole pipeline on the embedded default data with DVC:
# prepare -> shard -> pretrain -> finetune -> evaluate -> report (reports/benchmark.{md,html}).
# `D2V_PROFILE=smoke bash scripts/demo.sh` runs the seconds-per-stage profile instead of the CPU demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
if [ -z "${D2V_PROFILE:-}" ] && ! python -c "import sys, torch; from d2v.precision import cpu_bf16
sys.exit(0 if torch.cuda.is_available() or cpu_bf16() else 1)"; then
  # the measured stages on a 2-core fp32-only EPYC: benchmarks/RESULTS.md, "The demo's wall time"
  echo "demo: this CPU has no bf16 hardware (AMX or AVX512-BF16), so every stage runs fp32: on 2 cores expect" \
    "about 2 hours (about 50 minutes where bf16 runs in hardware). Progress bars show each stage." >&2
fi
if [ -n "${D2V_PROFILE:-}" ]; then
  dvc exp run -S "profile=${D2V_PROFILE}" "$@"
else
  dvc repro "$@"
fi
echo "report: $(pwd)/reports/benchmark.html (and benchmark.md)"
