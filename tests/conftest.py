import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import Processes  # noqa: E402


@pytest.fixture
def processes(tmp_path):
    """Real processes that are reaped whatever the test's outcome."""
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.close()


def pytest_addoption(parser):
    parser.addoption(
        "--chaos-full",
        action="store_true",
        default=False,
        help="run the whole chaos matrix (tests/chaos) and print the fault x outcome table",
    )
