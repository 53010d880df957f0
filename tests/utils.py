"""Shared test helpers: tiny config-built models and synthetic JD collections (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from peft_jd.core import ADAPTER_CONFIG_NAME, BasesConfig, write_bases, write_sigma_adapter
from peft_jd.tuner.config import JDLoraConfig


TARGETS = ["q_proj", "k_proj", "v_proj"]
TINY_NAME = "tiny-llama"


TINY_CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny_llama(seed: int = 0, name: str = TINY_NAME, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, **overrides})).eval()
    model.config._name_or_path = name
    return model


def tiny_mistral(seed: int = 0, name: str = "tiny-mistral") -> MistralForCausalLM:
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**TINY_CONFIG, sliding_window=16)).eval()
    model.config._name_or_path = name
    return model


def target_linears(model, targets=TARGETS) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets}


def make_collection(
    root: Path,
    model,
    n_adapters: int = 3,
    r: int = 4,
    clusters: int = 1,
    sigma_type: str = "full",
    seed: int = 0,
    base_model: str = TINY_NAME,
    sigma_scale: float = 0.5,
    module_ranks: dict[str, int] | None = None,
) -> dict:
    """Writes random bases + sigma adapters for `model` under `root`; returns the tensors for reference maths.

    `module_ranks` gives some modules their own rank (≤ r), as budgeted compression does."""
    gen = torch.Generator().manual_seed(seed)
    bases, sigmas = {}, {f"task-{i}": {} for i in range(n_adapters)}
    assignment = {f"task-{i}": i % clusters for i in range(n_adapters)}
    module_ranks = module_ranks or {}
    for key, lin in target_linears(model).items():
        k = module_ranks.get(key, r)
        U = torch.linalg.qr(torch.randn(clusters, lin.out_features, k, generator=gen))[0]
        V = torch.linalg.qr(torch.randn(clusters, lin.in_features, k, generator=gen))[0]
        bases[key] = (U.contiguous(), V.contiguous())
        for name in sigmas:
            shape = (k, k) if sigma_type == "full" else (k,)
            sigmas[name][key] = sigma_scale * torch.randn(shape, generator=gen)
    config = BasesConfig(
        r=r,
        sigma_type=sigma_type,
        num_clusters=clusters,
        base_model_name_or_path=base_model,
        target_modules=TARGETS,
        modules={},
    )
    config = write_bases(root / "bases", bases, config)
    for name, per_module in sigmas.items():
        adapter_config = JDLoraConfig(
            r=r,
            rank_pattern=config.rank_pattern(),
            sigma_type=sigma_type,
            target_modules=TARGETS,
            bases="../../bases",
            bases_fingerprint=config.fingerprint,
            cluster=assignment[name],
            base_model_name_or_path=base_model,
            task_type="CAUSAL_LM",
        )
        write_sigma_adapter(root / "adapters" / name, per_module, adapter_config)
    return {"bases": bases, "sigmas": sigmas, "clusters": assignment, "fingerprint": config.fingerprint}


def dense_delta(collection: dict, adapter: str, module_key: str) -> torch.Tensor:
    U, V = collection["bases"][module_key]
    c = collection["clusters"][adapter]
    sigma = collection["sigmas"][adapter][module_key]
    sigma = sigma if sigma.dim() == 2 else torch.diag(sigma)
    return U[c] @ sigma @ V[c].T


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def edit_adapter_config(adapter_dir: Path, **changes) -> None:
    """Sets `changes` in the adapter config of the folder `adapter_dir`, keeping its other fields."""
    path = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    path.write_text(json.dumps({**read_json(path), **changes}))
