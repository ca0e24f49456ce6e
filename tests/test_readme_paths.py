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


def _runs(readme: str) -> list[tuple[str, list[str]]]:
    """(config name, overrides) of every documented lowrank-ctr-train / -compress command, continuation lines
    joined, each value of a multirun sweep list expanded."""
    import itertools
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    text = "\n".join(re.findall(r"```bash\n(.*?)```", readme, flags=re.S)).replace("\\\n", " ")
    lines = text.splitlines() + [s for s in re.findall(r"`([^`\n]+)`", readme) if s.startswith("lowrank-ctr-")]
    parser, out = OverridesParser.create(), []
    for line in lines:
        line = line.split(" #", 1)[0].strip()
        for command, config in (("lowrank-ctr-train ", "train"), ("lowrank-ctr-compress ", "compress")):
            if command not in line:
                continue
            words = [w for w in shlex.split(line.split(command, 1)[1].split("|")[0]) if w not in ("-m", "--multirun")]
            overrides = [w for w in words if "=" in w and "<" not in w and "..." not in w]
            if any(_is_placeholder(w.split("=", 1)[1]) for w in overrides if not w.endswith("=")) \
                    or any(w.startswith("hparams_search=") for w in overrides):
                continue  # data=NAME ...: the user fills it in; a search's ranks come from its sweeper
            choices = [[str(v) for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
                       for o in parser.parse_overrides(overrides)]
            keys = [o.split("=", 1)[0] for o in overrides]
            for combo in itertools.product(*choices):
                out.append((config, [v if "=" in v else f"{k}={v}" for k, v in zip(keys, combo)]))
    return out


def test_readme_commands_are_valid_configs(tmp_path):
    """Every documented train / compress command composes and passes config validation (a default that changed
    under the README would fail here). Problems that only a user's files can fix (data or checkpoint paths, a GPU)
    are left out."""
    from helpers import compose_cfg

    from lowrank_ctr.validate import problems

    runs = _runs((REPO / "README.md").read_text())
    assert len(runs) > 20  # the parser still finds the commands
    user_side = ("data file", "train_path", "ckpt_path", "CUDA", "GPU", "does not exist", "not found", "no such")
    bad = []
    for config, overrides in runs:
        try:
            cfg = compose_cfg(config, overrides, tmp_path / "run", tmp_path / "cache")
        except Exception as exc:  # noqa: BLE001 - a README command Hydra refuses is the finding
            bad.append(f"{config} {' '.join(overrides)}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        found = [p for p in problems(cfg) if not any(u in p for u in user_side)]
        bad += [f"{config} {' '.join(overrides)}: {p}" for p in found]
    assert not bad, "README commands that fail validation:\n" + "\n".join(bad)
