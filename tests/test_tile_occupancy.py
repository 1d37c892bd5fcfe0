"""The tile-occupancy probe (benchmarks/probes/tile_occupancy.py): its counts on hand-made masks, on the CPU."""
import numpy as np

from benchmarks.probes import tile_occupancy as occ


def test_iterations_count_the_active_tile_offsets():
    # 2 offsets, 6 rows, tiles of 2 rows: offset 0 in rows 0 and 5, offset 1 in rows 1, 2, 3
    has = np.zeros((2, 6), dtype=bool)
    has[0, [0, 5]] = True
    has[1, [1, 2, 3]] = True
    assert occ.iterations(has, 2) == 2 + 2  # offset 0: tiles 0 and 2; offset 1: tiles 0 and 1
    assert occ.iterations(has, 4) == 2 + 1  # a last partial tile counts like a full one
    order = occ.mask_order(has)
    assert occ.iterations(has, 2, order) == 1 + 2  # rows 0, 5 together; rows 1, 2, 3 in two tiles


def test_mask_order_is_stable_with_the_rarest_offset_most_significant():
    has = np.array([[1, 1, 1, 0, 1],    # frequent offset
                    [0, 1, 0, 0, 1]],   # rare offset: its rows last, in their order
                   dtype=bool)
    assert occ.mask_order(has).tolist() == [3, 0, 2, 1, 4]


def test_neighbour_mask_of_a_real_map():
    import sparsevox as sv
    coords = np.array([[0, 0, 0, 0], [0, 0, 0, 1], [0, 5, 5, 5]], dtype=np.int32)
    kmap = sv.kernel_map(sv.Voxels(coords, np.zeros((3, 1), np.float32)), 3, 1, 1)
    has = occ.neighbour_mask(kmap)
    assert has.shape == (27, 3) and has.sum() == kmap.num_pairs == 5  # 3 centres + the two z neighbours
    assert has[13].all()  # the centre offset of a k3 map
