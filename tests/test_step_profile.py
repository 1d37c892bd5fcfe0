"""The step profiler's trace summary and layer classification (benchmarks/probes/step_profile.py), on the CPU."""
import pytest

from benchmarks.probes import step_profile

torch = pytest.importorskip("torch")


def _ev(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_summarise_trace_counts_per_step_and_unions_device_time():
    events = [
        _ev("cuda_runtime", "cudaEventSynchronize", 0, 500), _ev("cuda_driver", "cuStreamSynchronize", 0, 100),
        _ev("cuda_runtime", "cudaLaunchKernel", 0, 5), _ev("cuda_driver", "cuLaunchKernel", 0, 5),
        _ev("cuda_driver", "cuLaunchKernel", 0, 5), _ev("cuda_runtime", "cudaMemcpy", 0, 40),
        _ev("cuda_runtime", "cudaMalloc", 0, 40),
        _ev("kernel", "k_a", 1000, 1000), _ev("kernel", "k_b", 1500, 1000),  # overlap: union 1.5 ms
        _ev("gpu_memset", "Memset", 4000, 500), _ev("gpu_memcpy", "Memcpy DtoH", 10000, 1000),
        {"ph": "i", "cat": "kernel", "name": "instant"},  # not a complete event: ignored
    ]
    s = step_profile.summarise_trace(events, steps=2, wall_ms=[3.0, 5.0, 4.0])
    assert s["wall_ms"] == 4.0
    assert s["device_ms"] == pytest.approx(3.0 / 2)
    assert s["gpu_busy"] == pytest.approx(1.5 / 4.0, abs=1e-3)
    assert s["syncs"] == 1.0 and s["sync_blocked_ms"] == pytest.approx(0.3)
    assert s["sync_by_call"] == {"cudaEventSynchronize": 0.5, "cuStreamSynchronize": 0.5}
    assert s["launch_calls"] == 1.5 and s["kernels"] == 1.0
    assert s["memsets"] == 0.5 and s["memcpys"] == 0.5 and s["sync_copies"] == 0.5 and s["allocs"] == 0.5
    assert [k["name"] for k in s["top_kernels"]] == ["k_a", "k_b"]
    assert s["launches_by_kernel"] == {"k_a": 0.5, "k_b": 0.5}


def test_launch_counts_add_up_names_that_share_the_kept_prefix():
    long = "void at::native::elementwise_kernel<" + "x" * 120
    events = [_ev("kernel", long + "copy_a>", 0, 1), _ev("kernel", long + "copy_b>", 5, 1),
              _ev("kernel", long + "copy_b>", 9, 1), _ev("kernel", "k", 12, 1)]
    s = step_profile.summarise_trace(events, steps=1, wall_ms=[1.0])
    assert s["launches_by_kernel"] == {long[:120]: 3.0, "k": 1.0}
    assert sum(s["launches_by_kernel"].values()) == s["kernels"]


def test_launch_differences_list_what_compat_adds_per_mode():
    rec = lambda mode, lib, counts: {"mode": mode, "library": lib,  # noqa: E731
                                     "summary": {"launches_by_kernel": counts}}
    doc = {"records": [rec("fp16_infer", "sparsevox", {"conv": 30.0, "bn_relu_add": 16.0}),
                       rec("fp16_infer", "compat", {"conv": 30.0, "bn": 16.0, "add": 16.0, "relu": 16.0}),
                       rec("fp16_infer", "spconv", {"other": 1.0}), {"mode": "fp32_infer", "library": "compat"},
                       rec("fp32_train", "sparsevox", {}), rec("fp32_train", "compat", {"conv": 1.0})]}
    lines = step_profile.launch_differences(doc, "compat")
    assert lines[0] == "**fp16_infer**, compat − sparsevox: +32.0 launches per step"
    assert lines[2:6] == ["- +16.0 add", "- +16.0 bn", "- +16.0 relu", "- -16.0 bn_relu_add"]
    assert not any("conv" in x or "fp32" in x for x in lines)  # (a mode without counts on one side: none)


def test_layer_kinds_of_the_minkunet():
    from sparsevox.adapters.torch import MinkUNet
    net = MinkUNet(4, 20, widths=(8, 8, 16, 16, 16, 16, 16, 8, 8), blocks=1)
    kinds = {}
    for m in net.modules():
        k = step_profile.layer_kind(m)
        if k is not None:
            kinds[k] = kinds.get(k, 0) + 1
    # stem 2 SubM; per stage 1 block of 2 SubM (+ k1 skip where widths change); 4 down; 4 up
    assert kinds["down_k2s2"] == 4 and kinds["up_k2s2"] == 4 and kinds["linear"] == 1
    assert kinds["subm_k3"] == 2 + 8 * 2
    # 1x1 skips where a block's widths differ: encoder 8->16 (stage 2); decoder 16+16->16, 16+16->16,
    # 16+8->8, 8+8->8 (the concatenation always widens)
    assert kinds["k1"] == 1 + 4
    assert kinds["batchnorm"] == kinds["subm_k3"] + kinds["k1"] + 8
    assert step_profile.layer_kind(torch.nn.Sequential()) is None


def test_compat_minkunet_has_the_native_kinds_and_gets_a_column():
    from benchmarks import spconv_minkunet as spm
    from sparsevox.adapters.torch import MinkUNet
    import sparsevox.compat.spconv as compat
    widths = (8, 8, 16, 16, 16, 16, 16, 8, 8)

    def kinds(net):
        out = {}
        for m in net.modules():
            k = step_profile.layer_kind(m)
            if k is not None:
                out[k] = out.get(k, 0) + 1
        return out
    native, theirs = kinds(MinkUNet(4, 20, widths=widths)), kinds(spm.build(compat, 4, 20, widths=widths))
    native.pop("relu", None)  # (native fuses ReLU into its BatchNorm layers; spconv models use nn.ReLU)
    theirs.pop("relu", None)
    assert theirs == native
    doc = {"scene": "semantickitti", "device": "GPU", "date": "2026-12-03", "commit": "abc1234", "steps": 3,
           "records": [{"mode": "fp16_infer", "library": lib, "kinds": {"subm_k3": {"ms": 1.0 + i, "calls": 34}}}
                       for i, lib in enumerate(("sparsevox", "spconv", "compat"))]}
    md = step_profile.render(doc)
    assert "| mode | kind | sparsevox ms (calls) | spconv ms (calls) | compat ms (calls) |" in md
    assert "| fp16_infer | subm_k3 | 1.00 (34) | 2.00 (34) | 3.00 (34) |" in md


def _corr(cat, name, ts, dur, corr):
    return {**_ev(cat, name, ts, dur), "args": {"correlation": corr}}


def test_layer_table_ties_kernels_to_the_layer_that_launched_them():
    from benchmarks.probes import layer_table
    events = [
        _ev("user_annotation", "svxL0", 0, 100), _ev("user_annotation", "svxL1", 200, 100),
        _ev("user_annotation", "unrelated", 0, 1000),
        _corr("cuda_driver", "cuLaunchKernel", 10, 5, 1), _corr("cuda_runtime", "cudaLaunchKernel", 50, 5, 2),
        _corr("cuda_runtime", "cudaMemsetAsync", 250, 5, 3), _corr("cuda_runtime", "cudaLaunchKernel", 150, 5, 4),
        _corr("kernel", "igemm_fwd<a>", 900, 400, 1), _corr("kernel", "igemm_fwd<b>", 1300, 200, 2),
        _corr("gpu_memset", "Memset", 1500, 100, 3), _corr("kernel", "build_map", 1600, 1000, 4),
        _corr("kernel", "orphan", 2600, 600, 99),  # no launch event seen: outside every layer
    ]
    ms, top = layer_table.attribute(events, steps=2)
    # device ms per step, by the range that holds the launch (not the kernel's own, later, device time)
    assert ms == pytest.approx({"svxL0": 0.3, "svxL1": 0.05, "(outside layers)": 0.8})
    assert top == {"svxL0": "igemm_fwd<a>", "svxL1": "Memset", "(outside layers)": "build_map"}


def test_layer_table_pairs_the_convolutions_of_both_models_in_order():
    from benchmarks.probes import layer_table
    conv = lambda kind, ms, c: {"kind": kind, "in": [100, c], "out": [100, c], "ms": ms, "top_kernel": "k"}  # noqa: E731
    ours = [conv("subm_k3", 0.2, 32), {"kind": "batchnorm", "in": None, "out": None, "ms": 0.05, "top_kernel": ""},
            conv("k1", 0.1, 64)]
    theirs = [conv("subm_k3", 0.4, 32), conv("k1", 0.05, 64)]
    doc = {"scene": "s", "device": "GPU", "date": "d", "commit": "c", "steps": 2, "records": [
        {"mode": "fp16_infer", "library": "sparsevox", "layers": ours, "outside_ms": 1.0, "total_ms": 1.35},
        {"mode": "fp16_infer", "library": "spconv", "layers": theirs, "outside_ms": 2.0, "total_ms": 2.45}]}
    text = layer_table.render(doc)
    assert "| 0 | subm_k3 | 100 → 100 | 32 → 32 | 0.200 | 0.400 | 2.00× | `k` |" in text
    assert "| 2 | k1 | 100 → 100 | 64 → 64 | 0.100 | 0.050 | 0.50× | `k` |" in text
    assert "| subm_k3 | 0.200 | 0.400 |" in text and "| other layers (norms, ReLU, classifier) | 0.050 | 0.000 |" in text
    assert "| all device time | 1.350 | 2.450 |" in text
