#!/usr/bin/env bash
# Creates (or reuses) the virtualenv of the two public peer methods that benchmarks/fidelity.py --peers compares
# with: PyPI `lorashare` (the SHARE method) and `vlora-dev`. A benchmark-only tool: neither CI nor peft-jd needs it.
#
# The venv sees the main environment's packages (--system-site-packages): torch, peft, transformers, safetensors
# and peft-jd come from there, so nothing large is downloaded, and the two peers are installed with --no-deps so
# that they cannot replace any of them.
#
# Usage: bash benchmarks/peers_env.sh [VENV_DIR]     (default: .venv-peers at the repository root)
# Prints the venv's python path on its last line. Idempotent: a venv whose stamp matches is reused as is.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO_ROOT="$(pwd)"
VENV_DIR="${1:-${PEFT_JD_PEERS_VENV:-$REPO_ROOT/.venv-peers}}"
PEERS=("lorashare==0.1.3" "vlora-dev==1.0.0")
STAMP="$VENV_DIR/.peft-jd-stamp"
WANT_STAMP="${PEERS[*]};v1"
export PIP_DISABLE_PIP_VERSION_CHECK=1
CHECK='import lorashare, vlora, torch, peft, safetensors'

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]] && "$VENV_DIR/bin/python" -c "$CHECK" 2>/dev/null; then
    echo "$VENV_DIR/bin/python"
    exit 0
fi

rm -rf "$VENV_DIR"
python3 -m venv --system-site-packages "$VENV_DIR"
# git ignores the venv's files wherever it is created (Python < 3.13 does not write this file itself).
echo "*" > "$VENV_DIR/.gitignore"
PY="$VENV_DIR/bin/python"
"$PY" -m pip install --quiet --no-deps "${PEERS[@]}"
"$PY" -c "$CHECK"
echo "$WANT_STAMP" > "$STAMP"
echo "$PY"
