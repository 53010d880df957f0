"""Compress LoRAs with a public peer method at a byte budget and write every adapter back as a plain PEFT LoRA.

Run with the peers' virtualenv (`bash benchmarks/peers_env.sh` creates it and prints its python):

    .venv-peers/bin/python benchmarks/peer_compress.py --method lorashare --adapters a=DIR b=DIR ... \\
        --budget-bytes 80640 --out OUT

Methods:
    lorashare  PyPI `lorashare` (the SHARE method): per module and side (A, B), a PCA basis of the factors of all
               adapters stacked side by side (feature dim × k), and per adapter k×r loadings per module and side.
    vlora      PyPI `vlora-dev`: per module and side, an SVD basis of the adapters' flattened factors (k × r·d) and
               their mean, and per adapter k loadings per module and side.

Setting: the number of components k, one for all modules (both packages' fixed-k mode). The largest k whose bytes
per adapter fit `--budget-bytes` is used, at most the k beyond which nothing more can be represented (lorashare:
the smallest feature dimension, its own clamp; vlora: n − 1, with the mean).

Bytes per adapter = (the adapter's own values + the shared values / n) × bytes per value, counting what
reconstruction needs (lorashare: components and loadings; vlora: components, means and loadings; not the singular
values vlora also saves). Both packages store float32, but a LoRA is served at fp16 and peft-jd counts the LoRAs at
2 bytes per value, so the values are counted at `--value-dtype` (default float16, 2 bytes) and rounded to it before
reconstruction: the quality measured is that of what is counted.

Writes OUT/<name>/adapter_config.json (the LoRA's own config, copied: same r, lora_alpha, target modules) and
adapter_model.safetensors (float32), and OUT/peer_report.json: the setting, bytes per adapter, and err² =
(‖ΔW − ΔŴ‖_F / ‖ΔW‖_F)² per adapter and module. Exits with status 3 when no setting fits the budget.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


# PEFT's file and key names, spelled here rather than imported from peft_jd: importing peft_jd imports PEFT (and
# bitsandbytes), which would triple the start-up time of this short script.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
REPORT_NAME = "peer_report.json"
NO_FIT_STATUS = 3
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SIDES = {"A": ".lora_A.weight", "B": ".lora_B.weight"}

# module key → (A (r, d_in), B (d_out, r))
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Shapes:
    """The collection's module shapes (module key → (r, d_in, d_out)) and number of adapters."""

    modules: dict[str, tuple[int, int, int]]
    n: int


@dataclass
class Compressed:
    """A peer's result: the reconstructed factors of every adapter and the values it stores."""

    factors: dict[str, Factors]
    own_values: dict[str, int]
    shared_values: int


def read_factors(adapter_dir: Path) -> Factors:
    """The LoRA factors of a PEFT folder by module key (PEFT's `base_model.model.` prefix removed)."""
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS_NAME))
    factors = {}
    for key, lora_a in tensors.items():
        if key.endswith(_SIDES["A"]):
            stem = key[: -len(_SIDES["A"])]
            module = stem[len(PEFT_KEY_PREFIX) :] if stem.startswith(PEFT_KEY_PREFIX) else stem
            factors[module] = (lora_a.float(), tensors[stem + _SIDES["B"]].float())
    if not factors:
        raise SystemExit(f"{adapter_dir}: no LoRA factors in {ADAPTER_WEIGHTS_NAME}; is it a PEFT LoRA folder?")
    others = [key for key in tensors if not key.endswith(tuple(_SIDES.values()))]
    if others:
        # The reconstruction holds factors only: extra tensors (modules_to_save, …) would be lost without a word.
        raise SystemExit(
            f"{adapter_dir}: holds tensors other than LoRA factors ({others[0]}, …); the peers' "
            "comparison covers plain LoRAs only."
        )
    return factors


