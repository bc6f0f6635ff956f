"""How long ``write_report`` takes: on a finished run folder (given), and on the synthetic 100k-step run of
tests/test_report.py (metrics every step, an evaluation every 1000). Prints the import time of the report
module (matplotlib), three timings of each, and each page's size.

    HF_HUB_OFFLINE=1 python benchmarks/report_speed.py RUN_DIR
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))


def timed(run: Path, write_report) -> str:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        write_report(run)
        times.append(time.perf_counter() - start)
    return f"{', '.join(f'{t:.2f}' for t in times)} s; report.html {(run / 'report.html').stat().st_size / 1e3:.0f} kB"


if __name__ == "__main__":
    start = time.perf_counter()
    from rloo.report import write_report

    print(f"import rloo.report: {time.perf_counter() - start:.2f} s")
    print(f"{Path(sys.argv[1]).name}: {timed(Path(sys.argv[1]), write_report)}")
    from test_report import write_long_run

    long = Path(tempfile.mkdtemp()) / "long"
    write_long_run(long, 100_000)
    print(f"100k steps: {timed(long, write_report)}")
