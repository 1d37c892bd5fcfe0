"""The benchmark harness's plumbing, on the CPU: a tiny dry run writes the result file, the Markdown
table and (with matplotlib) the plot; provenance, scenes and the record format behave."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package
from benchmarks import layers, provenance, report, scenes  # noqa: E402


def test_slug_names_gpu_families():
    assert provenance.slug("NVIDIA H100 80GB HBM3") == "h100"
    assert provenance.slug("NVIDIA H200") == "h200"
    assert provenance.slug(None) == "cpu"
    assert provenance.slug("Some New Card 9000") == "some-new-card-9000"


def test_commit_override(monkeypatch):
    provenance.commit.cache_clear()
    monkeypatch.setenv("SPARSEVOX_RESULT_COMMIT", "abc1234")
    try:
        assert provenance.commit() == "abc1234"
        assert provenance.stem("cpu").endswith("-cpu-abc1234")
    finally:
        provenance.commit.cache_clear()


def test_crop_keeps_nearest_voxels():
    c = np.zeros((100, 4), np.int32)
    c[:, 1] = np.arange(100)
    out = scenes.crop(c, 10)
    assert out.shape == (10, 4)
    assert np.ptp(out[:, 1]) == 9  # one contiguous run around the median
    assert scenes.crop(c, 0) is c


def test_unknown_scene_is_a_value_error():
    with pytest.raises(ValueError, match="scene must be one of"):
        scenes.points_of("nope")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    rc = layers.main(["--cpu", "--out", str(out), "--stem", "2000-01-01-cpu-test", "--scenes", "lidar_synth",
                      "--channels", "4", "--dtypes", "float32", "--max-voxels", "300", "--warmup", "0",
                      "--repeats", "1"])
    assert rc == 0
    return out, json.loads((out / "2000-01-01-cpu-test-layers.json").read_text())


def test_dry_run_writes_design_records(dry_run):
    out, doc = dry_run
    for key in ("device", "date", "commit", "records"):
        assert key in doc
    ops = {r["op"] for r in doc["records"]}
    assert ops == {"map_build", "subm_fwd", "subm_fwd_bwd", "down", "up"}
    required = {"op", "scene", "n_voxels", "pairs", "c_in", "c_out", "dtype", "algo", "ms", "peer", "tflops",
                "cublas_fraction"}
    for r in doc["records"]:
        assert required <= set(r), r
    ran = [r for r in doc["records"] if r["op"] != "map_build" and r.get("ms")]
    explicit = [r for r in ran if r["algo"]["requested"] == "explicit_gemm"]
    assert explicit and all(r["algo"]["chosen"]["fwd"]["name"] == "explicit_gemm" for r in explicit)
    auto = [r for r in ran if r["algo"]["requested"] == "auto"]
    assert auto and all(r["tflops"] > 0 and r["pairs"] > 0 for r in auto)
    assert (out / "2000-01-01-cpu-test-layers.md").read_text().startswith("# Layer benchmarks")


def test_report_table_and_plot_with_a_peer(dry_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, doc = dry_run
    for r in doc["records"]:
        if r.get("ms"):
            r["peer"] = {"spconv": 2 * r["ms"]}
    paths = report.write_all(doc, tmp_path, "x", "layers")
    assert paths["png"].stat().st_size > 10_000
    text = report.summary_text(doc)
    assert "2.00×" in text and "map_build" in text


PROBES = ("small_layer_profile", "tile_sweep", "train_step_profile", "tf32x3", "jax_compiles")  # benchmarks/probes/


@pytest.mark.parametrize("module", [*PROBES, "map_build_timeline"])
def test_gpu_diagnostics_parse_their_arguments_without_a_gpu(module, capsys):
    """The GPU-only diagnostic programs import and answer --help on a machine without a GPU (their GPU
    imports come after argument parsing)."""
    import importlib
    mod = importlib.import_module(f"benchmarks.probes.{module}" if module in PROBES else f"benchmarks.{module}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_tile_sweep_variants_tile_their_blocks():
    from benchmarks.probes.tile_sweep import _variants
    for c in (32, 64, 128, 256):
        vs = _variants(c)
        assert vs, c
        for bm, bn, wm, wn, stages, *bk in vs:
            assert bn <= max(c, 32) and bm % wm == 0 and bn % wn == 0 and wm % 16 == 0 and wn % 16 == 0
            assert 1 <= (bm // wm) * (bn // wn) <= 16 and stages >= 2 and all(b % 16 == 0 for b in bk)


def test_loop_us_calls_n_times_and_synchronises_between_chunks():
    from benchmarks.timing import loop_us
    events = []
    us = loop_us(lambda: events.append("call"), 10, sync=lambda: events.append("sync"), sync_every=4, warmup=2)
    assert us >= 0
    # warm-up, sync, then chunks of 4, 4, 2 with a sync after each (the last one inside the timing)
    assert events == ["call"] * 2 + ["sync"] + (["call"] * 4 + ["sync"]) * 2 + ["call"] * 2 + ["sync"]
    events.clear()
    loop_us(lambda: events.append("call"), 3)
    assert events == ["call"] * 4  # one warm-up call, no synchronisation without sync


def test_timed_attrs_times_and_restores_module_class_and_instance_attributes():
    import types

    from benchmarks.timing import timed_attrs

    class K:
        def m(self):
            return 2
    mod = types.SimpleNamespace(f=lambda x: x + 1)
    mod_f, obj = mod.f, K()
    with timed_attrs([(mod, "f", "f"), (K, "m", "K.m"), (obj, "m", "obj.m")]) as spent:
        assert mod.f(1) == 2 and K().m() == 2 and obj.m() == 2
    assert set(spent) == {"f", "K.m", "obj.m"} and all(v >= 0 for v in spent.values())
    assert mod.f is mod_f and "m" not in vars(obj) and K.__dict__["m"].__name__ == "m"


def test_tf32x3_probe_table_flags_a_failing_check():
    from benchmarks.probes.tf32x3 import markdown
    rec = dict(scene="semantickitti", c=64, direction="fwd", ms=0.1, tflops=10.0, of_cublas=0.5, norm_rel=1e-7,
               elem_p99=1e-7, elem_max=2e-7)
    doc = {"device": "H200", "date": "2026-12-03", "commit": "abc",
           "records": [dict(rec, family="simt", passes_check=True), dict(rec, family="tf32x3", passes_check=False)]}
    rows = [line for line in markdown(doc).splitlines() if line.startswith("| semantickitti")]
    assert len(rows) == 2 and rows[0].endswith("| pass |") and rows[1].endswith("| FAIL |")


def test_jax_compiles_probe_runs_the_modes_asked_for(tmp_path):
    """``--modes bucketed`` runs only the bucketed maps (a 100-scan count without 100 exact compiles)."""
    pytest.importorskip("flax", reason="flax not installed")
    import json

    from benchmarks.probes import jax_compiles
    out = tmp_path / "c.json"
    assert jax_compiles.main(["--scans", "2", "--modes", "bucketed", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    (mode,) = doc["modes"]
    assert mode["bucketed"] is True and len(mode["scans"]) == 2
    assert 1 <= mode["compiles"] <= 2 and mode["scans"][0]["compiles"] == 1  # the first scan always compiles


def test_adapters_jax_rows_time_every_figure_of_a_path(rng, monkeypatch):
    """benchmarks.adapters' JAX figures on the CPU (the benchmark itself needs a GPU): every figure is timed,
    the map passed as an argument is found without a recall miss, and the CPU path has no FFI custom call."""
    jax = pytest.importorskip("jax", reason="jax not installed")
    import jax.numpy as jnp
    from reference import random_voxels

    import sparsevox as sv
    from benchmarks import adapters
    from sparsevox.adapters import jax as svj
    from sparsevox.kernel_map import recall_stats
    monkeypatch.setenv("SPARSEVOX_JAX_FFI", "0")  # restored afterwards: _jax_rows sets it for its path
    c = random_voxels(rng, 60, extent=5)
    f = jnp.asarray(rng.standard_normal((len(c), 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((27, 4, 4)) / 10, jnp.float32)
    k = svj.kernel_map(sv.Voxels(jnp.asarray(c), f), 3)
    got = adapters._jax_rows(svj, jax, jnp, recall_stats, f, w, k, 2, "0")
    assert set(got["ms"]) == {"fwd", "fwd_bwd", "fwd_per_layer_of_stack", "fwd_map_closed_over"}
    assert all(v > 0 for v in got["ms"].values())
    assert got["misses"]["map_argument"] == 0 and got["ffi_custom_calls_in_fwd_and_grad"] == 0


def test_flax_step_probe_times_the_callbacks_of_a_step(tmp_path):
    """The probe's CPU smoke run: callbacks are timed by kind inside the jitted step, and the timer is
    removed afterwards (the adapter's own ``_call`` is back)."""
    pytest.importorskip("flax", reason="flax not installed")
    import json

    from benchmarks.probes import flax_step
    from sparsevox.adapters import jax as svj
    call = svj._call
    out = tmp_path / "f.json"
    assert flax_step.main(["--scene", "tiny", "--steps", "3", "--modes", "fp32_train", "--widths", "4,4,4,4,4,4,4,4,4",
                           "--out", str(out)]) == 0
    assert svj._call is call
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["mode"] == "fp32_train" and len(rec["steps"]) == 3 and rec["steps"][0]["compiled"]
    first = rec["steps"][0]
    assert first["by_kind_calls"]["_forward.run"] == first["by_kind_calls"]["_backward.run"] > 0
    assert first["callbacks_ms"] == pytest.approx(sum(first["by_kind_ms"].values()))
    with pytest.raises(SystemExit):
        flax_step.main(["--steps", "1"])
    # as benchmarks/gpu_suite.sh calls a module: --out DIR --stem STEM --quick --budget-s
    assert flax_step.main(["--scene", "tiny", "--modes", "fp32_infer", "--widths", "4,4,4,4,4,4,4,4,4", "--quick",
                           "--out", str(tmp_path), "--stem", "S", "--budget-s", "100"]) == 0
    (rec,) = json.loads((tmp_path / "S-flax_step.json").read_text())["records"]
    assert rec["mode"] == "fp32_infer" and len(rec["steps"]) == 5
