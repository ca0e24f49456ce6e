"""Following the README leaves no untracked folders in the checkout: every path a documented command writes to is
under ``outputs/`` (git-ignored), absolute, or a placeholder the user fills in."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: options of the documented commands that name where they WRITE: key=value (Hydra), --option value (argparse)
KEY_VALUE = re.compile(r"(?:^|\s)(hydra\.run\.dir|hydra\.sweep\.dir|paths\.output_dir|data\.out_dir|out|output|OUT"
                       r"|--output)=([^\s`'\"\\]+)")
OPTION_VALUE = re.compile(r"(?:^|\s)(--out|--output-dir|--output)\s+([^\s`'\"\\]+)")


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


def _tracked(path: str) -> bool:
    """A committed file, or a file in a committed folder (a benchmark's result in benchmarks/results/): re-running
    updates the repository's own results and creates no folder."""
    parent = str(Path(path).parent)
    for candidate in (path, parent):
        if candidate not in ("", ".") and subprocess.run(["git", "ls-files", "--error-unmatch", candidate], cwd=REPO,
                                                         capture_output=True).returncode == 0:
            return True
    return False


def _writes(line: str) -> list[tuple[str, str]]:
    line = line.strip()
    if line.startswith("#") and not line.startswith("#SBATCH"):
        return []  # a comment
    if not line.startswith("#SBATCH"):
        line = line.split(" #", 1)[0]  # a trailing comment
    return KEY_VALUE.findall(line) + OPTION_VALUE.findall(line)


def test_readme_commands_write_only_under_outputs():
    readme = (REPO / "README.md").read_text()
    bad = []
    for line in _commands(readme):
        for option, value in _writes(line):
            if value.startswith(("/", "outputs/", "~")) or value == "outputs" or _is_placeholder(value) \
                    or _tracked(value):
                continue
            bad.append(f"{option}={value} in: {line.strip()}")
    assert not bad, "README commands writing into the checkout (use outputs/...):\n" + "\n".join(bad)


def test_the_check_finds_a_command_that_writes_into_the_checkout():
    assert _writes("lowrank-ctr-export ckpt_path=x format=onnx out=serve/criteo-afm") == [("out", "serve/criteo-afm")]
    assert _writes("lowrank-ctr-report DIR --out report-here") == [("--out", "report-here")]
    assert _writes("#SBATCH --output=slurm-%j.out") == [("--output", "slurm-%j.out")]
    assert _writes("# a comment: output (../x)") == []
    assert not _tracked("serve/criteo-afm") and not _tracked("report-here")
    assert _tracked("README.md") and _tracked("experiments/results/compression_table/new.png")


def test_gitignore_covers_what_the_tools_leave_in_the_checkout():
    """outputs/, caches and the folders Jupyter, SLURM and test tools create are ignored (check-ignore: git's rule)."""
    probes = ["outputs/sweep/0/results.json", "data_cache/x/schema.json", "notebooks/.ipynb_checkpoints/a.ipynb",
              "slurm-123.out", ".pytest_cache/v", ".hypothesis/x", "lightning_logs/version_0/x", "multirun/x"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *probes], cwd=REPO, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(probes), f"not ignored: {set(probes) - set(r.stdout.split())}"
