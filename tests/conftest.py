import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = Path(os.environ.get("LOWRANK_CTR_SAMPLE_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def sample(*parts: str) -> Path:
    """Path of a real data sample, or skip the test cleanly when the samples are not beside the checkout."""
    p = SAMPLE_DIR.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data sample {p} not present")
    return p
