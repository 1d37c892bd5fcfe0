"""benchmarks.end_to_end on the CPU: the smoke run writes its files; voxelisation; the whole comparison
path (parity checks, cells, records) with the dense spconv emulation standing in for spconv."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed")
pytest.importorskip("sparsevox.adapters.torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package
from benchmarks import end_to_end  # noqa: E402

SMALL = ["8", "8", "8", "16", "16", "16", "8", "8", "8"]


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def test_cpu_quick_smoke_run_writes_design_records(tmp_path):
    rc = end_to_end.main(["--cpu", "--quick", "--out", str(tmp_path), "--stem", "2000-01-01-cpu-test",
                          "--plan-compat", "--unplanned-compat", "--sort-ab", "--flax", "--rounds", "2"])
    assert rc == 0
    doc = json.loads((tmp_path / "2000-01-01-cpu-test-end_to_end.json").read_text())
    assert doc["settings"]["plan_compat"] is True  # the spconv-API model ran with a map plan too
    for key in ("device", "date", "commit", "records", "autotune", "settings"):
        assert key in doc
    assert [r["op"] for r in doc["records"]] == ["minkunet_fp32_infer", "minkunet_fp32_train"]
    for r in doc["records"]:
        assert {"op", "scene", "n_voxels", "library", "ms", "peak_mib", "peer", "ratio"} <= set(r)
        assert r["library"] == "sparsevox" and r["scene"] == "tiny" and r["ms"] > 0 and r["n_voxels"] > 1000
        # the spconv-API model on sparsevox.compat.spconv (issue 21): timed beside native sparsevox
        assert r["compat_ms"] > 0 and isinstance(r["compat_overhead"], float)
        assert r["compat_planned_ms"] > 0 and isinstance(r["compat_planned_overhead"], float)  # --plan-compat
        assert r["compat_unplanned_ms"] > 0 and isinstance(r["compat_unplanned_overhead"], float)
        assert r["variants"]["sparsevox_rows_sorted"] > 0  # --sort-ab: the sorted-rows policy timed too
        assert r["flax_ms"] > 0, r.get("flax_ms")  # --flax: the Flax MinkUNet, same weights, bucketed maps
        assert r["rounds"] == 2 and r["steps"] == 2  # interleaved: one timed step per round, pooled
        assert len(r["samples_ms"]["sparsevox"]) == 2 and len(r["samples_ms"]["compat"]) == 2  # every timed step
    assert doc["settings"]["steps"] == 2 and doc["settings"]["warmup"] == 1 and doc["settings"]["rounds"] == 2
    assert doc["parity"]["tiny"]["compat_logits_fp32_eval"] < 1e-6
    md = (tmp_path / "2000-01-01-cpu-test-end_to_end.md").read_text()
    assert md.startswith("# MinkUNet end to end") and "| tiny |" in md and "sparsevox.compat.spconv" in md
    assert "| planned ms | planned overhead | unplanned ms | unplanned overhead |" in md
    from sparsevox.compat.spconv import maps
    assert maps.auto_plan() is True  # the unplanned cells restored compat's own plan
    assert "Slot sort A/B" in md and "The Flax NNX MinkUNet" in md
    import sparsevox
    assert sparsevox.config.sort_rows() == "auto"  # the A/B restored the policy


def test_rounds_pool_every_step_and_keep_the_largest_peak():
    a = {"ms": 2.0, "min_ms": 1.0, "max_ms": 3.0, "steps": 3, "samples": [1.0, 2.0, 3.0], "peak_mib": 10.0,
         "model_mib": 1.0, "warmup_peak_mib": 12.0, "tuned_in_timed_steps": 0, "tunings": 5}
    b = {**a, "samples": [10.0, 11.0], "peak_mib": 14.0, "warmup_peak_mib": 11.0, "tuned_in_timed_steps": 1,
         "tunings": 0}
    got = end_to_end._pooled([a, b])
    assert got["ms"] == 3.0 and (got["min_ms"], got["max_ms"]) == (1.0, 11.0) and got["steps"] == 5
    assert got["rounds"] == 2 and got["peak_mib"] == 14.0 and got["warmup_peak_mib"] == 12.0
    assert got["tuned_in_timed_steps"] == 1 and got["tunings"] == 5
    assert got["samples"] == [1.0, 2.0, 3.0, 10.0, 11.0]  # every timed step, for the report's intervals
    assert end_to_end._pooled([a, {"error": "RuntimeError: x"}]) == {"error": "RuntimeError: x"}


def test_a_round_cut_by_the_budget_is_dropped_for_every_cell(tmp_path, monkeypatch):
    """Round 2 stops after sparsevox's cell: that round is dropped, so sparsevox and compat both keep one
    round (the same minutes), not two against one."""
    calls = []
    real = end_to_end.run_cell

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)
    monkeypatch.setattr(end_to_end, "run_cell", counting)
    monkeypatch.setattr(end_to_end.Run, "out_of_time", lambda self: len(calls) >= 3)
    rc = end_to_end.main(["--cpu", "--modes", "fp32_infer", "--steps", "2", "--rounds", "2", "--out", str(tmp_path),
                          "--stem", "2000-01-01-cpu-cut", "--widths", *SMALL])
    assert rc == 0 and calls == ["sparsevox", "compat", "sparsevox"]
    (rec,) = json.loads((tmp_path / "2000-01-01-cpu-cut-end_to_end.json").read_text())["records"]
    assert rec["rounds"] == 1 and rec["steps"] == 1 and rec["compat_ms"] > 0


def test_rounds_outside_the_steps_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--rounds must be in \[1, steps=2\], got 3"):
        end_to_end.main(["--cpu", "--rounds", "3", "--out", str(tmp_path)])


def test_help_answers_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as e:
        end_to_end.main(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_voxeliser_means_sorted_rows_and_spconv_frame():
    rng = np.random.default_rng(3)
    pts = np.concatenate([rng.uniform(-2, 3, (3000, 3)), rng.uniform(0, 255, (3000, 3))], 1).astype(np.float32)
    xyz, feats, index = end_to_end.batch_points(pts, 2)
    assert xyz.shape == (6000, 3) and feats.shape == (6000, 6) and feats[:, 3:].max() <= 1.0
    np.testing.assert_array_equal(xyz[3000:, 0], xyz[:3000, 1])  # item 1: x and y swapped
    vox = end_to_end.Voxeliser(xyz, feats, index, 0.5, "cpu")
    coords, vf = vox()
    c = coords.numpy().astype(np.int64)
    assert (c[:, 1:] >= 0).all() and (c[:, 1:] + 2 <= np.array(vox.spatial_shape)).all()
    assert all(s % 16 == 0 for s in vox.spatial_shape) and (vox.shift.numpy() % 16 == 0).all()
    keys = ((c[:, 0] * 10_000 + c[:, 1]) * 10_000 + c[:, 2]) * 10_000 + c[:, 3]
    assert (np.diff(keys) > 0).all()  # unique, sorted by (batch, x, y, z)
    ijk = np.floor(xyz / np.float32(0.5)).astype(np.int64) - vox.shift.numpy()
    row = {tuple(r): i for i, r in enumerate(c.tolist())}
    which = np.array([row[(b, *p)] for b, p in zip(index.tolist(), ijk.tolist())])
    ref = np.zeros((len(c), 6))
    np.add.at(ref, which, feats)
    ref /= np.bincount(which, minlength=len(c))[:, None]
    np.testing.assert_allclose(vf.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_comparison_path_with_emulated_spconv(monkeypatch):
    """run_scene with the dense spconv emulation as the peer: parity of logits and layers (the emulated
    strided layer returns its sites shuffled), both libraries' cells, ratio, Markdown."""
    import spconv_emulation
    monkeypatch.setitem(end_to_end.SCENES, "tiny", end_to_end.Plan("tiny", 0.6, 2))  # a small dense grid
    run = end_to_end.Run(end_to_end.parse_args(["--cpu", "--widths", *SMALL, "--steps", "1", "--warmup", "0"]))
    run.sp, run.peer_info = spconv_emulation, {"spconv": "dense emulation (tests/spconv_emulation.py)"}
    end_to_end.run_scene(run, "tiny")
    par = run.parity["tiny"]
    assert "error" not in par, par
    assert par["logits"]["fp32_eval"] < 1e-5 and par["logits"]["fp32_train"] < 1e-5
    assert set(par["layers"]) == {"subm3", "subm1", "down", "up"}
    assert all(isinstance(v, float) and v < 1e-5 for v in par["layers"].values()), par["layers"]
    assert [r["op"] for r in run.records] == ["minkunet_fp32_infer", "minkunet_fp32_train"]
    for r in run.records:
        assert r["ms"] > 0 and r["peer"]["spconv"] > 0 and r["ratio"] > 0, r
    assert run.records[0]["logits_rel_err"] == par["logits"]["fp32_eval"]
    from benchmarks import end_to_end_report
    md = end_to_end_report.markdown(end_to_end.document(run))
    assert "| tiny |" in md and "×" in md and "SubM k3" in md


