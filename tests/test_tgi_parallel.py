"""Tensor parallelism of the JD update with a real all-reduce: two gloo processes, each holding its shard.

The processes are forked (the parent's imports are reused) and run single-threaded, so the test takes seconds.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from forked_ranks import run_forked_ranks
from utils import dense_delta, make_collection, tiny_llama

from peft_jd.core import load_shared_bases
from tgi_patch.adapter_files import load_sigmas, read_spec
from tgi_patch.forward import apply_jd
from tgi_patch.state import JDBatchWeights, JDServingState
from tgi_patch.weights import COLUMN, ROW, TargetLayer


WORLD_SIZE = 2
NAMES = ["task-0", "task-1", "task-2"]
TOKEN_ADAPTERS = [None, "task-0", "task-2", "task-1", "task-1", None, "task-0"]


def _shard_output(root: str, parallel: str, rank: int, x: torch.Tensor, graph_safe: bool) -> torch.Tensor:
    bases = load_shared_bases(os.path.join(root, "bases"))
    key = "model.layers.1.self_attn.q_proj"
    targets = [TargetLayer(f"model.layers.{i}.self_attn.q_proj", parallel, 64, 64, torch.device("cpu"))
               for i in range(2)]
    state = JDServingState()
    for index, name in enumerate(NAMES, start=1):
        directory = os.path.join(root, "adapters", name)
        spec = read_spec(name, directory)
        state.use_bases(bases, name)
        sigmas = load_sigmas(spec, directory, bases.config, "bases")
        handle = state.prepare(name, sigmas, spec.cluster_of, "q_proj", targets, WORLD_SIZE, rank, torch.float32)
        state.bind(index, handle.slot)
    indices = torch.tensor([0 if a is None else NAMES.index(a) + 1 for a in TOKEN_ADAPTERS])
    batch = JDBatchWeights(state.layer_types["q_proj"], state.token_slots(indices))
    assert key == targets[1].module_key
    if parallel == ROW:
        # Row-parallel: this shard reads its slice of the input and produces the full (all-reduced) output.
        return apply_jd(batch, 1, x[:, rank * 32:(rank + 1) * 32].contiguous(), torch.zeros(len(x), 64),
                        dist.group.WORLD, graph_safe=graph_safe)
    return apply_jd(batch, 1, x, torch.zeros(len(x), 32), dist.group.WORLD, graph_safe=graph_safe)


def _worker(rank: int, root: str, port: int, results) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    outputs = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
        torch.manual_seed(0)
        x = torch.randn(len(TOKEN_ADAPTERS), 64)
        for parallel in (ROW, COLUMN):
            for graph_safe in (False, True):
                # Plain lists: torch's queue would share tensor memory with a process that is about to exit.
                outputs[(parallel, graph_safe, rank)] = _shard_output(root, parallel, rank, x, graph_safe).tolist()
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test with it
        outputs = {"error": f"rank {rank}: {exc!r}"}
    results.put(outputs)


def test_row_and_column_parallel_match_dense_reference(tmp_path):
    collection = make_collection(tmp_path, tiny_llama(), n_adapters=3, r=4, clusters=2)
    results = run_forked_ranks(_worker, (str(tmp_path),), world_size=WORLD_SIZE, timeout=120)
    results = {key: torch.tensor(value) for key, value in results.items()}
    torch.manual_seed(0)
    x = torch.randn(len(TOKEN_ADAPTERS), 64)
    key = "model.layers.1.self_attn.q_proj"
    expected = torch.stack([
        torch.zeros(64) if a is None else dense_delta(collection, a, key) @ x[t] for t, a in enumerate(TOKEN_ADAPTERS)
    ])
    for graph_safe in (False, True):
        for rank in range(WORLD_SIZE):
            torch.testing.assert_close(results[(ROW, graph_safe, rank)], expected, rtol=1e-5, atol=1e-5)
        column = torch.cat([results[(COLUMN, graph_safe, rank)] for rank in range(WORLD_SIZE)], dim=1)
        torch.testing.assert_close(column, expected, rtol=1e-5, atol=1e-5)
