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


def test_each_shard_gets_its_share_of_the_cores(tmp_path):
    """BLAS/OpenMP threads capped at nproc // n per shard (8 shards × 16 threads on 16 cores stopped 7 of 8
    shards at 40ddb40); a value the caller sets is kept. One file over two shards: the empty shard runs
    nothing (pytest without arguments would have run the whole suite)."""
    probe = tmp_path / "test_threads_probe.py"
    probe.write_text("import os\n\ndef test_env():\n"
                     f"    open({str(tmp_path / 'seen')!r} + os.environ['OMP_NUM_THREADS'] + '_' + "
                     "os.environ['OPENBLAS_NUM_THREADS'] + '_' + os.environ['MKL_NUM_THREADS'], 'w').close()\n")
    for preset, want in ((None, max(1, os.cpu_count() // 2)), ("3", 3)):
        env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
        env.update(SHARD_FILES=str(probe), SHARD_BY="file")
        if preset:
            env.update(OMP_NUM_THREADS=preset, OPENBLAS_NUM_THREADS=preset, MKL_NUM_THREADS=preset)
        r = subprocess.run(["bash", "benchmarks/gpu_tests_sharded.sh", "2", str(tmp_path / "log")], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (tmp_path / f"seen{want}_{want}_{want}").exists(), sorted(p.name for p in tmp_path.iterdir())
        assert "(no items)" in (tmp_path / "log").read_text()


def test_a_stopped_shard_lists_the_tests_it_never_ran(tmp_path):
    """A shard stopped by SHARD_TIMEOUT names each of its items without a verdict (at 456b6df two shards
    stopped at ~93 % and their logs could not say which tests had not run)."""
    import shutil
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "tests").mkdir()
    shutil.copy(REPO / "benchmarks" / "gpu_tests_sharded.sh", tmp_path / "benchmarks")  # it runs from its repo root
    (tmp_path / "tests" / "test_stop_probe.py").write_text(  # an id with spaces ran: it must not be listed
        "import time\n\nimport pytest\n\n\n@pytest.mark.parametrize('x', [1], ids=['a b'])\n"
        "def test_fast(x):\n    pass\n\ndef test_slow():\n    time.sleep(60)\n\n"
        "def test_after():\n    pass\n")
    log = tmp_path / "log"
    env = {**os.environ, "SHARD_FILES": "tests/test_stop_probe.py", "SHARD_TIMEOUT": "15"}
    r = subprocess.run(["bash", "benchmarks/gpu_tests_sharded.sh", "1", str(log)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    text = log.read_text()
    not_run = sorted(line.split("::")[-1] for line in text.splitlines() if line.startswith("NOT RUN "))
    assert not_run == ["test_after", "test_slow"], text
    assert "1 stopped by SHARD_TIMEOUT" in text and "2 items they never ran" in text.splitlines()[-1]
