"""The layering of docs/architecture.md, checked: the core imports neither peft nor transformers, imports point
downward only, and no module cycle exists (function-local imports included, so a cycle cannot be dodged)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("peft_jd", "hub_tools", "tgi_patch", "vllm_jd")

# Lower rank = lower layer. A module may import modules of its own or a lower rank.
LAYERS = (
    (0, ("peft_jd.core", "peft_jd.kernels", "peft_jd._compat")),
    (1, ("peft_jd.tuner",)),
    (2, ("peft_jd.bulk", "peft_jd.export", "peft_jd.compression", "peft_jd.cards")),
    (3, ("hub_tools", "peft_jd.export_cli")),
    (4, ("peft_jd.zoo", "peft_jd.cli", "peft_jd", "tgi_patch", "vllm_jd")),
)
ENGINES = ("tgi_patch", "vllm_jd")


def rank_of(module: str) -> int:
    best = None
    for rank, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), rank)
    assert best is not None, f"{module} is in no layer of docs/architecture.md"
    return best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "_boot" not in path.parts:  # TGI's sitecustomize shim runs before any package import
                modules[module_name(path)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (top level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_imports_point_downward(import_graph):
    upward = [
        f"{src} (layer {rank_of(src)}) imports {dst} (layer {rank_of(dst)})"
        for src, targets in import_graph.items()
        for dst in targets
        if rank_of(dst) > rank_of(src) and not (dst == "peft_jd" and src.startswith("peft_jd."))
    ]
    assert not upward, "\n".join(upward)


def test_engines_use_only_the_core(import_graph):
    wrong = [
        f"{src} imports {dst}"
        for src, targets in import_graph.items()
        if src.split(".")[0] in ENGINES
        for dst in targets
        if dst.split(".")[0] not in ENGINES and rank_of(dst) != 0
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles(import_graph):
    # Package __init__ files re-export their submodules; an edge into a package's own __init__ from inside it is
    # Python's package mechanics, not a dependency.
    graph = {
        src: {dst for dst in targets if not src.startswith(dst + ".")} for src, targets in import_graph.items()
    }
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


BLOCK_PEFT_AND_TRANSFORMERS = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("peft", "transformers"):
            raise ModuleNotFoundError(f"blocked: {name}", name=name)

sys.meta_path.insert(0, Block())
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_PEFT_AND_TRANSFORMERS + code], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )


def test_core_imports_and_works_without_peft_and_transformers(tmp_path):
    code = f"""
import torch
import peft_jd.core as core
import peft_jd.kernels as kernels
assert "peft" not in sys.modules and "transformers" not in sys.modules, sorted(sys.modules)
U, V = torch.randn(1, 6, 2, dtype=torch.float64), torch.randn(1, 5, 2, dtype=torch.float64)
config = core.BasesConfig(r=2, sigma_type="full", num_clusters=1, base_model_name_or_path=None,
                          target_modules=["q_proj"], modules={{}})
config = core.write_bases({str(tmp_path / 'bases')!r}, {{"m.q_proj": (U, V)}}, config)
spec = core.AdapterSpec.from_config({{"peft_type": "JDLORA", "r": 2, "sigma_type": "full"}}, "a")
core.validate_against_bases(spec, {{"m.q_proj": torch.eye(2)}}, config)
try:
    core.validate_against_bases(spec, {{"m.q_proj": torch.full((2, 2), float("nan"))}}, config)
except core.AdapterFormatError:
    pass
else:
    raise SystemExit("NaN Σ accepted")
y = torch.zeros(1, 6, dtype=torch.float64)
x = torch.randn(1, 5, dtype=torch.float64)
stack = torch.stack([torch.zeros(2, 2), torch.eye(2)]).double()
kernels.jd_lora_apply(y, x, U, V, stack, torch.tensor([1]), torch.zeros(2, dtype=torch.long), backend="torch")
assert torch.allclose(y, x @ (U[0] @ V[0].T).T)
assert "peft" not in sys.modules and "transformers" not in sys.modules
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_tuner_names_say_what_is_missing_without_peft():
    code = """
import peft_jd
try:
    peft_jd.JDLoraConfig
except ImportError as exc:
    print("ImportError:", exc)
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ImportError: peft_jd.JDLoraConfig needs the PEFT tuner" in proc.stdout
    assert "Only peft_jd.core is usable" in proc.stderr