def test_half_copies_keep_the_weights():
    import spconv_emulation

    from benchmarks import spconv_minkunet as spm
    from sparsevox.adapters.torch import MinkUNet
    widths = tuple(int(w) for w in SMALL)
    xyz = np.random.default_rng(0).uniform(0, 4, (200, 3)).astype(np.float32)
    vox = end_to_end.Voxeliser(xyz, xyz, np.zeros(200, np.int64), 0.5, "cpu")
    libs = end_to_end.Libraries(spconv_emulation, vox, widths)
    net = MinkUNet(3, end_to_end.NUM_CLASSES, widths=widths)
    sp_net = libs.build_spconv()
    spm.load_from_sparsevox(sp_net, net)
    for lib, model in (("sparsevox", net), ("spconv", sp_net)):
        half = libs.half_copy(lib, model)
        assert half is not model
        ref = dict(model.named_parameters())
        for name, p in half.named_parameters():
            assert p.dtype == torch.float16 and torch.equal(p, ref[name].half()), name
        assert next(model.parameters()).dtype == torch.float32


def test_probe_setup_gives_a_calibrated_model_on_the_cpu():
    """``sparsevox_scene_model`` (the single-library probes' setup): labels for the scene's voxels, and the
    MinkUNet's BatchNorm statistics those of the scene (not the initial 0 / 1), the model left on the CPU."""
    e2e = end_to_end
    libs, labels, model = e2e.sparsevox_scene_model("tiny", "cpu")
    coords, _ = libs.vox()
    assert labels.shape == (len(coords),) and int(labels.max()) < e2e.NUM_CLASSES
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bns and all(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in bns)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_resident_model_memory_and_the_peak_above_it():
    """The float32 model under autocast holds twice the bytes of spconv's float16 copy: the report gives
    each library's peak less its model beside the raw peaks, and — where a figure is missing."""
    import torch
    from benchmarks import end_to_end_report as rep
    m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.BatchNorm1d(512))
    n = 512 * 512 + 512 + 2 * 512 + 2 * 512 + 1  # weights, biases, BN affine, running stats, batch count
    want = (4 * (n - 1) + 8) / 2 ** 20
    assert end_to_end.resident_mib(m) == round(want, 1)
    assert end_to_end.resident_mib(m.half()) == round((2 * (n - 1) + 8) / 2 ** 20, 1)
    r = {"peak_mib": 470.0, "model_mib": 83.0, "peer_peak_mib": {"spconv": 378.0}, "peer_model_mib": {"spconv": 41.5}}
    assert rep._above_model(r) == "387.0 / 336.5 (1.15)"
    assert rep._above_model({"peak_mib": 1.0, "model_mib": None, "peer_peak_mib": {}}) == "—"


def test_overhead_interval_brackets_the_shift_and_says_when_it_cannot():
    from benchmarks.end_to_end_report import overhead_interval
    rng = np.random.default_rng(1)
    base = list(20 + rng.normal(0, 0.5, 40))
    lo, hi = overhead_interval(base, [t * 1.10 for t in base])
    assert lo < 0.10 < hi and hi - lo < 0.06  # the same steps 10 % slower: a narrow interval around +10 %
    lo, hi = overhead_interval(base, list(20 + rng.normal(0, 4, 40)))
    assert lo < 0 < hi  # no shift, a wide spread: the interval holds 0
    assert overhead_interval(base, [20.0, 21.0]) is None and overhead_interval(None, base) is None
    assert overhead_interval(base, base[::-1]) == overhead_interval(base, base[::-1])  # fixed seed: reproducible
