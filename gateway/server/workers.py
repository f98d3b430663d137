"""Running uvicorn for ``gateway serve``: one worker in this process, or a
supervisor over ``--workers N`` processes whose SIGHUP reloads the config.

uvicorn's own supervisor answers SIGHUP by starting a fresh set of workers
and stopping the old ones: every worker's circuits, quota blocks and
connections would start over, and each old worker would drain as on SIGTERM.
Here the supervisor passes SIGHUP on to each worker instead, and each worker
reloads its config in place (``gateway/server/reload.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess

log = logging.getLogger("gateway")

#: Set by ``gateway serve --workers N`` for its workers: the supervisor's pid,
#: which ``POST /admin/reload`` signals so that every worker reloads.
SUPERVISOR_ENV = "GATEWAY_SUPERVISOR_PID"


class ReloadingSupervisor(Multiprocess):
    """uvicorn's worker supervisor, with SIGHUP passed on to the workers."""

    def handle_hup(self) -> None:
        """SIGHUP every worker, without asking first whether it has started.

        A worker still starting ignores SIGHUP (``gateway serve`` sets SIG_IGN before it
        spawns them, they inherit it, and each keeps it until its handler is installed)
        and reads the config file as it starts. Asking first (uvicorn's ``is_ready``, a
        ping answered by a thread of the worker) would skip a started worker too busy
        to answer within the timeout, and that worker would keep the old config."""
        log.info("SIGHUP: every worker reloads the config")
        for process in self.processes:
            if process.pid is not None:
                # Gone meanwhile: the supervisor starts another, which reads the file.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)


def run(config: uvicorn.Config) -> None:
    """``uvicorn.run`` for a ready ``Config``, with ``ReloadingSupervisor`` for several workers."""
    if config.workers > 1:
        os.environ[SUPERVISOR_ENV] = str(os.getpid())
        sock = config.bind_socket()
        with contextlib.suppress(KeyboardInterrupt):
            ReloadingSupervisor(config, sockets=[sock]).run()
        return
    config.load_app()  # an import error stops here, as uvicorn.run does
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
