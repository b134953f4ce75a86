import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))      # test helpers (gmm.py)
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def run_vidiff(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m vidiff ARGS` in a subprocess, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "vidiff", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
