"""Thread policy of the solvers: large GEMMs on all threads, small linear algebra on one, clusters in parallel.

The solvers interleave a few large skinny GEMMs over the stacked factors with many small `d×3k` / `3k×3k` calls
(QR/SVD/eigh of bases) and, with clusters, many medium GEMMs over one cluster's rows. With several intra-op threads
each such call pays a synchronisation, which on a busy 2-core machine costs milliseconds (measured: eigh of 48×48
0.15 ms on one thread, 14 ms on two; a 640×4096×16 GEMM 2.7 ms on one, 12.5 ms on two). So `few_threads()` runs a
solver on one intra-op thread, `gemm` lends the caller's threads back to large products only, and `parallel_map`
spreads independent per-cluster solves over Python threads (torch releases the GIL inside ops).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch


T = TypeVar("T")
R = TypeVar("R")
# Multiply-adds from which a GEMM is worth the intra-op threads (a whole 1000-adapter stack is ~1e9).
_MIN_PARALLEL_MACS = 1 << 27
_gemm_threads: list[int] = []
_local = threading.local()


@contextlib.contextmanager
def few_threads() -> Iterator[None]:
    """Runs the block on one intra-op thread; `gemm` and `parallel_map` inside use the count from before."""
    if _gemm_threads:
        yield
        return
    previous = torch.get_num_threads()
    _gemm_threads.append(previous)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        _gemm_threads.pop()


def available_threads() -> int:
    return _gemm_threads[-1] if _gemm_threads else 1


def gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b`, with all the caller's threads when it is large (and not inside a `parallel_map` worker)."""
    threads = available_threads()
    macs = a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
    if threads <= 1 or macs < _MIN_PARALLEL_MACS or getattr(_local, "worker", False):
        return a @ b
    torch.set_num_threads(threads)
    try:
        return a @ b
    finally:
        torch.set_num_threads(1)


def parallel_map(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`[function(x) for x in items]` on up to `available_threads()` Python threads (results in order)."""
    workers = min(len(items), available_threads())
    if workers <= 1 or getattr(_local, "worker", False):  # no nested pools
        return [function(item) for item in items]

    def run(item: T) -> R:
        _local.worker = True
        try:
            return function(item)
        finally:
            _local.worker = False

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, items))
