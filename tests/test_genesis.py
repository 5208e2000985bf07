"""Models Genesis: the recipe (flips shared by input and target, corruptions
where expected), the loss, the gradients, export and transfer."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from rr_tf.data import recipes
from rr_tf.errors import ConfigError
from rr_tf.methods.genesis import Config, ModelsGenesis
from rr_tf.models.parts import UNetFeatures
from rr_tf.training.pretrain import PretrainConfig
from rr_tf.transfer import transfer
from method_harness import build_method, uniform_views

VOLUME = tf.cast(tf.random.stateless_uniform([60, 56, 40, 1], [4, 2], -1000, 1000, tf.int32), tf.int16)
CROP = (32, 32, 20)
OFF = dict(shuffle_p=0.0, nonlinear_p=0.0, paint_p=0.0)  # no corruption
TINY = Config(base_width=2)


def to_unit(x):
    return tf.cast(x, tf.float32) / 2000.0 + 0.5


def _sample(seed, **kwargs):
    fn = recipes.genesis_pair(CROP, foreground_p=0.0, **kwargs)
    return {k: v.numpy() for k, v in fn(VOLUME, tf.constant(seed, tf.int64), to_unit).items()}


def _clean_crop(box):
    (x, y, z), (dx, dy, dz) = box
    return to_unit(VOLUME[x:x + dx, y:y + dy, z:z + dz]).numpy()


def test_target_is_the_clean_crop_with_the_flips_of_the_input():
    seen = set()
    for seed in ([1, 1], [2, 3], [5, 8], [7, 1], [9, 9], [3, 4]):
        plain = _sample(seed, flip_p=0.5, **OFF)
        axes = tuple(np.flatnonzero(plain["flips"]))
        seen.add(axes)
        expected = np.flip(_clean_crop(plain["box"]), axes) if axes else _clean_crop(plain["box"])
        np.testing.assert_allclose(plain["target"], expected, atol=1e-6)
        # without corruption the input *is* the target: both carry the same flips
        np.testing.assert_array_equal(plain["input"], plain["target"])
        # the corruptions change the input only: same box, flips and target
        corrupted = _sample(seed, flip_p=0.5)
        np.testing.assert_array_equal(corrupted["box"], plain["box"])
        np.testing.assert_array_equal(corrupted["flips"], plain["flips"])
        np.testing.assert_array_equal(corrupted["target"], plain["target"])
        assert corrupted["input"].shape == corrupted["target"].shape == CROP + (1,)
    assert len(seen) > 1  # the seeds exercised several flip patterns


def test_local_shuffling_moves_voxels_without_changing_their_values():
    out = _sample([3, 3], shuffle_p=1.0, nonlinear_p=0.0, paint_p=0.0)
    x, t = out["input"], out["target"]
    assert not np.array_equal(x, t)
    # every value comes from the target (windows read the original crop, as
    # the reference's do; overlapping windows may repeat a value)
    assert np.isin(x.ravel(), t.ravel()).all()
    # small windows (at most a tenth of the crop per axis) cover most of it
    assert 0.05 < np.mean(x != t) < 0.95


def test_nonlinear_map_is_a_monotone_function_of_the_target():
    for seed in ([1, 2], [4, 4], [6, 1]):
        out = _sample(seed, shuffle_p=0.0, nonlinear_p=1.0, paint_p=0.0)
        x, t = out["input"].ravel(), out["target"].ravel()
        assert not np.allclose(x, t)
        steps = np.diff(x[np.argsort(t, kind="stable")])
        assert np.all(steps >= -1e-6) or np.all(steps <= 1e-6)
        assert 0.0 <= x.min() and x.max() <= 1.0


def test_in_painting_fills_inner_boxes_and_keeps_the_rest():
    out = _sample([2, 2], shuffle_p=0.0, nonlinear_p=0.0, paint_p=1.0, outpaint_p=0.0)
    x, t = out["input"][..., 0], out["target"][..., 0]
    changed = x != t
    assert 0.0 < changed.mean() < 0.5
    # boxes lie at least 3 voxels from the border: the faces are untouched
    for axis in range(3):
        for index in (0, -1):
            assert not np.take(changed, index, axis=axis).any()


def test_out_painting_keeps_inner_boxes_and_fills_the_rest():
    out = _sample([2, 2], shuffle_p=0.0, nonlinear_p=0.0, paint_p=1.0, outpaint_p=1.0)
    x, t = out["input"][..., 0], out["target"][..., 0]
    kept = x == t
    assert 0.05 < kept.mean() < 0.7
    for axis in range(3):
        for index in (0, -1):
            assert not np.take(kept, index, axis=axis).any()  # the faces are noise
    # what is kept is a union of boxes: its bounding box lies inside the crop
    idx = np.argwhere(kept)
    assert np.all(idx.min(0) >= 3) and np.all(idx.max(0) <= np.array(CROP) - 4)


def _batch(b=2, shape=(16, 16, 16), seed=0):
    return uniform_views(("input", "target"), b, shape, seed)


def _method(config=TINY):
    return build_method(ModelsGenesis, config, _batch(), seed=1, optimizer=("sgd", 0.1, 100))


def test_loss_is_the_mse_of_the_restoration():
    m = _method()
    b = _batch(seed=4)
    pred = m.unet(b["input"], training=True).numpy()  # batch statistics, as train_step
    assert pred.min() >= 0.0 and pred.max() <= 1.0  # sigmoid head
    logs = m.train_step(b)
    np.testing.assert_allclose(float(logs["loss"]), np.mean((pred - b["target"].numpy()) ** 2),
                               rtol=1e-5)
    np.testing.assert_allclose(float(logs["input_mse"]),
                               np.mean((b["input"].numpy() - b["target"].numpy()) ** 2), rtol=1e-5)
    linear = _method(dataclasses.replace(TINY, output_activation="linear"))
    assert linear.unet.head.activation is keras.activations.linear


def test_gradient_reaches_every_unet_variable():
    m = _method()
    b = _batch(seed=2)
    with tf.GradientTape() as tape:
        loss, _ = m.restoration_loss(b, training=True)
    variables = m.trainable_variables
    assert {v.path for v in variables} == {v.path for v in m.unet.trainable_variables}
    grads = tape.gradient(loss, variables)
    for v, g in zip(variables, grads):
        assert g is not None and float(tf.reduce_max(tf.abs(g))) > 0.0, v.path
    layers = {v.path.split("/")[1] for v in variables}
    assert {"enc1", "enc4", "up1", "dec1", "up3", "dec3", "head"} <= layers


def test_export_holds_the_whole_unet_and_transfers(tmp_path):
    m = _method()
    m.train_step(_batch())
    v = _batch()["input"]
    part = m.export_parts()["unet"]
    out = part(v)
    assert sorted(out) == sorted(["stride_1", "stride_2", "stride_4", "stride_8", "decoder_stride_4",
                                  "decoder_stride_2", "decoder_stride_1", "output"])
    assert out["decoder_stride_1"].shape == (2, 16, 16, 16, 4) and out["stride_8"].shape[-1] == 32
    np.testing.assert_allclose(out["output"], m(v), atol=1e-6)
    path = str(tmp_path / "unet.keras")
    part.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, UNetFeatures)
    np.testing.assert_allclose(loaded(v)["output"], out["output"], atol=1e-6)
    # the loaded export initialises a fresh model's U-Net, decoder and head included
    fresh = _method()
    report = transfer(fresh.transfer_parts(), loaded.transfer_parts())
    assert not report.missing and not report.shape_mismatch
    assert any(k.startswith("unet/dec1/") for k in report.matched)
    assert "unet/head/kernel" in report.matched
    np.testing.assert_allclose(fresh(v), m(v), atol=1e-6)


@pytest.mark.parametrize("crop", [(36, 32, 32), (32, 32, 20)])
def test_config_checks(crop):
    run = PretrainConfig("genesis", "d", "r", crop_size=crop)
    with pytest.raises(ConfigError, match="crop_size"):
        ModelsGenesis.check_config(Config(), run)
    ModelsGenesis.check_config(Config(levels=2), run)  # stride 2 only: fine


def test_recipe_follows_the_config():
    cfg = Config(flip_p=0.0, **OFF)
    out = ModelsGenesis.recipe(cfg, CROP)(VOLUME, tf.constant([1, 5], tf.int64), to_unit)
    np.testing.assert_array_equal(out["flips"], [0, 0, 0])
    np.testing.assert_array_equal(out["input"], out["target"])
