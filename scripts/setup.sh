#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian/Ubuntu machine: system packages, a virtual environment, the project.
# Root runs apt-get directly; other users need sudo. Re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh

# Debian packages: the embedded default data (Fashion-MNIST, espeak-ng voices, KLettres/KTuberling
# recordings), sox for audio synthesis, libsndfile for soundfile, git for DVC.
APT_PKGS=(dataset-fashion-mnist espeak-ng sox klettres-data ktuberling-data libsndfile1 git)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# Reinstall only when pyproject.toml or constraints.txt (the pinned versions) changed since the last install.
stamp=.venv/.d2v-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing the project and its dependencies into .venv (torch wheels: about a minute)"
  # PyPI's torch for x86_64 brings ~3 GB of CUDA libraries: the venv needs ~7 GB, and pip unpacks each
  # wheel under $TMPDIR first. Say so up front rather than fail half-way with "No space left on device".
  for where in .venv "${TMPDIR:-/tmp}"; do
    free_mb=$(df -Pm "$where" | awk 'NR==2 {print $4}')
    if [ -n "$free_mb" ] && [ "$free_mb" -lt 8000 ]; then
      echo "setup: only ${free_mb} MB free under $where; the install needs about 8,000 MB (torch with its" \
        "CUDA libraries). Free some space (or point TMPDIR elsewhere) if pip fails with 'No space left'" >&2
    fi
  done
  .venv/bin/python -m pip install -q --upgrade pip
  # The torch wheels pull about 3 GB of CUDA libraries from PyPI, and a connection dropped half-way
  # through one of them fails the whole install: resume each download, and retry the install twice.
  for attempt in 1 2 3; do
    if .venv/bin/python -m pip install -q --resume-retries 20 --timeout 60 -e ".[test]" -c constraints.txt; then
      break
    fi
    if [ "$attempt" -eq 3 ]; then
      echo "setup: pip install failed three times; check the free disk space (about 8 GB needed) and the" \
        "connection to PyPI, then rerun scripts/setup.sh" >&2
      exit 1
    fi
    echo "setup: pip install failed (attempt $attempt of 3); retrying in 10 s" >&2
    sleep 10
  done
  echo "$want" > "$stamp"
fi

# DVC never phones home from this project (also set in .dvc/config).
# the text demo's second task (movie-review sentiment) is in vaderSentiment's source archive only, not its
# wheel: fetched once from PyPI, checked by its sha256, read by `d2v prepare text` (d2v/modalities/text/data.py)
VADER=.venv/share/d2v/vaderSentiment-3.3.2.tar.gz
VADER_SHA256=5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9
if [ ! -f "$VADER" ] || ! echo "$VADER_SHA256  $VADER" | sha256sum -c --quiet >/dev/null 2>&1; then
  echo "setup: fetching vaderSentiment 3.3.2's source archive (the text sentiment task's data)"
  mkdir -p "$(dirname "$VADER")"
  rm -f "$VADER"
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d "$(dirname "$VADER")"
  if ! echo "$VADER_SHA256  $VADER" | sha256sum -c --quiet; then
    rm -f "$VADER"
    echo "setup: $VADER does not have the expected sha256; rerun scripts/setup.sh" >&2
    exit 1
  fi
fi

.venv/bin/dvc config --local core.analytics false >/dev/null 2>&1 || true
