"""Ray plumbing: start or join Ray, call actors with the engine's error rules, end them."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import exceptions as rex

from ...kernels.errors import EkkoError
from ..ports import Unavailable  # an actor did not answer (dead, restarting, or too slow)

_DOWN = (rex.RayActorError, rex.ActorUnavailableError, rex.GetTimeoutError,
         rex.ObjectLostError, rex.OwnerDiedError, rex.WorkerCrashedError)




def connect(cluster: str, attempts: int = 3) -> str:
    """Start Ray here quietly ("local") or join a running cluster; returns its address.

    Ray gives its raylet 30 s to register; on a loaded machine that can run
    out, so starting (or joining) is tried `attempts` times.
    """
    if not isinstance(cluster, str) or not cluster:
        raise EkkoError(f"cluster must be 'local', 'auto' or a Ray address, got {cluster!r}")
    if cluster not in ("local", "auto") and not ray.is_initialized():
        _reachable(cluster)
        attempts = 1  # a cluster someone else runs: once, and fail plainly
    for attempt in range(attempts):
        if ray.is_initialized():
            break
        try:
            _init(cluster)
        except Exception as e:  # noqa: BLE001 - Ray raises plain Exception on a slow start
            ray.shutdown()
            if attempt == attempts - 1:
                raise EkkoError(f"cannot start or join Ray ({cluster!r}): {e}") from None
    return ray.get_runtime_context().gcs_address


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Ray waits minutes on an address nobody answers at: look first, briefly."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise EkkoError(f"cluster must be 'local', 'auto', HOST:PORT or ray://HOST:PORT, "
                        f"got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise EkkoError(f"no Ray cluster answers at {address!r} "
                        f"({getattr(e, 'strerror', None) or e})") from None


def _init(cluster: str) -> None:
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if cluster == "local":
        # "local": a new instance, never one another process left on this machine
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                 configure_logging=True, **quiet)
    else:
        ray.init(address=cluster, **quiet)


PROBE_S = 2.0  # how long a probe of a replica (ping, watermarks) waits before asking again


class Helpers:
    """The background threads an engine part starts to call Ray, joined by its stop.

    Ray ends the whole process when a thread calls it after ray.shutdown()
    ("the core worker has already been shutdown"), so no such thread may
    outlive the engine that started it: `close()` refuses new ones and
    returns once every started one has (their Ray waits are bounded).
    """

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._lock = threading.Lock()

    def start(self, target: Callable[..., None], *args: Any, name: str) -> None:
        """Run target(*args) in a thread of its own, unless the owner has stopped."""
        thread = threading.Thread(target=target, args=args, daemon=True, name=name)
        with self._lock:
            if self._closed:
                return
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
        for t in threads:
            if t is not threading.current_thread():
                t.join()


def call(ref: Any, timeout: float) -> Any:
    """ray.get with the engine's error rules: EkkoError stays EkkoError, a dead actor is Unavailable.

    An actor whose constructor raised EkkoError (a shard refusing a damaged
    log) is dead for good: that error is raised, not Unavailable.
    """
    try:
        return ray.get(ref, timeout=timeout)
    except rex.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, EkkoError):
            raise type(cause)(str(cause)) from None
        if isinstance(cause, _DOWN):
            raise Unavailable(f"{type(cause).__name__}: {cause}") from None
        raise
    except _DOWN as e:
        refused = _refused(e)
        if refused is not None:
            raise EkkoError(refused) from None
        raise Unavailable(f"{type(e).__name__}") from None


def _refused(e: Exception) -> str | None:
    """The message of the EkkoError an actor's constructor raised, if that is why it died.

    Ray passes it on only as text: the last line of a traceback, the
    exception's class path and message.
    """
    if not getattr(e, "actor_init_failed", False):
        return None
    last = (getattr(e, "error_msg", "") or "").rstrip().rsplit("\n", 1)[-1]
    path, sep, message = last.partition(": ")
    module, _, name = path.rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    if sep and isinstance(cls, type) and issubclass(cls, EkkoError):
        return message
    return None


def _end(actors: list, directory: Path, owned: bool) -> None:
    """End an engine's actors and remove the directory it made."""
    for a in actors if ray.is_initialized() else []:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone, or Ray already shut down
            pass
    if owned:
        shutil.rmtree(directory, ignore_errors=True)

