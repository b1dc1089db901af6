# Sourced by the scripts: keeps every tool off the network and its state inside the project
# (see docs/mlops-stack.md). Safe to source more than once.
D2V_ROOT="${D2V_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export D2V_ROOT
export DVC_NO_ANALYTICS=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_HOME="${PREFECT_HOME:-$D2V_ROOT/.prefect}"
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-90}"
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_ERROR_REPORTING=false WANDB_SILENT=true
export WANDB_DIR="${WANDB_DIR:-$D2V_ROOT/wandb}"
export WANDB_CONFIG_DIR="${WANDB_CONFIG_DIR:-$D2V_ROOT/wandb/.config}"
export WANDB_CACHE_DIR="${WANDB_CACHE_DIR:-$D2V_ROOT/wandb/.cache}"
export WANDB_DATA_DIR="${WANDB_DATA_DIR:-$D2V_ROOT/wandb/.data}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PATH="$D2V_ROOT/.venv/bin:$PATH"
