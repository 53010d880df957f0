"""The public peer methods of `benchmarks/fidelity.py --peers`: `peer_compress.py` run in the peers' virtualenv.

The peers (PyPI `lorashare`, `vlora-dev`) are installed only in that venv (`bash benchmarks/peers_env.sh`), never in
the main environment, so they run in a subprocess; their reconstructions come back as plain PEFT LoRA folders that
the benchmark evaluates like any LoRA collection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Importable without the peers: they are imported only inside its compressors, in the peers' venv.
from peer_compress import NO_FIT_STATUS, REPORT_NAME


REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "peer_compress.py"
DEFAULT_PYTHON = REPO_ROOT / ".venv-peers" / "bin" / "python"


@dataclass(frozen=True)
class PeerResult:
    """Reconstructed LoRA folders (name → dir) and `peer_report.json`, or why there are none."""

    adapters: dict[str, Path] | None
    report: dict | None
    reason: str | None = None


def peers_python(explicit: Path | None) -> tuple[Path | None, str | None]:
    """The peers' python (`--peers-python`, else `.venv-peers/bin/python`), or `None` and why it cannot be used."""
    python = Path(explicit) if explicit else DEFAULT_PYTHON
    if not python.exists():
        return None, f"{python} does not exist; create the peers' venv with `bash benchmarks/peers_env.sh`"
    return python, None


def compress_with_peer(
    python: Path, method: str, loras: Mapping[str, Path], budget_bytes: float, out: Path, threads: int | None = None
) -> PeerResult:
    """Runs `peer_compress.py` for `method` on `loras` at `budget_bytes` per adapter, writing into `out`.

    Args:
        python: The peers' venv python.
        method: `"lorashare"` or `"vlora"`.
        loras: Name → PEFT LoRA folder.
        budget_bytes: Bytes per adapter, shared part amortised.
        out: Output folder (one LoRA folder per adapter and `peer_report.json`).
        threads: Torch threads of the subprocess (default: torch's).
    """
    command = [str(python), str(SCRIPT), "--method", method, "--budget-bytes", repr(float(budget_bytes))]
    command += ["--out", str(out), "--adapters", *(f"{name}={Path(path).resolve()}" for name, path in loras.items())]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        if done.returncode == NO_FIT_STATUS:
            return PeerResult(None, None, f"no setting fits: {last}")
        sys.stderr.write(done.stderr[-4000:])
        return PeerResult(None, None, f"peer_compress.py failed with status {done.returncode}: {last}")
    report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    return PeerResult({name: out / name for name in loras}, report)
