"""Errors a user can cause with their data or data config, each with the fix in its message."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A problem with the user's data or data config. The message names the thing and the fix."""


class BadRowError(DataError):
    def __init__(self, path: str | Path, line: int | None, problem: str, repairable: bool = True,
                 fix: str | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        if fix is None:
            fix = ("set data.on_bad_rows=skip to skip such rows in training (their count is reported in summary.json "
                   "as bad_rows_skipped)")
            if repairable:
                fix += ", or on_bad_rows=missing in lowrank-ctr-predict to read the unparseable value as missing"
            fix = "Fix the row, or " + fix
        super().__init__(f"{where}: {problem}. {fix[0].upper() + fix[1:]}.")
        self.path, self.line = str(path), line


def check_input_file(path: str | Path, what: str) -> Path:
    """An existing, non-empty file, or one clear error saying which and how to fix it."""
    if path is None or str(path) in ("", "None", "null"):
        raise DataError(f"no {what} given: set it on the command line, e.g. data.train_path=/path/to/file")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what} {p} does not exist: check the path (relative paths are taken from {Path.cwd()})")
    if p.is_dir():
        raise DataError(f"{what} {p} is a directory: point it at a file")
    if p.stat().st_size == 0:
        raise DataError(f"{what} {p} is empty: it needs at least one data row")
    return p
