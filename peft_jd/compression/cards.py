"""Model cards (README.md with YAML metadata) of collections, shared bases and sigma adapters: the one generator,
used by `peft-jd compress` / `add` for the files they write and by `peft-jd push` for the Hub repos.

Cards are deterministic functions of the collection (no dates, no local paths), so re-pushing an unchanged collection
uploads no new card. Hub links are root-relative (`/org/repo`), which the Hub renders as links to its own pages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from huggingface_hub import ModelCardData

from ..core import ADAPTERS_DIR, BASES_DIR, REPORT_NAME, BasesConfig
from .report import CompressionReport, report_figures


TAGS = ["peft", "jdlora", "compress-then-serve", "lora"]
MAX_TABLE_ROWS = 100



def rank_text(bases_config: BasesConfig) -> str:
    """`16`, or `4–24 per module` for a budgeted collection."""
    if not bases_config.has_module_ranks():
        return str(bases_config.r)
    ranks = [bases_config.rank_of(key) for key in bases_config.modules]
    return f"{min(ranks)}–{max(ranks)} per module"

def human_size(num_bytes: int) -> str:
    size, unit = float(num_bytes), "B"
    for larger in ("kB", "MB", "GB"):
        if size < 1000:
            break
        size, unit = size / 1000, larger
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


def _front_matter(base_model: Optional[str], relation: Optional[str] = None) -> str:
    data = ModelCardData(base_model=base_model or None, library_name="peft", tags=TAGS,
                         base_model_relation=relation)
    return f"---\n{data.to_yaml()}\n---\n"


def _figures(figures: Mapping[str, float]) -> str:
    return ", ".join(f"{key} {value:.4g}" for key, value in sorted(figures.items())) or "—"


def _repo_link(repo_id: str, revision: Optional[str] = None, folder: Optional[str] = None) -> str:
    target = f"/{repo_id}" + (f"/tree/{revision or 'main'}/{folder}" if folder else
                              f"/tree/{revision}" if revision else "")
    label = repo_id + (f"/{folder}" if folder else "")
    return f"[{label}]({target})"


def _usage(location: str, subfolder: Optional[str] = None) -> str:
    folder = f', subfolder="{subfolder}"' if subfolder else ""
    return (
        "```python\nimport peft_jd  # registers the JD-LoRA method with PEFT\nfrom peft import PeftModel\n\n"
        f'model = PeftModel.from_pretrained(base_model, "{location}"{folder})\n```\n'
    )


# ------------------------------------------------------------------------------------- files written by compress
def bases_card(report: CompressionReport) -> str:
    """Card of `bases/` in a collection written by `compress`."""
    s = report.data["settings"]
    base_model = report.data.get("base_model_name_or_path")
    return (
        _front_matter(base_model)
        + f"\n# JD-LoRA shared bases\n\nShared bases of {report.data['num_adapters']} LoRA adapters"
        + (f" of `{base_model}`" if base_model else "")
        + f" compressed with `peft-jd compress` ({s['method']}, rank {s['rank']}, {s['clusters']} cluster(s) per "
        f"module, normalisation {'on' if s['normalize'] else 'off'}, seed {s['seed']}).\n\n"
        f"Target modules: {', '.join(report.data['target_modules'])}. The sigma adapters are in `../{ADAPTERS_DIR}/`; "
        f"see `../{REPORT_NAME}` for the errors of every adapter and module.\n"
    )


def collection_adapter_card(name: str, report: CompressionReport) -> str:
    """Card of `adapters/<name>/` in a collection written by `compress` or `add`."""
    entry = report.adapters[name]
    how = "projected onto the existing bases by `peft-jd add`" if entry.get("added") else "compressed jointly by " \
        "`peft-jd compress`"
    saved = f" Its `modules_to_save` ({entry['saved_params']:,} parameters) are stored uncompressed." \
        if entry.get("saved_params") else ""
    return (
        _front_matter(report.data.get("base_model_name_or_path"), "adapter")
        + f"\n# {name} (JD-LoRA sigma adapter)\n\n"
        f"The LoRA `{entry['source']}` {how} ({report.method}, rank {report.rank}); the shared bases are in "
        f"`../../{BASES_DIR}`.{saved}\n\n"
        f"Relative reconstruction error (‖ΔW−ΔŴ‖/‖ΔW‖)² over modules: {_figures(report_figures(entry))}.\n\n"
        "## Usage\n\n" + _usage("path/to/this/folder")
    )


# ----------------------------------------------------------------------------------------- Hub repos (push)
def sigma_card(
    name: str,
    repo_id: str,
    adapter_config: dict[str, Any],
    sigma_bytes: int,
    bases_config: BasesConfig,
    bases_repo: str,
    bases_revision: str,
    bases_subfolder: Optional[str] = None,
    report: Optional[Mapping[str, Any]] = None,
) -> str:
    """Card of one sigma adapter repo (layout with one repo per adapter).

    Args:
        report: The adapter's entry of the collection's `CompressionReport` (`report.adapters[name]`), if any.
    """
    base_model = adapter_config.get("base_model_name_or_path") or bases_config.base_model_name_or_path
    cluster = adapter_config.get("cluster")
    rows = [
        ("base model", f"`{base_model}`" if base_model else "—"),
        ("shared bases", f"{_repo_link(bases_repo, bases_revision, bases_subfolder)} at commit `{bases_revision}`"),
        ("bases fingerprint (sha256)", f"`{bases_config.fingerprint}`"),
        ("rank r / Σ", f"{rank_text(bases_config)} / {bases_config.sigma_type}"),
        ("cluster", "per module" if isinstance(cluster, dict) else str(cluster)),
        ("Σ file size", human_size(sigma_bytes)),
        ("compression report", _figures(report_figures(report)) if report else "—"),
    ]
    table = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    return (
        _front_matter(base_model, "adapter")
        + f"\n# {name} (JD-LoRA sigma adapter)\n\n"
        "A LoRA adapter compressed jointly with the rest of its collection (Compress then Serve, ICML 2025): this "
        f"repo holds only the adapter's Σ ({human_size(sigma_bytes)}); the shared bases U, V live in "
        f"{_repo_link(bases_repo)} and are loaded from the pinned commit `{bases_revision}` only.\n\n"
        + table + "\n## Usage\n\n" + _usage(repo_id)
    )


def collection_card(
    title_repo: str,
    bases_config: BasesConfig,
    bases_bytes: int,
    bases_revision: str,
    adapters: dict[str, dict[str, Any]],
    report: Optional[CompressionReport],
    bases_folder: Optional[str] = None,
) -> str:
    """Card of a collection: the bases repo (one repo per adapter) or the single repo holding everything.

    Args:
        title_repo: The repo the card is for.
        bases_config: Config of the pushed bases.
        bases_bytes: Size of the bases weights file.
        bases_revision: Commit the adapters pin.
        adapters: Index entries by adapter name (`repo`, `subfolder`, `cluster`).
        report: The collection's compression report, if it has one.
        bases_folder: Folder of the bases inside `title_repo` (single-repo layout).
    """
    base_model = bases_config.base_model_name_or_path
    lines = [
        _front_matter(base_model),
        f"\n# JD-LoRA collection: {len(adapters)} adapters" + (f" for `{base_model}`" if base_model else "") + "\n\n",
        "LoRA adapters compressed jointly (Compress then Serve, ICML 2025) into shared bases U, V per module plus a "
        "small Σ per adapter. Every adapter config pins the bases commit below and the sha256 of the bases file.\n\n",
        "| bases | |\n|---|---|\n",
        f"| location | {_repo_link(title_repo, bases_revision, bases_folder)} at commit `{bases_revision}` |\n",
        f"| fingerprint (sha256) | `{bases_config.fingerprint}` |\n",
        f"| rank r / Σ / method | {rank_text(bases_config)} / {bases_config.sigma_type} / {bases_config.method} |\n",
        f"| clusters / modules | {bases_config.num_clusters} / {len(bases_config.modules)} |\n",
        f"| size | {human_size(bases_bytes)} |\n",
        f"| report | {_figures(report.mean_figures()) if report else '—'} |\n\n",
        "## Adapters\n\n| adapter | location | cluster | report |\n|---|---|---|---|\n",
    ]
    for name in sorted(adapters)[:MAX_TABLE_ROWS]:
        entry = adapters[name]
        location = _repo_link(entry["repo"], folder=entry.get("subfolder"))
        cluster = entry.get("cluster")
        figures = report.adapter_figures(name) if report else {}
        lines.append(f"| {name} | {location} | {'per module' if isinstance(cluster, dict) else cluster} | "
                     f"{_figures(figures)} |\n")
    if len(adapters) > MAX_TABLE_ROWS:
        lines.append(f"\n… and {len(adapters) - MAX_TABLE_ROWS} more: see `jd_collection.json`.\n")
    first = adapters[sorted(adapters)[0]] if adapters else None
    if first:
        lines.append("\n## Usage\n\n" + _usage(first["repo"], first.get("subfolder")))
        lines.append("\nor list and pull with `peft-jd ls " + title_repo + "` / `peft-jd pull`.\n")
    return "".join(lines)
