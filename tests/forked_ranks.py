"""Runs a test's worker once per rank in forked processes that rendezvous over gloo (tensor-parallel tests on CPU).

No dependency beyond the standard library: the TGI integration tests import it in TGI's own environment.
"""

from __future__ import annotations

import multiprocessing
import socket
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_forked_ranks(worker: Callable, args: tuple, world_size: int, timeout: float) -> dict:
    """Calls `worker(rank, *args, port, queue)` for every rank in a forked process and merges the dicts they put on
    `queue`.

    Forked processes reuse the parent's imports, so this takes seconds. A worker reports its failure as
    `{"error": "..."}`, which fails the calling test with that message.

    Args:
        worker: The per-rank function; `port` is a free local port for `MASTER_PORT`.
        args: The worker's arguments between `rank` and `port`.
        world_size: Number of ranks.
        timeout: Seconds to wait for each rank's results.
    """
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    port = free_port()
    workers = [context.Process(target=worker, args=(rank, *args, port, queue)) for rank in range(world_size)]
    for process in workers:
        process.start()
    results = {}
    for _ in workers:
        results.update(queue.get(timeout=timeout))
    for process in workers:
        process.join(timeout=30)
    assert "error" not in results, results.get("error")
    return results
