"""Reading a process tree while it runs: what the benchmarks sample of Ray's processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import psutil

T = TypeVar("T")


def read_tree(root: psutil.Process, read: Callable[[psutil.Process], T]) -> list[T] | None:
    """`read` of the root and of every descendant still alive (one that exits meanwhile is
    left out); None once the root itself is gone."""
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    found = []
    for process in processes:
        try:
            found.append(read(process))
        except psutil.Error:
            continue
    return found
