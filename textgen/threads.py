"""Run blocking torch work off the event loop in a thread that ends when the work does.

Why not ``asyncio.to_thread``: its executor's threads live on, and every thread that ever ran a
parallel torch op keeps an OpenMP (libgomp) thread team. Once teams hold more threads than the
machine has cores, libgomp stops spinning and every parallel region wakes its workers through the
kernel: on 2 cores that doubled the cost of a decode step in the engine's thread (measured: 12 ms
in the only thread using OpenMP, 25 ms once another live thread had used it). So model loading and
core building run here, and only the engine's inference thread keeps a team.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


async def run_in_own_thread(work: Callable[[], T], name: str = "textgen-setup") -> T:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = work()
        except BaseException as error:  # handed to the awaiting coroutine, which re-raises it
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await asyncio.shield(done)


class RequestThreads:
    """A few long-lived threads for per-request CPU work that must not run on the event loop: the
    content filter, counting a prompt's tokens, rendering a chat template, filtering a long output.

    None of that runs torch, so these threads never hold an OpenMP team (the reason above for
    ``run_in_own_thread``). They are few on purpose: Python code in a thread still takes the GIL in
    turns with the event loop, so a handful of busy threads keeps ``/health`` answering within a few
    switch intervals, where a thread per request would not under a burst; extra work waits its turn.
    """

    def __init__(self, workers: int = 2, name: str = "textgen-request") -> None:
        self._name = name
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._closed = False

    async def run(self, work: Callable[[], T]) -> T:
        if self._closed:
            # A request whose result arrived as its model was unloaded or the server stopped still needs
            # its last piece of work (filtering the text): it gets a thread of its own, not a 500.
            return await run_in_own_thread(work, name=f"{self._name}-straggler")
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def close(self) -> None:
        """Stop the threads once their queued work is done; work handed in later still runs (see ``run``)."""
        self._closed = True
        self._executor.shutdown(wait=False)
