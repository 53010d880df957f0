"""Load time and resident memory of many JD-LoRA sigma adapters on SmolLM2-135M (vs rank-16 LoRAs).

python benchmarks/load_bench.py                 # 1,000 adapters (about 2 minutes incl. writing them)
python benchmarks/load_bench.py --counts 10 50  # quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import current_rss_mb, emit, load_model, target_shapes, write_synthetic_collection
from peft import PeftModel

import peft_jd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 250, 500, 1000])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--per-adapter-sample",
        type=int,
        default=20,
        help="adapters loaded one by one through PeftModel.load_adapter, for comparison",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model()
    shapes = target_shapes(model)
    total = max(args.counts)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dirs = write_synthetic_collection(Path(tmp), model, total + args.per_adapter_sample + 1, r=args.rank)
        write_s = time.perf_counter() - start
        rss_before = current_rss_mb()
        peft_model = PeftModel.from_pretrained(model, dirs[0])
        loaded, rows, steps = 1, [], []
        for count in sorted(args.counts):
            batch = dirs[loaded : count + 1]
            start = time.perf_counter()
            peft_jd.load_adapters(peft_model, batch, progress=False)
            seconds = time.perf_counter() - start
            loaded = count + 1
            steps.append(
                {
                    "adapters_loaded": count,
                    "seconds_for_step": round(seconds, 3),
                    "ms_per_adapter": round(1000 * seconds / len(batch), 3),
                    "rss_mb": round(current_rss_mb() - rss_before, 1),
                }
            )
            rows.append([str(count), f"{seconds:.2f}", f"{1000 * seconds / len(batch):.2f}"])
        sample = dirs[loaded : loaded + args.per_adapter_sample]
        start = time.perf_counter()
        for path in sample:
            peft_model.load_adapter(path, adapter_name=Path(path).name)
        per_adapter_ms = 1000 * (time.perf_counter() - start) / max(1, len(sample))
    sigma_bytes = sum(args.rank * args.rank * 4 for _ in shapes)
    lora_params = sum(args.rank * (d_out + d_in) for d_out, d_in in shapes.values())
    bases_bytes = peft_model.base_model.shared_bases.nbytes()
    results = {
        "model": "SmolLM2-135M-Instruct",
        "modules": len(shapes),
        "rank": args.rank,
        "write_collection_s": round(write_s, 2),
        "bulk_load_steps": steps,
        "load_adapter_one_by_one_ms_per_adapter": round(per_adapter_ms, 2),
        "sigma_bytes_per_adapter_fp32": sigma_bytes,
        "lora_bytes_per_adapter_fp32": lora_params * 4,
        "lora_bytes_per_adapter_fp16": lora_params * 2,
        "bases_bytes_fp32": bases_bytes,
        "memory_ratio_lora_fp16_over_sigma_fp32_at_1000": round(
            1000 * lora_params * 2 / (1000 * sigma_bytes + bases_bytes), 1
        ),
    }
    emit(results, rows, ["adapters loaded", "step seconds", "ms / adapter"])


if __name__ == "__main__":
    main()
