#!/usr/bin/env bash
# Set up (idempotent), lint, then run the default test suite (unit + e2e; `slow` and `gpu` deselected).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
ruff check d2v pipelines tests benchmarks
exec python -m pytest "$@"
