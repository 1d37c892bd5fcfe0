"""The backward pass of a fresh scan's network uses the very kernel maps of its forward pass (issue 19):
the coarse levels' Voxels that own them are gone by then, and a map recalled from its bare tensors has
no derived tables, plans or prepared launches (every backward call rebuilt them: 35 of 42 in a MinkUNet
step). Counted on the CPU; the GPU shares the code path."""
import sys

import pytest
from reference import random_voxels, rel_err

import sparsevox as sv

km = sys.modules["sparsevox.kernel_map"]  # the module (sparsevox.kernel_map the attribute is the function)

torch = pytest.importorskip("torch")
svt = pytest.importorskip("sparsevox.adapters.torch")

SMALL = (8, 8, 8, 16, 16, 16, 8, 8, 8)


def _step(net, rng):
    coords = torch.from_numpy(random_voxels(rng, 600, extent=14, batches=2))
    v = sv.Voxels(coords, torch.randn(len(coords), 4, dtype=torch.float64))
    loss = net(v).square().mean()
    before = dict(km.recall_stats)
    loss.backward()
    return {k: km.recall_stats[k] - before[k] for k in before}


def test_backward_finds_every_map_of_the_forward(rng):
    torch.manual_seed(0)
    net = svt.MinkUNet(4, 5, widths=SMALL, blocks=1).double()
    for _ in range(2):  # fresh Voxels every step, as in training
        got = _step(net, rng)
        assert got["misses"] == 0, got
        assert all(p.grad is not None for p in net.parameters())


def test_retained_graph_backward_twice_gives_the_same_gradients(rng):
    """The node keeps its map object for every backward of a retained graph."""
    coords = torch.from_numpy(random_voxels(rng, 300, extent=10, batches=1))
    v = sv.Voxels(coords, torch.randn(len(coords), 3, dtype=torch.float64, requires_grad=True))
    layer = svt.SparseConv3d(3, 4, kernel_size=2, stride=2).double()
    out = layer(v).feats.square().sum()
    g1 = torch.autograd.grad(out, [v.feats, layer.weight], retain_graph=True)
    g2 = torch.autograd.grad(out, [v.feats, layer.weight])
    for a, b in zip(g1, g2):
        assert rel_err(a.numpy(), b.numpy()) < 1e-14
