"""Where the Hydra configs live, the project's OmegaConf resolvers, and how user errors reach the terminal."""

from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Report a user's mistake as one line on stderr with exit code 2 instead of a traceback.

    Set LOWRANK_CTR_DEBUG=1 to get the full traceback.
    """
    try:
        yield
    except (ValueError, FileNotFoundError, KeyError) as exc:
        if os.environ.get("LOWRANK_CTR_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
