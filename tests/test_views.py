import numpy as np
import pytest
import tensorflow as tf

from rr_tf.data import views

SEEDS = [tf.constant([s, 7], tf.int64) for s in range(40)]


def _inside(box, shape):
    start, size = box[0], box[1]
    return np.all(start >= 0) and np.all(start + size <= np.asarray(shape))


def test_random_box_is_inside_and_seeded():
    boxes = [views.random_box([40, 30, 20], [16, 16, 8], s).numpy() for s in SEEDS]
    assert all(_inside(b, (40, 30, 20)) and list(b[1]) == [16, 16, 8] for b in boxes)
    assert len({tuple(b[0]) for b in boxes}) > 10
    np.testing.assert_array_equal(views.random_box([40, 30, 20], [16, 16, 8], SEEDS[3]), boxes[3])


def test_iou_and_union_by_hand():
    a = views.make_box([0, 0, 0], [4, 4, 4])
    b = views.make_box([2, 0, 0], [4, 4, 4])
    assert views.iou3d(a, b).numpy() == pytest.approx(32 / 96)
    np.testing.assert_array_equal(views.union_box(a, b), [[0, 0, 0], [6, 4, 4]])
    c = views.make_box([10, 10, 10], [2, 2, 2])
    assert views.iou3d(a, c).numpy() == 0.0


@pytest.mark.parametrize("min_iou", [0.3, 0.6])
def test_global_pairs_reach_min_iou_inside_volume(min_iou):
    sizes = [[32, 32, 16], [48, 48, 24], [24, 24, 12]]
    for s in SEEDS:
        b1, b2 = views.global_pair_boxes([64, 64, 40], sizes, min_iou, s)
        assert views.iou3d(b1, b2).numpy() >= min_iou - 1e-6
        assert _inside(b1.numpy(), (64, 64, 40)) and _inside(b2.numpy(), (64, 64, 40))


def test_locals_lie_inside_the_union_box():
    for s in SEEDS[:15]:
        b1, b2 = views.global_pair_boxes([64, 64, 40], [[32, 32, 16]], 0.3, s)
        union = views.union_box(b1, b2).numpy()
        locs = views.local_boxes(union, 6, [[8, 8, 8], [12, 12, 6]], s).numpy()
        assert locs.shape == (6, 2, 3)
        for lb in locs:
            assert np.all(lb[0] >= union[0]) and np.all(lb[0] + lb[1] <= union[0] + union[1])


def test_crop_matches_numpy_and_pads_outside():
    vol = np.arange(10 * 9 * 8, dtype=np.float32).reshape(10, 9, 8, 1)
    box = views.make_box([2, 3, 1], [4, 5, 6])
    np.testing.assert_array_equal(views.crop(vol, box), vol[2:6, 3:8, 1:7])
    out = views.crop(vol, views.make_box([-2, 7, 6], [4, 4, 4]), pad_value=-1).numpy()
    assert out.shape == (4, 4, 4, 1)
    np.testing.assert_array_equal(out[2:, :2, :2], vol[0:2, 7:9, 6:8])
    assert np.all(out[:2] == -1) and np.all(out[:, 2:] == -1) and np.all(out[:, :, 2:] == -1)


def test_resize3d_identity_constant_and_shape():
    x = tf.random.stateless_uniform([8, 6, 4, 1], [1, 2])
    np.testing.assert_allclose(views.resize3d(x, (8, 6, 4)), x, atol=1e-6)
    const = tf.fill([10, 12, 6, 1], 0.3)
    np.testing.assert_allclose(views.resize3d(const, (16, 16, 16)), 0.3, atol=1e-6)
    y = views.crop_resize(x, views.make_box([0, 0, 0], [8, 6, 4]), (4, 3, 2))
    assert y.shape == (4, 3, 2, 1)
    np.testing.assert_allclose(tf.reduce_mean(y), tf.reduce_mean(x), atol=0.05)


def test_foreground_box_centres_on_foreground():
    vol = np.zeros((48, 48, 32), np.float32)
    vol[30:34, 8:12, 20:24] = 1.0
    for s in SEEDS[:10]:
        box = views.foreground_box(vol, [16, 16, 16], s, 0.5, stride=2).numpy()
        assert _inside(box, vol.shape)
        assert vol[tuple(slice(a, a + b) for a, b in zip(box[0], box[1]))].sum() > 0
    empty = views.foreground_box(np.zeros((20, 20, 20), np.float32), [8, 8, 8], SEEDS[0], 0.5)
    assert _inside(empty.numpy(), (20, 20, 20))


def test_samplers_trace_in_tf_function():
    @tf.function
    def f(shape, seed):
        b1, b2 = views.global_pair_boxes(shape, [[16, 16, 8]], 0.4, seed)
        return views.local_boxes(views.union_box(b1, b2), 3, [[4, 4, 4]], seed)

    assert f(tf.constant([32, 32, 16]), SEEDS[0]).shape == (3, 2, 3)
