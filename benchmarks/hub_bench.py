"""Push / pull time of N JD-LoRA sigma adapters (SmolLM2-135M shapes) against the local Hub server of the tests.

    python benchmarks/hub_bench.py                  # 1,000 adapters, both upload paths (several minutes)
    python benchmarks/hub_bench.py --quick          # 8 adapters, seconds

For each upload path ("regular": hf_xet enabled, server answers "regular"; "lfs": HF_HUB_DISABLE_XET=1, LFS batch →
PUT → verify) and each layout (one repo per adapter; one repo with subfolders) it measures: the first push, a re-push
of the unchanged collection (must upload nothing), a cold pull of every adapter (bases downloaded once) and a warm
pull of one adapter. The server runs in this process (loopback, no network latency, shares the GIL with the client):
the figures are client + protocol overhead, not Hub bandwidth. Prints JSON on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import emit, write_synthetic_collection
from transformers import LlamaConfig, LlamaForCausalLM


ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hub_server import WRITE_TOKEN, LocalHub, configure_hub_client  # noqa: E402

from hub_tools import pull_adapter, pull_collection, push_collection  # noqa: E402


def smollm2_shapes_model() -> LlamaForCausalLM:
    """SmolLM2-135M's architecture on the meta device: its q/k/v shapes without loading (or owning) the weights."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return model


def _measure(hub: LocalHub, fn, *args, **kwargs) -> tuple[dict, object]:
    requests, uploaded = len(hub.requests), hub.uploaded_bytes()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return {"seconds": round(time.perf_counter() - start, 3), "requests": len(hub.requests) - requests,
            "uploaded_bytes": hub.uploaded_bytes() - uploaded}, result


def bench_layout(hub: LocalHub, collection: Path, push_kwargs: dict, n: int, workers: int) -> dict:
    first, _ = _measure(hub, push_collection, collection, progress=False, **push_kwargs)
    again, result = _measure(hub, push_collection, collection, progress=False, **push_kwargs)
    if result.uploaded or again["uploaded_bytes"]:
        raise RuntimeError(f"re-push of an unchanged collection uploaded data ({push_kwargs})")
    bases_gets = hub.count("GET", r"jd_bases\.safetensors$")
    pull_all, pulled = _measure(hub, pull_collection, result.bases_repo, max_workers=workers)
    if len(pulled) != n or hub.count("GET", r"jd_bases\.safetensors$") - bases_gets != 1:
        raise RuntimeError(f"pull of {n} adapters did not download the bases exactly once ({push_kwargs})")
    one = pulled[sorted(pulled)[0]]
    warm, _ = _measure(hub, pull_adapter, one.repo_id, subfolder=one.subfolder)
    return {
        "push_s": first["seconds"], "push_requests": first["requests"],
        "push_uploaded_bytes": first["uploaded_bytes"], "push_per_adapter_ms": 1e3 * first["seconds"] / n,
        "repush_noop_s": again["seconds"], "repush_requests": again["requests"],
        "pull_all_cold_s": pull_all["seconds"], "pull_all_requests": pull_all["requests"],
        "pull_per_adapter_ms": 1e3 * pull_all["seconds"] / n, "pull_one_warm_s": warm["seconds"],
    }


def bench_mode(hub: LocalHub, mode: str, collection: Path, n: int, workers: int, home: Path) -> dict:
    import pytest

    hub.reset(lfs_uploads=mode == "lfs")
    layouts = {
        "repos": dict(bases_repo="org/bases", adapter_repo="org/{name}-jd", max_workers=workers),
        "subfolders": dict(repo="org/collection"),
    }
    with pytest.MonkeyPatch.context() as patcher:
        configure_hub_client(patcher, hub.endpoint, str(home / mode), WRITE_TOKEN, disable_xet=mode == "lfs")
        return {layout: bench_layout(hub, collection, kwargs, n, workers) for layout, kwargs in layouts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modes", nargs="+", choices=["regular", "lfs"], default=["regular", "lfs"])
    parser.add_argument("--workers", type=int, default=8, help="parallel adapter pushes / pulls")
    parser.add_argument("--quick", action="store_true", help="8 adapters, rank 8: a smoke run of the script")
    args = parser.parse_args()
    n, rank = (8, 8) if args.quick else (args.adapters, args.rank)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hub = LocalHub().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            start = time.perf_counter()
            write_synthetic_collection(tmp / "collection", smollm2_shapes_model(), n, r=rank)
            write_s = time.perf_counter() - start
            results = {mode: bench_mode(hub, mode, tmp / "collection", n, args.workers, tmp / "home")
                       for mode in args.modes}
            sizes = {"bases_bytes": (tmp / "collection/bases/jd_bases.safetensors").stat().st_size,
                     "sigma_bytes": (tmp / "collection/adapters/task-00000/adapter_model.safetensors").stat().st_size}
    finally:
        hub.stop()
    rows = [[mode, layout, f"{r['push_s']:.2f}", f"{r['repush_noop_s']:.2f}", f"{r['pull_all_cold_s']:.2f}",
             f"{r['pull_one_warm_s']:.3f}"] for mode, per in results.items() for layout, r in per.items()]
    emit({"adapters": n, "rank": rank, "workers": args.workers, "write_collection_s": round(write_s, 2), **sizes,
          "results": results}, rows, ["upload path", "layout", "push s", "re-push s", "pull all s", "pull one warm s"])


if __name__ == "__main__":
    main()
