"""tune_model: a whole model tuned up front on an example batch (issue 19), the model left as found. On the
CPU (one algorithm, nothing to time); the progress counter is driven by the autotuner's log records."""
import io
import logging

import pytest
from reference import random_voxels

import sparsevox as sv

torch = pytest.importorskip("torch")
svt = pytest.importorskip("sparsevox.adapters.torch")

SMALL = (8, 8, 8, 16, 16, 16, 8, 8, 8)


def _net_and_batch(rng):
    torch.manual_seed(0)
    net = svt.MinkUNet(4, 5, widths=SMALL, blocks=1).double()
    coords = torch.from_numpy(random_voxels(rng, 500, extent=12, batches=2))
    return net, sv.Voxels(coords, torch.randn(len(coords), 4, dtype=torch.float64))


def test_runs_forward_and_backward_and_leaves_the_model_as_found(rng):
    net, x = _net_and_batch(rng)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    first = next(net.parameters())
    first.grad = torch.full_like(first, 3.0)  # a gradient the caller had: kept
    out = io.StringIO()
    got = svt.tune_model(net, x, progress=out)
    assert set(got) == {"tunings", "seconds"} and got["tunings"] == 0 and got["seconds"] > 0
    assert not net.training
    for k, v in net.state_dict().items():  # BatchNorm statistics of the train-mode pass restored
        assert torch.equal(v, before[k]), k
    assert torch.equal(first.grad, torch.full_like(first, 3.0))
    assert all(p.grad is None for p in list(net.parameters())[1:])
    assert "done, 0 configurations tuned" in out.getvalue()


def test_counts_and_reports_each_tuning(rng):
    net, x = _net_and_batch(rng)

    class Logs(torch.nn.Module):  # stands in for the autotuner meeting two new problems
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, v):
            log = logging.getLogger("sparsevox.autotune")
            for i in range(2):
                log.debug("autotune: tuned conv|fwd|case%d in 0.1 s (4 candidates)", i)
            log.debug("autotune: conv|fwd chose implicit_gemm")  # not a finished tuning
            return self.inner(v)
    out = io.StringIO()
    handlers = list(logging.getLogger("sparsevox.autotune").handlers)
    got = svt.tune_model(Logs(net), x, train=False, progress=out)
    assert got["tunings"] == 2
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("sparsevox tune_model: 1 configurations tuned") and "conv|fwd|case0" in lines[0]
    assert "2 configurations tuned" in lines[1] and lines[-1].startswith("sparsevox tune_model: done, 2")
    assert logging.getLogger("sparsevox.autotune").handlers == handlers  # its handler removed
    assert svt.tune_model(Logs(net), x, train=False, progress=False)["tunings"] == 2  # silent


def test_rejects_an_autocast_dtype_it_cannot_run(rng):
    net, x = _net_and_batch(rng)
    with pytest.raises(ValueError, match="autocast entries must be None, torch.float16 or torch.bfloat16"):
        svt.tune_model(net, x, autocast=(torch.float32,))


@pytest.mark.gpu
def test_gpu_tunes_once_and_then_hits_the_cache(rng, tmp_path, monkeypatch):
    from sparsevox.tuning import tune_cache
    monkeypatch.setenv("SPARSEVOX_CACHE_DIR", str(tmp_path))
    tune_cache.reset()
    try:
        torch.manual_seed(0)
        net = svt.MinkUNet(4, 5, widths=SMALL, blocks=1).cuda()
        coords = torch.from_numpy(random_voxels(rng, 4000, extent=30, batches=2)).cuda()
        x = sv.Voxels(coords, torch.randn(len(coords), 4, device="cuda"))
        first = svt.tune_model(net, x, autocast=(None, torch.float16), progress=False)
        assert first["tunings"] > 0
        x2 = sv.Voxels(coords.clone(), x.feats)  # a fresh map of the same scan: nothing left to tune
        assert svt.tune_model(net, x2, autocast=(None, torch.float16), progress=False)["tunings"] == 0
    finally:
        tune_cache.reset()
