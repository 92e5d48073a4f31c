"""Methods side by side (``compare --jobs N``): a thread per running method, each waiting on
its own worker processes; the work itself happens in those processes.

:func:`map_in_order` runs ``fn`` over the items with at most ``jobs`` at a time and returns
their results in item order. The first exception (an error, or Ctrl-C reaching the main
thread) stops the start of any further item — as a loop with one job would — waits for the
running ones, and is raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_in_order(fn: Callable[[T], list[R]], items: Sequence[T], jobs: int) -> list[R]:
    """``fn(item)`` for each item (lists, concatenated in item order), ``jobs`` at a time."""
    stop = threading.Event()  # set once anything raised: start no further item

    def one(item: T) -> list[R]:
        if stop.is_set():
            return []
        try:
            return fn(item)
        except BaseException:
            stop.set()
            raise

    if jobs <= 1:
        return [r for item in items for r in one(item)]
    pool = ThreadPoolExecutor(jobs)
    try:
        return [r for rs in pool.map(one, items) for r in rs]
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