def collection_shapes(originals: dict[str, Factors]) -> Shapes:
    """Module shapes shared by all adapters; both peers need the same modules and rank everywhere."""
    first_name, first = next(iter(originals.items()))
    modules = {key: (a.shape[0], a.shape[1], b.shape[0]) for key, (a, b) in first.items()}
    for name, factors in originals.items():
        shapes = {key: (a.shape[0], a.shape[1], b.shape[0]) for key, (a, b) in factors.items()}
        if shapes != modules:
            raise SystemExit(
                f"adapter {name!r} differs from {first_name!r} in its modules or ranks; both peers "
                "need LoRAs of one rank on the same modules."
            )
    return Shapes(modules, len(originals))


def lorashare_values(k: int, shapes: Shapes) -> tuple[int, int]:
    """(own, shared) values at k: k×r loadings per module and side; a d×k basis per module and side."""
    own = sum(2 * k * r for r, _, _ in shapes.modules.values())
    return own, sum(k * (d_in + d_out) for _, d_in, d_out in shapes.modules.values())


def vlora_values(k: int, shapes: Shapes) -> tuple[int, int]:
    """(own, shared) values at k: k loadings per module and side; k basis rows + the mean, each of r·d values."""
    own = 2 * k * len(shapes.modules)
    return own, sum((k + 1) * r * (d_in + d_out) for r, d_in, d_out in shapes.modules.values())


def _round(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype).float()


def run_lorashare(adapters: dict[str, Path], k: int, dtype: torch.dtype) -> Compressed:
    from lorashare import SHAREModel

    share = SHAREModel.from_adapters(
        {name: str(path) for name, path in adapters.items()}, num_components=k, device="cpu"
    )
    share.components = {key: _round(c, dtype) for key, c in share.components.items()}
    share.all_loadings = {
        name: {key: _round(t, dtype) for key, t in loadings.items()} for name, loadings in share.all_loadings.items()
    }
    factors = {}
    for name in adapters:
        weights = share.reconstruct(name)
        factors[name] = {
            key: (weights[f"{PEFT_KEY_PREFIX}{key}{_SIDES['A']}"], weights[f"{PEFT_KEY_PREFIX}{key}{_SIDES['B']}"])
            for key in {group.rsplit(":", 1)[0] for group in share.components}
        }
    own = {name: sum(t.numel() for t in share.all_loadings[name].values()) for name in adapters}
    return Compressed(factors, own, sum(c.numel() for c in share.components.values()))


def run_vlora(adapters: dict[str, Path], k: int, dtype: torch.dtype) -> Compressed:
    from vlora import SharedSubspace, load_adapter

    loaded = []
    for path in adapters.values():
        weights = load_adapter(path)
        # vlora-dev's SVD has no fp16 kernel on CPU: its inputs must be float32.
        weights.lora_a = {key: t.float() for key, t in weights.lora_a.items()}
        weights.lora_b = {key: t.float() for key, t in weights.lora_b.items()}
        loaded.append(weights)
    sub = SharedSubspace.from_adapters(loaded, task_ids=list(adapters), num_components=k)
    for store in (sub.components_a, sub.components_b, sub.means_a, sub.means_b):
        store.update({key: _round(t, dtype) for key, t in store.items()})
    for task in sub.tasks.values():
        task.loadings_a = {key: _round(t, dtype) for key, t in task.loadings_a.items()}
        task.loadings_b = {key: _round(t, dtype) for key, t in task.loadings_b.items()}
    factors = {}
    for name in adapters:
        weights = sub.reconstruct(name)
        factors[name] = {key: (weights.lora_a[key], weights.lora_b[key]) for key in weights.layer_names}
    own = {
        name: sum(t.numel() for side in (task.loadings_a, task.loadings_b) for t in side.values())
        for name, task in sub.tasks.items()
    }
    shared = sum(
        t.numel() for store in (sub.components_a, sub.components_b, sub.means_a, sub.means_b) for t in store.values()
    )
    return Compressed(factors, own, shared)


