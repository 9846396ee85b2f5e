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
    parser.addoption(
        "--chaos-mode",
        choices=("async", "sync", "ssp"),
        default="async",
        help="the consistency mode of the chaos jobs (ssp runs with --staleness 2; default async)",
    )


def pytest_terminal_summary(terminalreporter):
    from support import CHAOS_TABLE

    if not CHAOS_TABLE:
        return
    write = terminalreporter.write_line
    write("")
    write(f"{'fault':<22} {'outcome':<8} {'accuracy':>8} {'done':>5} {'dead':>4} {'moved':>5} {'fenced':>6} "
          f"{'hung':>4} {'cut':>3} {'wall s':>6} {'restarts':<24} problems")
    for row in CHAOS_TABLE:
        wall = row.get("wall")
        write(
            f"{row['fault']:<22} {'pass' if row['ok'] else 'FAIL':<8} {row['accuracy'] or 0:>8.4f} "
            f"{row.get('done', '-'):>5} {row.get('dead', '-'):>4} {row.get('moved', '-'):>5} "
            f"{row.get('fenced', '-'):>6} {row.get('hung', '-'):>4} {row.get('cut', '-'):>3} "
            f"{'-' if wall is None else round(wall):>6} "
            f"{str(row.get('restarts', '')):<24} {'; '.join(row['problems'])}"
        )
