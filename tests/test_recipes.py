"""Sample recipes: PCRLv2 views, contrastive pairs (run on one volume)."""

import itertools

import numpy as np
import tensorflow as tf

from rr_tf.data import recipes, views

VOLUME = tf.cast(tf.random.stateless_uniform([72, 70, 48, 1], [4, 2], -1000, 1000, tf.int32), tf.int16)


def to_unit(x):
    return tf.cast(x, tf.float32) / 2000.0 + 0.5


def _run(fn, seed):
    return {k: v.numpy() for k, v in fn(VOLUME, tf.constant(seed, tf.int64), to_unit).items()}


def test_pcrlv2_views_shapes_boxes_and_locals_in_union():
    fn = recipes.pcrlv2_views(global_sizes=((32, 32, 16), (40, 40, 20)),
                              local_sizes=((8, 8, 8), (12, 12, 12)), global_out=(32, 32, 16),
                              local_out=(8, 8, 8), num_local=4)
    for seed in ([1, 1], [2, 3], [9, 4]):
        out = _run(fn, seed)
        assert out["global1"].shape == (32, 32, 16, 1) and out["target2"].shape == (32, 32, 16, 1)
        assert out["locals"].shape == (4, 8, 8, 8, 1) and out["local_boxes"].shape == (4, 2, 3)
        assert views.iou3d(out["box1"], out["box2"]).numpy() >= 0.3
        union = views.union_box(out["box1"], out["box2"]).numpy()
        for lb in out["local_boxes"]:
            assert np.all(lb[0] >= union[0]) and np.all(lb[0] + lb[1] <= union[0] + union[1])
        # targets are in network units (windowed); views differ from them only by intensity aug
        assert 0.0 <= out["target1"].min() and out["target1"].max() <= 1.0
        assert np.all(np.isfinite(out["global1"])) and np.all(np.isfinite(out["locals"]))
    again = _run(fn, [2, 3])
    other = _run(fn, [2, 4])
    np.testing.assert_array_equal(_run(fn, [2, 3])["global1"], again["global1"])
    assert not np.array_equal(other["global1"], again["global1"])


def test_target_is_the_flipped_crop_without_affine():
    """With the affine off, the restoration target must be the resized crop
    of box1 up to the flips (one of the 8 flip patterns matches exactly)."""
    fn = recipes.pcrlv2_views(global_sizes=((32, 32, 16),), global_out=(32, 32, 16),
                              local_sizes=((8, 8, 8),), local_out=(8, 8, 8), num_local=2,
                              spatial_affine=False)
    out = _run(fn, [5, 6])
    (x, y, z), (dx, dy, dz) = out["box1"]
    crop = to_unit(VOLUME[x:x + dx, y:y + dy, z:z + dz]).numpy()
    matches = [axes for r in range(4) for axes in itertools.combinations(range(3), r)
               if np.allclose(np.flip(crop, axes) if axes else crop, out["target1"], atol=1e-6)]
    assert len(matches) == 1


def test_contrastive_pair():
    fn = recipes.contrastive_pair((24, 24, 16), min_iou=0.4)
    out = _run(fn, [3, 3])
    assert out["view1"].shape == (24, 24, 16, 1) and out["view2"].shape == (24, 24, 16, 1)
    assert views.iou3d(out["box1"], out["box2"]).numpy() >= 0.4
    assert not np.array_equal(out["view1"], out["view2"])


def test_pcrl_and_pcrlv2_apply_their_intensity_transforms_always_as_the_reference():
    """torchio's defaults (p = 1), as the PCRL / PCRLv2 reference code uses
    them: every PCRLv2 input is augmented and z-normalised (targets are
    not), every PCRL view is blurred. With p = 0.5 one of the 4 seeds x 2
    views would come through untouched with probability 1 - (1/2)^8."""
    v2 = recipes.pcrlv2_views(global_sizes=((32, 32, 16),), global_out=(32, 32, 16),
                              local_sizes=((8, 8, 8),), local_out=(8, 8, 8), num_local=2)
    v1 = recipes.pcrl_views((32, 32, 16), shuffle_p=0.0, paint_p=0.0)
    for seed in ([1, 1], [2, 3], [9, 4], [7, 7]):
        out = _run(v2, seed)
        for x in (out["global1"], out["global2"], *out["locals"]):
            assert abs(x.mean()) < 1e-4 and abs(x.std() - 1.0) < 1e-3
        assert 0.0 <= out["target1"].min() and out["target1"].max() <= 1.0
        out = _run(v1, seed)
        for i in (1, 2):
            assert not np.allclose(out[f"view{i}"], out[f"target{i}"], atol=1e-3), (seed, i)
