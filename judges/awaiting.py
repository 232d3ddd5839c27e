"""A judge's answer from synchronous code, whether its method is ``def`` or ``async def``."""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any


async def _await(value):
    return await value


def run_sync(value: Any) -> Any:
    """``value``, awaited first if it is awaitable (an ``async def score``)."""
    if not inspect.isawaitable(value):
        return value
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(value))
    # Called from inside a running loop (an async caller): asyncio.run would refuse, so the
    # coroutine gets its own loop on a helper thread.
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = asyncio.run(_await(value))
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
