"""Two passes at the same time: one on a worker thread, the other on the caller's.

torch's intra-op thread count belongs to each thread: a thread takes the process's last setting at its first op and
keeps its own after that. On a CPU the two passes share the cores: each gets half the threads for the time they
run together (small passes use one core each better than two together).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

import torch

T = TypeVar("T")


class SideThread:
    """One worker thread: a pass started on it never runs beside another of its passes."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    @contextlib.contextmanager
    def beside(self, side: Callable[[], T], share_cores: bool) -> Iterator[Future]:
        """Starts side() on the worker; the block runs the caller's pass meanwhile. Yields side's future (its
        result() waits, and raises what side raised). share_cores: both get half the caller's threads — the caller
        until the block ends, the worker for the whole of side(); otherwise each keeps its own."""
        threads = torch.get_num_threads()
        half = max(1, threads // 2)
        task = (lambda: _on_threads(half, side)) if share_cores else side
        if share_cores:
            torch.set_num_threads(half)
        try:
            yield self._pool.submit(task)
        finally:
            torch.set_num_threads(threads)


def _on_threads(n: int, fn: Callable[[], T]) -> T:
    torch.get_num_threads()  # a thread's first op takes the process's last setting: take it now, then set ours
    torch.set_num_threads(n)
    return fn()
