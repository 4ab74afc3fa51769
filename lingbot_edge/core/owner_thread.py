"""One thread that runs every call handed to it, in the order they come.

A compiled policy lives on one: torch.compile's CUDA graphs belong to the graph tree of the thread that
recorded them, and torch builds before mid-2026 (torch 2.11 included) fail an assertion when another thread
replays them. The server's worker, the control loop's worker, the LeRobot server's gRPC workers and the
evaluation loops all call the policy from threads of their own; with an `OwnerThread` every one of those
calls, and the compile and warm-up before them, runs on the same thread.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class OwnerThread:
    """Runs `run(fn, ...)` calls on its own thread, one at a time; a call made on that thread runs in place.

    Example:
        owner = OwnerThread("lingbot-policy")
        chunk = owner.run(policy_infer, obs)  # from any thread: blocks until the owner thread returns it
    """

    def __init__(self, name: str):
        # One worker: the executor starts one thread and keeps it for every call (it never retires idle ones).
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.ident = self._executor.submit(threading.get_ident).result()

    def run(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        """fn(*args, **kwargs) on the owner thread; its exception, if any, is raised here."""
        if threading.get_ident() == self.ident:  # a nested call: queueing it would wait on itself
            return fn(*args, **kwargs)
        return self._executor.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """Finish the queued calls and stop the thread."""
        self._executor.shutdown(wait=True)
