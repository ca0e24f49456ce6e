"""Where the Hydra configs live, the project's OmegaConf resolvers, and how user errors reach the terminal."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from pathlib import Path
from typing import Iterator

from omegaconf import OmegaConf

import lowrank_ctr.quiet  # noqa: F401  (filters dependency messages a user cannot act on; see quiet.py)

_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE_DIR.parents[1]  # the checkout, for an editable install


def conf_dir() -> Path:
    """The top-level ``conf/`` of a source checkout, else the copy shipped inside the package."""
    for candidate in (_SOURCE_ROOT / "conf", _PACKAGE_DIR / "conf"):
        if (candidate / "train.yaml").exists() or (candidate / "prepare.yaml").exists():
            return candidate
    raise FileNotFoundError("lowrank_ctr: no conf/ directory found beside the package; reinstall the package")


def project_root() -> Path:
    """Root for outputs and caches: $LOWRANK_CTR_ROOT, else the source checkout, else the working directory."""
    env = os.environ.get("LOWRANK_CTR_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    if (_SOURCE_ROOT / "pyproject.toml").exists() and (_SOURCE_ROOT / "conf").exists():
        return _SOURCE_ROOT
    return Path.cwd()


def sweep_group() -> str:
    """A W&B group per Hydra multirun (its sweep directory's name); single runs share the group ``runs``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else "runs"
    except (ValueError, ImportError):
        return "runs"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("sweep_group"):
        OmegaConf.register_new_resolver("sweep_group", sweep_group)


register_resolvers()

CONF_DIR = str(conf_dir())


class UserError(ValueError):
    """A mistake in a command line or config; the message names the key and the fix."""


DEBUG_ENV = "LOWRANK_CTR_DEBUG"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's convention for a process ended by SIGINT
_OS_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EISDIR: "it is a directory, but a file is needed",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.ENOENT: "it does not exist",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EMFILE: "too many open files",
}
_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) "
                            r"from checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))")


def _os_message(exc: OSError, where: str) -> str:
    """An operating-system error as one line: what failed, on which file, and what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free some space, or write to another disk ({where})"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"check the permissions, or choose a location you can write to ({where})"
    elif exc.errno == errno.EISDIR:
        fix = "give a file path, not a directory"
    else:
        fix = f"check the path ({where})"
    if exc.filename is not None:
        reason = _OS_REASONS.get(exc.errno or -1) or exc.strerror or str(exc)
        return f"{exc.filename}: {reason}: {fix}"
    # pyarrow names the file in the message itself ("Failed to open local file '...'. Detail: ...")
    return f"{(exc.strerror or str(exc)).strip().rstrip('.')}: {fix}"


def user_message(exc: BaseException, where: str = "the output path settings") -> str | None:
    """The one-line message for an error a user can cause, or None for a bug (which keeps its traceback).

    ``where`` names the settings (and paths) a command writes to, for the fix of an OS error that names no file."""
    if isinstance(exc, KeyError):
        return str(exc.args[0]) if exc.args else str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return (f"an input is not UTF-8 text ({exc.reason} at byte {exc.start}): give the raw text file (is it "
                "binary or compressed?)")
    if isinstance(exc, OSError):
        return str(exc) if exc.errno is None else _os_message(exc, where)  # errno None: raised by us, with the fix
    if isinstance(exc, ValueError):
        return str(exc)
    if isinstance(exc, RuntimeError) and "size mismatch for" in str(exc):
        found = _SIZE_MISMATCH.findall(str(exc))
        shown = "; ".join(f"{name}: checkpoint {a[11:-1]} vs config {b[11:-1]}" for name, a, b in found[:2])
        more = f" (and {len(found) - 2} more)" if len(found) > 2 else ""
        source = getattr(exc, "checkpoint", None) or "the checkpoint"
        return (f"{source} does not fit the model this config builds ({shown or 'tensor shapes differ'}{more}): use "
                "the model settings it was trained with (model=..., model.embedding_dim, model.mlp, ...), or another "
                "checkpoint")
    return None


def in_checkpoint(exc: BaseException, path: str | os.PathLike) -> BaseException:
    """Attach the checkpoint a shape mismatch came from, so its one-line message names the file."""
    exc.checkpoint = str(path)
    return exc


@contextlib.contextmanager
def user_errors(where: str = "the output path settings") -> Iterator[None]:
    """Report a user's mistake as one line on stderr instead of a traceback: config and data mistakes, operating
    system errors (permissions, read-only or full disks, a directory where a file belongs), a checkpoint whose
    shapes do not fit the config, and Ctrl-C. Exit code 2 (130 for Ctrl-C).

    Commands leave nothing half-written when interrupted (they write under temporary names and rename when
    complete), so Ctrl-C only needs its one line. Set LOWRANK_CTR_DEBUG=1 to get the full traceback.
    """
    try:
        yield
    except KeyboardInterrupt:
        if os.environ.get(DEBUG_ENV):
            raise
        print("interrupted (Ctrl-C): nothing half-written was kept; run the same command again to redo it",
              file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised with its traceback
        message = user_message(exc, where)
        if message is None or os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
