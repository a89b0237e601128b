import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def warm_deepspeed():
    """Build DeepSpeed's CPU ops once per session (a no-op when ~/.cache/torch_extensions is warm)."""
    pytest.importorskip("deepspeed")
    venv = Path(sys.executable).resolve().parent.parent
    res = subprocess.run([str(REPO / "scripts" / "warm-deepspeed.sh"), str(Path(sys.prefix))],
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        pytest.fail(f"scripts/warm-deepspeed.sh failed:\n{res.stdout}\n{res.stderr}")
    return venv
