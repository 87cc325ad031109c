"""Where the tests find the real datasets (Tiny Shakespeare, SST-2, Multi30k): the folder named by the environment
variable CPUFORMER_TEST_DATA, else ../shared/data beside the checkout. Tests that need it skip when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

DATA = Path(os.environ.get("CPUFORMER_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
