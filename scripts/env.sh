# Sourced by the scripts: keeps every tool off the network and its state inside the project
# (see docs/mlops-stack.md). Safe to source more than once.
# The project is where this file is, even in a shell that sourced another clone's env.sh first: that clone's
# venv, Prefect home and W&B folders would otherwise run this one's stages (its state folders are reset here).
_d2v_previous="${D2V_ROOT:-}"
D2V_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export D2V_ROOT
if [ -n "$_d2v_previous" ] && [ "$_d2v_previous" != "$D2V_ROOT" ]; then
  for _d2v_var in PREFECT_HOME WANDB_DIR WANDB_CONFIG_DIR WANDB_CACHE_DIR WANDB_DATA_DIR; do
    case "${!_d2v_var:-}" in "$_d2v_previous"/*) unset "$_d2v_var" ;; esac
  done
fi
unset _d2v_previous _d2v_var
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
