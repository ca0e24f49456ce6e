"""A run directory belongs to one run (issue 11, rule 1).

``claim(run_dir, identity)``:
- refuses a run of ANOTHER configuration into a directory that already holds one (its ``run.json``, or for
  directories written before ``run.json`` existed, its results.json / stage records) — the second run would leave
  its results next to the first run's checkpoints. The same configuration may come back (resume, a retried
  sweep job).
- takes a lock (``run.lock``, created with O_EXCL, holding host and pid) so two processes never write into one
  directory at once. A lock whose process is gone (same host, pid not alive) is stale: it is replaced, with a
  warning. ``release`` removes it; ``with claim(...)`` does both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from hydra.experimental.callback import Callback

from lowrank_ctr.config import UserError

log = logging.getLogger(__name__)
OWNER_FILE = "run.json"
LOCK_FILE = "run.lock"


class RunDirTaken(UserError):
    """The run directory holds another run, or another process is writing into it (nothing was written)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _previous_identity(run_dir: Path) -> tuple[str | None, str]:
    """The config hash the directory already belongs to, and where it was read from."""
    owner = run_dir / OWNER_FILE
    if owner.exists():
        try:
            return json.loads(owner.read_text()).get("config_hash"), str(owner)
        except (OSError, ValueError):
            return None, str(owner)
    from lowrank_ctr.pipeline.results import RESULTS_FILE

    for path in [run_dir / RESULTS_FILE, *sorted((run_dir / "stages").glob("*.json"))]:
        try:
            found = json.loads(path.read_text()).get("config_hash")
        except (OSError, ValueError):
            continue
        if found:
            return found, str(path)
    return None, ""


def check_owner(run_dir: Path, identity: str) -> None:
    previous, source = _previous_identity(Path(run_dir))
    if previous is not None and previous != identity:
        raise RunDirTaken(f"{run_dir} already holds a run of another configuration ({source}); a run directory "
                          "belongs to one run: choose a new hydra.run.dir, or resume that run with the overrides "
                          "it was started with")


def _acquire(lock: Path) -> None:
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            pid = holder.get("pid")
            same_host = holder.get("host") == me["host"]
            if isinstance(pid, int) and same_host and pid == os.getpid():
                return  # this process holds it already (e.g. a Hydra callback claimed it before the job ran)
            if isinstance(pid, int) and same_host and not _pid_alive(pid):
                log.warning("removing a stale lock %s (process %d is gone)", lock, pid)
                lock.unlink(missing_ok=True)
                continue
            raise RunDirTaken(f"{lock.parent} is in use by another run (process {pid} on {holder.get('host')}, "
                              f"since {holder.get('since')}): wait for it, or choose a new hydra.run.dir; if that "
                              f"process is gone, delete {lock}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise RunDirTaken(f"could not take the lock {lock}: another process keeps creating it")


def acquire(run_dir: Path, identity: str, command: str) -> None:
    """Check ownership, take the lock, and record the owner (first run only)."""
    run_dir = Path(run_dir)
    check_owner(run_dir, identity)
    run_dir.mkdir(parents=True, exist_ok=True)
    _acquire(run_dir / LOCK_FILE)
    try:
        check_owner(run_dir, identity)  # again under the lock: another run may have claimed it meanwhile
        owner = run_dir / OWNER_FILE
        if not owner.exists():
            tmp = owner.with_suffix(".tmp")
            tmp.write_text(json.dumps({"config_hash": identity, "command": command,
                                       "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
            tmp.replace(owner)
    except BaseException:
        release(run_dir)
        raise


def release(run_dir: Path) -> None:
    lock = Path(run_dir) / LOCK_FILE
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def claim(run_dir: Path, identity: str, command: str) -> Iterator[None]:
    acquire(run_dir, identity, command)
    try:
        yield
    finally:
        release(run_dir)


class RunDirGuard(Callback):
    """Hydra callback: refuse a run of another configuration into ``hydra.run.dir`` BEFORE Hydra writes its
    ``.hydra/`` files there (the pipeline checks again, under the lock, for in-process runs and sweep jobs)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        import sys

        from omegaconf import OmegaConf

        from lowrank_ctr.pipeline.records import run_identity

        try:
            run_dir = Path(str(config.hydra.run.dir))
            task = OmegaConf.to_container(config, resolve=False)
            task.pop("hydra", None)
            identity = run_identity(OmegaConf.create(task))
        except Exception:  # noqa: BLE001 - a config this cannot resolve is checked by the pipeline itself
            return
        try:
            check_owner(run_dir, identity)
        except RunDirTaken as exc:
            if os.environ.get("LOWRANK_CTR_DEBUG"):
                raise
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
