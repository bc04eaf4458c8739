import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_WEIGHTS = Path(os.environ.get("LORARAR_SHARED_WEIGHTS", REPO.parent / "shared" / "weights"))
sys.path.insert(0, str(REPO))



@pytest.fixture(scope="session")
def shared_weights() -> Path:
    if not (SHARED_WEIGHTS / "lorarar_sdxl_hypernet.pth").is_file():
        pytest.fail(f"published hypernets not found in {SHARED_WEIGHTS} (set LORARAR_SHARED_WEIGHTS)")
    return SHARED_WEIGHTS
