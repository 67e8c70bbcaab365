"""The benchmark is not a test; this only checks that it runs end to end on a tiny load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_benchmark_smoke_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "smoke.json").read_text())
    assert {"p1", "p2", "p3", "p4", "p5"} <= set(results)
    assert results["p1"]["ftjobs"]["stored"] > 0 and results["p2"]["events"] == 300
    assert results["p3"]["measured"] > 0
    assert (tmp_path / "smoke.png").stat().st_size > 10_000
    assert "| P1 ingest |" in result.stdout
