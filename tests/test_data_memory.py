"""benchmarks/data_memory.py --quick: training on a lazily read shard needs no more memory for a larger shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "data_memory.py"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_peak_memory_does_not_grow_with_the_shard(tmp_path):
    args = [sys.executable, str(SCRIPT), "--quick", "--json", "--threads", "1", "--tmp", str(tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    sizes, peaks = result["shard_gb"], result["peak_rss_mb"]
    assert len(sizes) == len(peaks) == 3
    assert sizes == sorted(sizes) and sizes[-1] >= 4 * sizes[0], sizes  # the shards really grow (8x by default)
    assert peaks[-1] <= 1.15 * peaks[0], f"peak RSS {peaks} MB for shards of {sizes} GB"
    assert max(peaks) <= 1.15 * min(peaks), f"peak RSS {peaks} MB for shards of {sizes} GB"
    assert not list(tmp_path.iterdir()), "the generated shards were not removed"