@dataclass(frozen=True)
class Peer:
    """How a peer counts its values at a setting k, the k range worth trying, and how it runs."""

    values: Callable[[int, Shapes], tuple[int, int]]
    min_k: int
    max_k: Callable[[Shapes], int]
    run: Callable[[dict[str, Path], int, torch.dtype], Compressed]


PEERS = {
    "lorashare": Peer(
        lorashare_values,
        1,
        # Its own clamp. k = n·r is not yet lossless: the basis comes from the centred factors, the loadings do not.
        lambda s: min(min(d_in, d_out) for _, d_in, d_out in s.modules.values()),
        run_lorashare,
    ),
    # k = 0 keeps only the mean of the adapters: the same update for every adapter, but what fits small budgets.
    "vlora": Peer(vlora_values, 0, lambda s: max(0, s.n - 1), run_vlora),
}


def bytes_per_adapter(own: float, shared: float, n: int, value_bytes: int) -> float:
    return (own + shared / max(1, n)) * value_bytes


def choose_k(peer: Peer, shapes: Shapes, budget: float, value_bytes: int) -> int | None:
    """The largest k whose bytes per adapter fit `budget`, or `None` when not even the smallest does."""
    fitting = [
        k
        for k in range(peer.min_k, peer.max_k(shapes) + 1)
        if bytes_per_adapter(*peer.values(k, shapes), shapes.n, value_bytes) <= budget
    ]
    return max(fitting, default=None)


def relative_error2(original: tuple[torch.Tensor, torch.Tensor], approx: tuple[torch.Tensor, torch.Tensor]) -> float:
    """(‖BA − B'A'‖_F / ‖BA‖_F)² from the factors' Gram matrices (r×r), without forming ΔW (the scalings match)."""
    (a, b), (a2, b2) = original, approx
    stacked_b = torch.cat([b.double(), -b2.double()], dim=1)
    stacked_a = torch.cat([a.double(), a2.double()], dim=0)
    diff = float(((stacked_b.T @ stacked_b) * (stacked_a @ stacked_a.T)).sum())
    norm = float(((b.double().T @ b.double()) * (a.double() @ a.double().T)).sum())
    return max(0.0, diff) / max(norm, 1e-30)


def _folder_name(name: str) -> str:
    """`name` as one folder inside the output (a plain subset of `peft_jd.core.check_path_component`, not imported: see
    above); a name from the command line never writes outside `--out`."""
    if not name or name in (".", "..") or any(ch in name for ch in "/\\\0") or name != name.strip():
        raise SystemExit(f"adapter name {name!r} cannot be a folder name; rename it (NAME=DIR).")
    return name


def write_outputs(out: Path, adapters: dict[str, Path], result: Compressed, report: dict) -> None:
    """One PEFT LoRA folder per adapter and the report, written beside `out` and renamed into place when complete
    (an interrupted run leaves a `.tmp-*` sibling, never an `out` that looks complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the result private
    if out.exists() and any(out.iterdir()) and not (out / REPORT_NAME).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"{out} is not empty and holds no {REPORT_NAME}: it was not written by peer_compress.py and "
                         "is left as it is; choose another --out.")
    try:
        for name, factors in result.factors.items():
            folder = tmp / _folder_name(name)
            folder.mkdir()
            tensors = {}
            for key, (lora_a, lora_b) in factors.items():
                tensors[f"{PEFT_KEY_PREFIX}{key}{_SIDES['A']}"] = lora_a.float().contiguous()
                tensors[f"{PEFT_KEY_PREFIX}{key}{_SIDES['B']}"] = lora_b.float().contiguous()
            save_file(tensors, str(folder / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
            # The LoRA's own config: r, lora_alpha (hence the scaling), targets and base model stay exactly as trained.
            shutil.copyfile(adapters[name] / ADAPTER_CONFIG_NAME, folder / ADAPTER_CONFIG_NAME)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_reconstruction(name: str, original: Factors, approx: Factors) -> None:
    """Every module of the LoRA comes back with its factors' shapes (so the copied config stays right)."""
    for key, (a, b) in original.items():
        if key not in approx or approx[key][0].shape != a.shape or approx[key][1].shape != b.shape:
            raise SystemExit(f"{name}: the peer did not reconstruct module {key} with the shapes of its LoRA.")


