"""Named points of a run at which a test stops the process, to see what a kill -9 there leaves.

    ETL_STOP_TRACE=<file>   appends each point reached ("move-shard#2": its 2nd time) to <file>
    ETL_STOP_AT=<point>     on reaching it, SIGKILLs this process (no cleanup of any kind runs), or
                            with ETL_STOP_PAUSE=<file>, creates <file> and waits until it is removed

Outside tests neither is set, and `reached` costs a dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import threading
import time

_counts: dict[str, int] = {}
_lock = threading.Lock()  # Beam's multi-threaded workers reach the same point at once


def reached(name: str) -> None:
    trace, stop_at = os.environ.get("ETL_STOP_TRACE"), os.environ.get("ETL_STOP_AT")
    if not (trace or stop_at):
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        point = f"{name}#{_counts[name]}"
        if trace:
            with open(trace, "a") as f:
                f.write(point + "\n")
    if point != stop_at:
        return
    pause = os.environ.get("ETL_STOP_PAUSE")
    if not pause:
        os.kill(os.getpid(), signal.SIGKILL)
    open(pause, "w").close()
    while os.path.exists(pause):
        time.sleep(0.02)
