"""UNet2D shapes, names and .keras round trips; slice-by-slice application
(SliceSegmenter, SliceFeatures): shapes, edge padding, locality, transfer."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from rr_tf.models.unet2d import (SliceFeatures, SliceSegmenter, UNet2D, slabs_to_volume,
                                 unet2d_param_count, volume_to_slabs)
from rr_tf.transfer import transfer, variables_by_key


def rand(*shape, seed=0):
    return np.random.default_rng(seed).uniform(size=shape).astype("float32")


def test_unet2d_shapes_and_parameter_count():
    net = UNet2D(base_width=4, levels=3, out_channels=3)
    x = rand(2, 32, 16, 3)
    pyramid = net.encode(x)
    assert [tuple(p.shape) for p in pyramid] == [(2, 32, 16, 8), (2, 16, 8, 16), (2, 8, 4, 32)]
    stages, out = net.decode(pyramid)
    assert [tuple(s.shape) for s in stages] == [(2, 16, 8, 16), (2, 32, 16, 8)]
    assert tuple(out.shape) == (2, 32, 16, 3) and net.strides == [1, 2, 4]
    # hand count for base 2, levels 2, 1 input channel, 1 output, batch norm:
    # enc1: 1->2 (9*1*2+2 + 4*2 = 28), 2->4 (9*2*4+4+16 = 92); enc2: 4->4 (9*16+4+16 = 164),
    # 4->8 (9*32+8+32 = 328); up1: 4*8*8+8 = 264; dec1: (8+4)->4 (9*48+4+16 = 452),
    # 4->4 (164); head 4*1+1 = 5  -> 1497
    small = UNet2D(base_width=2, levels=2)
    small.build((None, 8, 8, 1))
    assert small.count_params() == unet2d_param_count(2, 2) == 1497
    assert net.count_params() == unet2d_param_count(4, 3, in_channels=3, out_channels=3)


def test_unet2d_stable_variable_keys_and_checks():
    net = UNet2D(base_width=2, levels=3, name="anything")
    net.build((None, 16, 16, 1))
    keys = set(variables_by_key(net))
    for key in ("enc1/unit1/conv/kernel", "enc3/unit2/norm/moving_variance", "up2/kernel",
                "dec2/unit1/conv/kernel", "dec1/unit2/norm/gamma", "head/kernel"):
        assert key in keys, key
    noskip = UNet2D(base_width=2, levels=3, skips=False)
    noskip.build((None, 16, 16, 1))
    assert noskip.get_layer("dec2").units[0].conv.kernel.shape == (3, 3, 16, 8)  # no skip: 16 in
    assert net.get_layer("dec2").units[0].conv.kernel.shape == (3, 3, 24, 8)     # 16 + 8 skip
    with pytest.raises(ValueError, match="divisible"):
        UNet2D(base_width=2, levels=3).build((None, 18, 16, 1))
    with pytest.raises(ValueError, match="levels"):
        UNet2D(levels=1)


ROUND_TRIPS = {
    "UNet2D": (lambda: UNet2D(base_width=2, levels=3, norm="batch", out_channels=3,
                              final_activation="sigmoid"), (2, 16, 16, 3)),
    "UNet2D-group": (lambda: UNet2D(base_width=4, levels=2, norm="group", skips=False),
                     (2, 8, 8, 1)),
    "SliceSegmenter": (lambda: SliceSegmenter(3, slab_size=3, base_width=2, levels=2),
                       (1, 8, 8, 5, 1)),
    "SliceFeatures": (lambda: SliceFeatures(_built(UNet2D(base_width=2, levels=3, norm="instance"),
                                                   3), slab_size=3), (1, 16, 8, 4, 1)),
}


def _built(net, channels):
    """As in the method: the U-Net exists (built) before it is wrapped for export."""
    net.build((None, None, None, channels))
    return net


@pytest.mark.parametrize("key", sorted(ROUND_TRIPS))
def test_keras_roundtrip(key, tmp_path):
    make, shape = ROUND_TRIPS[key]
    obj = make()
    x = rand(*shape, seed=3)
    obj(x, training=True)  # moves BN statistics off their initial values
    before = keras.tree.map_structure(np.asarray, obj(x))
    path = str(tmp_path / f"{key}.keras")
    keras.saving.save_model(obj, path)
    loaded = keras.saving.load_model(path)
    as_json = lambda c: json.loads(json.dumps(c))  # noqa: E731  (tuples come back as lists)
    assert type(loaded) is type(obj) and as_json(loaded.get_config()) == as_json(obj.get_config())
    assert [w.path for w in loaded.weights] == [w.path for w in obj.weights]
    for a, b in zip(obj.weights, loaded.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    after = keras.tree.map_structure(np.asarray, loaded(x))
    keras.tree.map_structure(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                             before, after)


def test_volume_to_slabs_edge_pads_and_round_trips():
    vol = np.arange(2 * 2 * 2 * 4, dtype="float32").reshape(2, 2, 2, 4, 1)
    slabs = volume_to_slabs(vol, 3).numpy()                # [B*W, D, H, 3]
    assert slabs.shape == (8, 2, 2, 3)
    v = vol[..., 0]
    for b in range(2):
        for z, idx in enumerate([(0, 0, 1), (0, 1, 2), (1, 2, 3), (2, 3, 3)]):
            np.testing.assert_array_equal(slabs[b * 4 + z], v[b][:, :, list(idx)])
    centre = slabs[..., 1:2]
    np.testing.assert_array_equal(slabs_to_volume(centre, 2, 4).numpy(), vol)


def test_slice_segmenter_shape_and_locality():
    """Logits of slice z depend on slices z-1..z+1 only (k = 3, inference mode)."""
    seg = SliceSegmenter(4, slab_size=3, base_width=2, levels=2)
    vol = rand(2, 8, 8, 6, 1, seed=1)
    seg(vol, training=True)  # non-trivial BN statistics
    out = seg(vol).numpy()
    assert out.shape == (2, 8, 8, 6, 4)
    for j in (0, 3, 5):
        other = vol.copy()
        other[:, :, :, j] += rand(2, 8, 8, 1, seed=j + 5)
        diff = np.abs(seg(other).numpy() - out).max(axis=(0, 1, 2, 4))   # per slice
        near = [z for z in range(6) if abs(z - j) <= 1]
        far = [z for z in range(6) if abs(z - j) > 1]
        assert np.all(diff[near] > 1e-6), (j, diff)
        np.testing.assert_array_equal(diff[far], 0.0)
    # the first slice sees the slab (x0, x0, x1): the 2D net applied to it by hand
    v = vol[..., 0]
    by_hand = seg.unet(np.stack([v[..., 0], v[..., 0], v[..., 1]], -1)).numpy()
    np.testing.assert_allclose(out[:, :, :, 0], by_hand, atol=1e-5)


def test_slice_features_maps_and_dynamic_shapes():
    net = UNet2D(base_width=2, levels=3)
    feats = SliceFeatures(net, slab_size=1)
    out = feats(rand(1, 16, 8, 3, 1))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "stride_1": (1, 16, 8, 3, 4), "stride_2": (1, 8, 4, 3, 8), "stride_4": (1, 4, 2, 3, 16),
        "decoder_stride_1": (1, 16, 8, 3, 4)}
    fn = tf.function(lambda v: feats(v)["stride_4"],
                     input_signature=[tf.TensorSpec([None, None, None, None, 1], tf.float32)])
    assert tuple(fn(rand(2, 8, 16, 5, 1)).shape) == (2, 2, 4, 5, 16)
    assert feats.transfer_parts() == {"unet2d": net}


def test_pretrained_unet2d_loads_into_segmenter_except_the_head():
    pre = UNet2D(base_width=2, levels=2, out_channels=3, final_activation="sigmoid",
                 name="pretrain_net")
    pre.build((None, 8, 8, 3))
    seg = SliceSegmenter(5, slab_size=3, base_width=2, levels=2)
    seg(rand(1, 8, 8, 2, 1))
    report = transfer(seg.transfer_parts(), {"unet2d": pre})
    assert sorted(report.shape_mismatch) == [
        "unet2d/head/bias: model (5,) vs source (3,)",
        "unet2d/head/kernel: model (1, 1, 4, 5) vs source (1, 1, 4, 3)"]
    assert len(report.matched) == len(pre.weights) - 2 and not report.missing
    np.testing.assert_array_equal(seg.unet.get_layer("enc1").units[0].conv.kernel.numpy(),
                                  pre.get_layer("enc1").units[0].conv.kernel.numpy())
