"""Following the README leaves no untracked folders in the checkout: every path a documented command writes to is
under ``outputs/`` (git-ignored), absolute, or a placeholder the user fills in."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: options of the documented commands that name where they WRITE
WRITE_OPTIONS = re.compile(r"(?:^|\s)(hydra\.run\.dir|hydra\.sweep\.dir|paths\.output_dir|data\.out_dir|out|output|"
                           r"--out|--output-dir|OUT|#SBATCH --output)[= ]([^\s`'\"\\]+)")


def _commands(readme: str) -> list[str]:
    """Shell lines of the README: fenced bash blocks and inline code that runs a command."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        lines += [line for line in block.splitlines() if line.strip()]
    lines += [span for span in re.findall(r"`([^`\n]+)`", readme)
              if span.startswith(("lowrank-ctr-", "jupyter ", "bash ", "OUT="))]
    return lines


def _is_placeholder(value: str) -> bool:
    """DIR, OUT, OUT.csv, DIR1, <time>, ...: the user chooses it."""
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[a-z]+)?", value)) or "<" in value or "..." in value \
        or value.startswith("$")


def test_readme_commands_write_only_under_outputs():
    readme = (REPO / "README.md").read_text()
    bad = []
    for line in _commands(readme):
        for option, value in WRITE_OPTIONS.findall(line):
            if value.startswith(("/", "outputs/", "~")) or value == "outputs" or _is_placeholder(value):
                continue
            bad.append(f"{option}={value} in: {line.strip()}")
    assert not bad, "README commands writing into the checkout (use outputs/...):\n" + "\n".join(bad)


def test_gitignore_covers_what_the_tools_leave_in_the_checkout():
    """outputs/, caches and the folders Jupyter, SLURM and test tools create are ignored (check-ignore: git's rule)."""
    probes = ["outputs/sweep/0/results.json", "data_cache/x/schema.json", "notebooks/.ipynb_checkpoints/a.ipynb",
              "slurm-123.out", ".pytest_cache/v", ".hypothesis/x", "lightning_logs/version_0/x", "multirun/x"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *probes], cwd=REPO, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(probes), f"not ignored: {set(probes) - set(r.stdout.split())}"
