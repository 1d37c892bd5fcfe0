"""benchmarks/gpu_tests_sharded.sh on the CPU: test ids dealt over shards, every test run once, the summary
line adds the shards' counts."""
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode", ["test", "file"])
def test_every_test_runs_once_and_the_summary_adds_up(tmp_path, mode):
    files = "tests/test_sort_rows_policy.py tests/test_layout.py"
    log = tmp_path / "tests.log"
    env = {**os.environ, "SHARD_FILES": files, "SHARD_BY": mode}
    r = subprocess.run(["bash", "benchmarks/gpu_tests_sharded.sh", "2", str(log)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    want = subprocess.run(["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", *files.split()], cwd=REPO,
                          capture_output=True, text=True, timeout=300).stdout
    n_want = int(re.search(r"(\d+) passed", want).group(1))
    summary = log.read_text().strip().splitlines()[-1]
    assert summary.startswith(f"shards: {n_want} passed, 0 failed"), summary
    assert log.read_text().count("==== shard") == 2
