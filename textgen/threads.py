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