def compress(method: str, adapters: dict[str, Path], budget: float, out: Path, value_dtype: str) -> dict:
    """Compresses `adapters` with `method` at the largest setting that fits `budget`; returns the report."""
    peer, dtype = PEERS[method], VALUE_DTYPES[value_dtype]
    value_bytes = dtype.itemsize
    originals = {name: read_factors(path) for name, path in adapters.items()}
    shapes = collection_shapes(originals)
    k = choose_k(peer, shapes, budget, value_bytes)
    if k is None:
        smallest = bytes_per_adapter(*peer.values(peer.min_k, shapes), shapes.n, value_bytes)
        print(
            f"{method}: no setting fits {budget:,.0f} bytes per adapter (the smallest, k={peer.min_k}, needs "
            f"{smallest:,.0f} with {shapes.n} adapters).",
            file=sys.stderr,
        )
        raise SystemExit(NO_FIT_STATUS)
    start = time.perf_counter()
    result = peer.run(adapters, k, dtype)
    seconds = time.perf_counter() - start
    own = sum(result.own_values.values()) / shapes.n
    measured = bytes_per_adapter(own, result.shared_values, shapes.n, value_bytes)
    if measured > budget:
        raise SystemExit(
            f"{method}: k={k} stores {measured:,.0f} bytes per adapter, over the budget of "
            f"{budget:,.0f}: the value count of this peer version differs from this script's."
        )
    err2 = {}
    for name, factors in result.factors.items():
        check_reconstruction(name, originals[name], factors)
        err2[name] = {key: relative_error2(originals[name][key], factors[key]) for key in originals[name]}
    lora_values = sum(r * (d_in + d_out) for r, d_in, d_out in shapes.modules.values())
    report = {
        "method": method,
        "setting": {"num_components": k},
        "num_adapters": shapes.n,
        "value_dtype": value_dtype,
        "budget_bytes_per_adapter": budget,
        "bytes_per_adapter": measured,
        "own_values_per_adapter": own,
        "shared_values": result.shared_values,
        "lora_bytes_per_adapter": lora_values * 2,
        "memory_ratio": lora_values * 2 / measured if measured else None,
        "compress_s": seconds,
        "mean_err2": sum(sum(e.values()) / len(e) for e in err2.values()) / len(err2),
        "err2": err2,
    }
    write_outputs(out, adapters, result, report)
    return report


def _adapter_spec(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, Path(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=sorted(PEERS))
    parser.add_argument("--adapters", required=True, nargs="+", type=_adapter_spec, metavar="NAME=DIR")
    parser.add_argument("--budget-bytes", required=True, type=float, help="bytes per adapter, shared part amortised")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--value-dtype",
        default="float16",
        choices=sorted(VALUE_DTYPES),
        help="precision the values are counted and rounded at (default float16, as the LoRAs)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an --out that is not a peer output")
    args = parser.parse_args(argv)
    names = [name for name, _ in args.adapters]
    if len(set(names)) != len(names) or len(names) < 2:
        parser.error("--adapters needs at least two distinct NAME=DIR entries.")
    if args.out.exists() and any(args.out.iterdir()) and not (args.out / REPORT_NAME).is_file() and not args.overwrite:
        parser.error(f"{args.out} is not empty and holds no {REPORT_NAME}; pass --overwrite to replace it.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = compress(args.method, dict(args.adapters), args.budget_bytes, args.out, args.value_dtype)
    print(
        f"{args.method}: k={report['setting']['num_components']}, {report['bytes_per_adapter']:,.0f} bytes per "
        f"adapter ({report['memory_ratio']:.1f}× less than the LoRAs at fp16), mean err² {report['mean_err2']:.3f}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
