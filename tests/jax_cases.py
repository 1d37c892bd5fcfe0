"""The small random scene the JAX and Flax adapter tests share (import after ``importorskip("jax")``)."""
import jax.numpy as jnp
from reference import expected_out_coords, random_voxels

import sparsevox as sv
from sparsevox._arrays import to_host
from sparsevox.testing import kind_args


def scene(rng, kind, c_in=3):
    """``(voxels, output_voxels, layer geometry kwargs, out_coords)`` for one kind, small and random:
    JAX ``Voxels`` with ``[N, c_in]`` features; ``output_voxels`` (the finer level) for a transposed
    layer, else None; ``out_coords`` the map's output sites on the host."""
    s, tr, gen = kind_args(kind, 2)
    fine = random_voxels(rng, 60, extent=6, batches=2)
    coords, out_v = fine, None
    if kind == "transposed":
        out_v = sv.Voxels(jnp.asarray(fine), None)
        coords = expected_out_coords(fine, 2, 2, 1, False, False)
    ks = 3 if kind == "submanifold" else 2
    v = sv.Voxels(jnp.asarray(coords), jnp.asarray(rng.standard_normal((len(coords), c_in))))
    geo = dict(kernel_size=ks, stride=s, transposed=tr, generative=gen)
    out_coords = to_host(sv.kernel_map(v, ks, s, 1, tr, gen, out_v).out_coords)  # CuPy when jax runs on a GPU
    return v, out_v, geo, out_coords
