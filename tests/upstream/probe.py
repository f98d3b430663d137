"""One client call in a fresh process, for the suites that measure memory or need their own environment.

    python -m tests.upstream.probe MODE URL [TIMEOUT [PAUSE]]

MODE ``read`` reads the body whole, ``lines`` iterates ``line_batches``;
PAUSE seconds pass between the head and the first read, so a fast server's
whole body is waiting in the client by then.
Prints one JSON line: the outcome (``ok`` or the error's class and message),
the body size, the seconds taken, and how far the peak RSS rose during the
call (``VmHWM``) above the resident size just before it (``VmRSS``).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

from gateway.upstream.base import UpstreamError
from gateway.upstream.h1 import H1Client


def memory_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak) of this process from Linux ``/proc``.

    ``ru_maxrss`` is the fallback only: Linux carries it over ``exec`` from the
    forking parent, so in a child of a large test process it reports the
    parent's size rather than the client's.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def main(mode: str, url: str, timeout_s: float, pause_s: float) -> dict:
    client = H1Client()
    outcome, size = "ok", 0
    baseline = memory_kib("VmRSS")
    start = time.monotonic()
    try:
        response = await client.post(url, {}, b"{}", timeout_s)
        try:
            await asyncio.sleep(pause_s)
            if mode == "read":
                size = len(await response.read())
            else:
                async for batch in response.line_batches():
                    size += sum(len(line) for line in batch)
        finally:
            await response.close()
    except UpstreamError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001  # anything else is a finding: report it, do not hide it
        outcome = f"RAW {type(exc).__name__}: {exc}"
    finally:
        await client.close()
    elapsed = time.monotonic() - start
    peak = memory_kib("VmHWM")
    return {"outcome": outcome, "size": size, "elapsed": elapsed, "rss_rise_mib": (peak - baseline) / 1024}


if __name__ == "__main__":
    mode, url = sys.argv[1], sys.argv[2]
    timeout_s = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
    pause_s = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    print(json.dumps(asyncio.run(main(mode, url, timeout_s, pause_s))))
