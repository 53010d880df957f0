#!/usr/bin/env bash
# One-shot GPU check of the JD-LoRA kernels, for a lent CUDA machine (run blind; see docs/kernels.md):
#   bash benchmarks/gpu_check.sh [extra gpu_check.py arguments]
# Runs tests/test_kernels_triton.py on CUDA and the Mistral-7B-shape kernel micro-benchmark, prints the JSON report
# and a table, and leaves gpu_check.json, gpu_check.log and nvidia-smi.txt in $OUT (or /tmp/gpu_check). Exit status:
# 0 when the tests passed, 1 when they failed or timed out (the benchmark still ran), 2 when no CUDA device was seen.
#
# Then, optionally, the vLLM step (benchmarks/gpu_vllm_check.py, at most GPU_VLLM_CHECK_TIMEOUT=280 s; skipped with
# GPU_VLLM_CHECK=0 or when no CUDA device was seen): vLLM's OpenAI server with the vllm_jd plugin on a tiny random
# Llama and a synthetic 100-adapter JD collection, both built locally — JD outputs must differ from the no-LoRA ones
# and repeat; req/s of no-LoRA vs JD bursts. It installs nothing: without an importable vLLM it prints
# "vLLM not installed: skipped". It leaves gpu_vllm_check.json ("status": passed / failed / error / skipped),
# gpu_vllm_check.log and gpu_vllm_check_server.log in $OUT, and never changes the exit status above.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-/tmp/gpu_check}"
mkdir -p "$out_dir"
python="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
# Kernel compilation is the slow part of a cold run; keep its cache with the outputs' machine-local temp space.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/gpu_check_triton_cache}"
unset TRITON_INTERPRET
nvidia-smi > "$out_dir/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$out_dir/nvidia-smi.txt"
timeout -k 10 "${GPU_CHECK_TIMEOUT:-285}" "$python" benchmarks/gpu_check.py --out "$out_dir/gpu_check.json" "$@" \
    2> >(tee "$out_dir/gpu_check.log" >&2)
status=$?
if [ "$status" -eq 124 ]; then
    echo "gpu_check.py hit the ${GPU_CHECK_TIMEOUT:-285}s limit; partial output is in $out_dir/gpu_check.log" >&2
fi

if [ "${GPU_VLLM_CHECK:-1}" != "0" ] && [ "$status" -ne 2 ]; then
    vllm_limit="${GPU_VLLM_CHECK_TIMEOUT:-280}"
    timeout -k 10 "$vllm_limit" "$python" benchmarks/gpu_vllm_check.py --time-budget "$((vllm_limit - 10))" \
        --out "$out_dir/gpu_vllm_check.json" 2> >(tee "$out_dir/gpu_vllm_check.log" >&2)
    vllm_status=$?
    if [ "$vllm_status" -eq 124 ]; then
        echo "gpu_vllm_check.py hit the ${vllm_limit}s limit; partial output is in $out_dir/gpu_vllm_check.json" >&2
    fi
    echo "vLLM step: exit status $vllm_status (report: $out_dir/gpu_vllm_check.json)" >&2
fi
exit "$status"
