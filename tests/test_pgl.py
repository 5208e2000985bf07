"""PGL mechanics: overlap mapping (hand-computed), alignment of identical
content, the recipe's boxes and flips, EMA target (no gradient, moves by
1 - m)."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from rr_tf.data import recipes, views
from rr_tf.errors import ConfigError
from rr_tf.methods.alignment import overlap_regions, region_mask, sample_region
from rr_tf.methods.pgl import PGL, Config, decoder_stages, local_consistency
from rr_tf.training.pretrain import PretrainConfig
from method_harness import assert_constants, build_method, uniform_views, watching

TINY = Config(base_width=2, levels=3, proj_dim=8, proj_hidden_dim=16, local_dim=4, local_stages=2,
              momentum=0.9, key_bn_groups=1)  # small batches: one BatchNorm group
CROP = (16, 16, 8)


def _region(box1, box2, flips1=(0, 0, 0), flips2=(0, 0, 0), crop=(32, 32, 32), stride=2):
    r1, r2 = overlap_regions(tf.constant([box1]), tf.constant([box2]), tf.constant([flips1]),
                             tf.constant([flips2]), crop, stride)
    return r1.numpy()[0], r2.numpy()[0]


def test_overlap_maps_to_the_hand_computed_cells():
    # axis 0: box1 = [0:32], box2 = [16:48], crop 32, stride 2 -> the overlap
    # [16:32] is cells 8..16 of view 1 and 0..8 of view 2; axes 1, 2 coincide
    b1 = [[0, 0, 0], [32, 32, 32]]
    b2 = [[16, 0, 0], [32, 32, 32]]
    r1, r2 = _region(b1, b2)
    np.testing.assert_allclose(r1, [[8, 0, 0], [16, 16, 16]])
    np.testing.assert_allclose(r2, [[0, 0, 0], [8, 16, 16]])
    # view 2 flipped on axis 0: the region mirrors (16 - 0 .. 16 - 8), run backwards
    _, r2f = _region(b1, b2, flips2=(1, 0, 0))
    np.testing.assert_allclose(r2f, [[16, 0, 0], [8, 16, 16]])
    # view 1 flipped on axis 1 (full overlap there): the whole axis, backwards
    r1f, _ = _region(b1, b2, flips1=(0, 1, 0))
    np.testing.assert_allclose(r1f, [[8, 16, 0], [16, 0, 16]])
    # resize: box2 is 64 voxels on axis 0, resized to 32 -> 0.25 cells per voxel at stride 2
    _, r2r = _region(b1, [[16, 0, 0], [64, 32, 32]])
    np.testing.assert_allclose(r2r[:, 0], [0, 4])
    # stride 4 halves the cell coordinates; disjoint boxes give an empty region
    r1s, _ = _region(b1, b2, stride=4)
    np.testing.assert_allclose(r1s[:, 0], [4, 8])
    r1e, _ = _region(b1, [[40, 0, 0], [8, 32, 32]])
    assert r1e[0, 0] == r1e[1, 0]


def test_sample_region_reads_the_cells_in_order_and_backwards_when_flipped():
    ramp = tf.reshape(tf.range(16, dtype=tf.float32), [1, 16, 1, 1, 1]) * tf.ones([1, 16, 2, 2, 1])
    forward = sample_region(ramp, tf.constant([[[8, 0, 0], [16, 2, 2]]], tf.float32), (8, 2, 2))
    np.testing.assert_allclose(forward[0, :, 0, 0, 0], np.arange(8, 16))
    backward = sample_region(ramp, tf.constant([[[16, 0, 0], [8, 2, 2]]], tf.float32), (8, 2, 2))
    np.testing.assert_allclose(backward[0, :, 0, 0, 0], np.arange(15, 7, -1))
    half = sample_region(ramp, tf.constant([[[8, 0, 0], [16, 2, 2]]], tf.float32), (4, 2, 2))
    np.testing.assert_allclose(half[0, :, 0, 0, 0], [8.5, 10.5, 12.5, 14.5])  # trilinear
    mask = region_mask(tf.constant([[[16, 0, 0], [8, 2, 2]]], tf.float32), (16, 2, 2))
    np.testing.assert_array_equal(mask[0, :, 0, 0, 0], [0] * 8 + [1] * 8)


def _linear_field(shape, channels=3):
    """Feature volume linear in the voxel-centre coordinates (trilinear
    resampling reproduces it exactly)."""
    rng = np.random.default_rng(0)
    coeff = rng.normal(size=(3, channels)).astype("float32")
    bias = rng.normal(size=(channels,)).astype("float32") * 10
    grid = np.stack(np.meshgrid(*[np.arange(s) + 0.5 for s in shape], indexing="ij"), -1)
    return tf.constant(grid.astype("float32") @ coeff + bias)


def test_identical_content_in_the_overlap_gives_zero_local_loss():
    """Views of one feature volume (different boxes, sizes and flips),
    pooled to stride 2 like a network would: after alignment the two
    overlap grids are identical, so the MSE is 0 and the cosine loss -1;
    ignoring a flip breaks it."""
    vol = _linear_field((64, 64, 48))
    crop = (32, 32, 16)
    box1 = tf.constant([[4, 6, 2], [40, 36, 20]])
    box2 = tf.constant([[14, 0, 10], [48, 40, 24]])
    flips1, flips2 = tf.constant([1, 0, 0]), tf.constant([0, 1, 1])

    def view(box, flips):
        v = views.crop_resize(vol, box, crop)                      # [32, 32, 16, 3]
        for a in range(3):
            v = tf.reverse(v, [a]) if int(flips[a]) else v
        return tf.nn.avg_pool3d(v[None], 2, 2, "VALID")            # stride-2 "features"

    f1, f2 = view(box1, flips1), view(box2, flips2)
    r1, r2 = overlap_regions(box1[None], box2[None], flips1[None], flips2[None], crop, 2)
    a1, a2 = sample_region(f1, r1, (4, 4, 2)), sample_region(f2, r2, (4, 4, 2))
    np.testing.assert_allclose(a1.numpy(), a2.numpy(), atol=1e-3)
    assert float(local_consistency(a1, a2, "mse")) == pytest.approx(0.0, abs=1e-5)
    assert float(local_consistency(a1, a2, "cosine")) == pytest.approx(-1.0, abs=1e-5)
    _, wrong = overlap_regions(box1[None], box2[None], flips1[None], tf.zeros([1, 3], tf.int32),
                               crop, 2)
    assert float(local_consistency(a1, sample_region(f2, wrong, (4, 4, 2)), "mse")) > 1.0


def test_recipe_returns_boxes_and_flips_that_align_its_views():
    hu = tf.cast(tf.round(_linear_field((64, 64, 48), 1) * 2.0), tf.int16)  # linear HU, in window
    to_unit = lambda x: tf.cast(x, tf.float32) / 2000.0 + 0.5  # noqa: E731
    fn = recipes.pgl_pair((24, 24, 16), min_iou=0.3, intensity=False)
    seen_flip = False
    for seed in ([1, 2], [3, 4], [5, 7]):
        out = fn(hu, tf.constant(seed, tf.int64), to_unit)
        assert out["view1"].shape == (24, 24, 16, 1) and out["flips1"].shape == (3,)
        assert views.iou3d(out["box1"], out["box2"]).numpy() >= 0.3
        seen_flip |= bool(tf.reduce_any(out["flips1"] != out["flips2"]))
        b = {k: v[None] for k, v in out.items()}
        r1, r2 = overlap_regions(b["box1"], b["box2"], b["flips1"], b["flips2"], (24, 24, 16), 1)
        a1 = sample_region(b["view1"], r1, (6, 6, 4))
        a2 = sample_region(b["view2"], r2, (6, 6, 4))
        np.testing.assert_allclose(a1.numpy(), a2.numpy(), atol=1e-4)
    assert seen_flip
    again = fn(hu, tf.constant([1, 2], tf.int64), to_unit)
    assert int(tf.reduce_sum(tf.abs(again["box1"] - fn(hu, tf.constant([1, 2], tf.int64),
                                                         to_unit)["box1"]))) == 0


def _batch(b=2, seed=0):
    return {**uniform_views(("view1", "view2"), b, CROP, seed),
            "box1": tf.constant([[[0, 0, 0], [16, 16, 8]]] * b),
            "box2": tf.constant([[[4, 2, 0], [20, 20, 10]]] * b),
            "flips1": tf.constant([[0, 1, 0]] * b), "flips2": tf.constant([[1, 0, 1]] * b)}


def _method(config=TINY):
    keras.utils.set_random_seed(1)
    return build_method(PGL, config, _batch(), optimizer=("sgd", 1e-2, 100))


def test_targets_get_no_gradient_and_online_parts_do():
    m = _method()
    targets = (m.unet_ema.target.weights + m.projector_ema.target.weights
               + m.local_projector_ema.target.weights)
    assert not {id(v) for v in targets} & {id(v) for v in m.trainable_variables}
    with watching(targets) as tape:
        terms = m.objective(_batch())
    assert_constants(targets, tape.gradient(terms["loss"], [w.value for w in targets]))
    variables = m._trained_variables()
    grads = tape.gradient(terms["loss"], variables)
    missing = [v.path for v, g in zip(variables, grads) if g is None]
    assert not missing, missing
    assert {id(v) for v in m.unet.head.trainable_variables}.isdisjoint({id(v) for v in variables})
    assert set(terms) == set(PGL.metric_names)
    assert -1.0 <= float(terms["loss_global"]) <= 1.0 and -1.0 <= float(terms["loss_local"]) <= 1.0


def test_ema_moves_by_one_minus_m_per_step():
    m = _method()
    pairs = [(t, o) for ema in m.momentum_encoders()
             for t, o in zip(ema.target.weights, ema.online.weights)]
    assert len(pairs) > 50
    m.train_step(_batch())  # targets and online differ after one optimizer step
    before = [(t.numpy().copy(), o.numpy().copy()) for t, o in pairs]
    assert any(not np.allclose(t, o) for t, o in before)
    m.train_step(_batch(seed=1))  # EMA update first, from the online weights before this step
    for (t, o), (tw, _) in zip(before, pairs):
        np.testing.assert_allclose(tw.numpy(), 0.9 * t + 0.1 * o, rtol=1e-5, atol=1e-6,
                                   err_msg=tw.path)


def test_image_panel_and_config_checks():
    m = _method()
    images = m.summary_images(_batch())
    assert images["view1_overlap"].shape == (2, 16, 16, 3)
    assert images["overlap1"].shape == (2, 16, 16, 1) and images["local_cosine"].shape[0] == 2
    for img in images.values():
        assert 0.0 <= float(tf.reduce_min(img)) and float(tf.reduce_max(img)) <= 1.0
    run = PretrainConfig("pgl", "d", "r", crop_size=(64, 64, 32), train_steps=10)
    PGL.check_config(Config(), run)
    with pytest.raises(ConfigError, match="crop_size"):
        PGL.check_config(Config(), dataclasses.replace(run, crop_size=(60, 64, 32)))
    with pytest.raises(ConfigError, match="local_stages"):
        PGL.check_config(Config(levels=3), run)


def test_fewer_local_stages_skip_the_finer_decoder():
    m = _method(dataclasses.replace(TINY, local_stages=1))
    x = _batch()["view1"]
    pyramid = m.unet.encode(x)
    full, _ = m.unet.decode(pyramid)
    part = decoder_stages(m.unet, pyramid, 1)
    assert len(part) == 1
    np.testing.assert_allclose(part[0].numpy(), full[0].numpy(), atol=1e-6)
    variables = m._trained_variables()
    assert not any("dec1" in v.path or "up1" in v.path for v in variables)
    with tf.GradientTape() as tape:
        loss = m.objective(_batch())["loss"]
    assert all(g is not None for g in tape.gradient(loss, variables))


def test_stage_heads_serialize():
    from rr_tf.methods.pgl import StageHeads

    heads = StageHeads(2, 8, 4, name="local_projector")
    maps = [tf.zeros((1, 4, 4, 2, 6)), tf.zeros((1, 8, 8, 4, 3))]
    out = heads(maps)
    assert [o.shape for o in out] == [(1, 4, 4, 2, 4), (1, 8, 8, 4, 4)]
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(heads))
    again(maps)
    assert [w.shape for w in again.weights] == [w.shape for w in heads.weights]
