"""MAE-3D mechanics: exact masking ratio, loss on masked patches only, the
per-patch normalised target, no leak from masked patches, export, and the
same masks on 1 or 2 replicas (subprocess: logical devices must be set up
before TensorFlow initialises)."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from rr_tf.errors import ConfigError
from rr_tf.methods import get_method
from rr_tf.methods.mae import MAE, Config, masked_crop
from rr_tf.methods.masking import global_random_masking
from rr_tf.models.vit3d import unpatchify
from method_harness import build_method
from rr_tf.training.pretrain import PretrainConfig
from subproc import run_logged

TINY = Config(patch_size=8, transformer_dim=24, transformer_depth=2, transformer_heads=2,
              decoder_dim=12, decoder_depth=1, decoder_heads=2)


def _volume(b=2, shape=(32, 32, 16), seed=0):
    return tf.random.Generator.from_seed(seed).uniform((b,) + shape + (1,))


def _method(config=TINY, shape=(32, 32, 16)):
    return build_method(MAE, config, {"image": _volume(shape=shape)}, seed=5)


def test_masking_ratio_is_exact_per_sample():
    m = _method()
    v = _volume(b=3)
    token_mask, ids_keep, ids_restore, grid = m.random_masking(v)
    assert grid == (4, 4, 2)
    n = 32
    keep = n - int(0.75 * n)  # 8 visible, 24 masked in every sample
    np.testing.assert_array_equal(tf.reduce_sum(token_mask, 1), [n - keep] * 3)
    assert ids_keep.shape == (3, keep)
    assert float(tf.reduce_max(tf.gather(token_mask, ids_keep, batch_dims=1))) == 0.0
    # ids_restore inverts the shuffle; samples differ; same (seed, step) -> same mask
    assert sorted(ids_restore.numpy()[0]) == list(range(n))
    assert not np.array_equal(token_mask[0], token_mask[1])
    np.testing.assert_array_equal(token_mask, m.random_masking(v)[0])
    # 0.6 of 12 tokens: round(4.8) = 5 visible, 7 masked
    mask6 = global_random_masking(v, 12, 0.6, seed=1, step=0)[0]
    np.testing.assert_array_equal(tf.reduce_sum(mask6, 1), [7, 7, 7])


def test_target_is_the_per_patch_normalised_voxels():
    vol = np.arange(16 * 8 * 8, dtype=np.float32).reshape(1, 16, 8, 8, 1) ** 1.5 / 1000.0
    m = MAE(dataclasses.replace(TINY, patch_size=8), seed=0)
    target = m.targets(tf.constant(vol)).numpy()
    assert target.shape == (1, 2, 512)  # grid 2 x 1 x 1, 8^3 voxels per patch
    for t, d0 in enumerate((0, 8)):  # token order: (d, h, w) row-major
        patch = vol[0, d0:d0 + 8, :, :, 0].reshape(-1).astype(np.float64)  # (pd, ph, pw) order
        expected = (patch - patch.mean()) / np.sqrt(patch.var() + 1e-6)
        np.testing.assert_allclose(target[0, t], expected, rtol=1e-4, atol=1e-4)
    raw = MAE(dataclasses.replace(TINY, norm_pix_loss=False), seed=0).targets(tf.constant(vol))
    np.testing.assert_allclose(raw[0, 1], vol[0, 8:16, :, :, 0].reshape(-1), rtol=1e-6)


def test_loss_ignores_visible_patches():
    m = _method()
    v = _volume()
    token_mask = m.random_masking(v)[0]
    pred = tf.Variable(tf.random.normal((2, 32, 512), seed=1))
    with tf.GradientTape() as tape:
        loss = m.forward_loss(v, pred, token_mask)
    grad = tape.gradient(loss, pred).numpy()
    visible = token_mask.numpy() == 0
    assert np.all(grad[visible] == 0.0) and np.all(np.abs(grad[~visible]).sum(-1) > 0)
    # a different prediction at the visible patches leaves the loss unchanged
    changed = tf.where(token_mask[:, :, None] > 0, pred, pred + 100.0)
    np.testing.assert_allclose(float(m.forward_loss(v, changed, token_mask)), float(loss),
                               rtol=1e-6)
    # hand check: mean over masked patches of the per-patch mean squared error
    err = ((pred.numpy() - m.targets(v).numpy()) ** 2).mean(-1)
    np.testing.assert_allclose(float(loss), err[~visible].mean(), rtol=1e-5)


def test_masked_patches_cannot_leak():
    """The encoder sees visible patches only: changing the voxels of masked
    patches changes neither the latents nor the prediction."""
    m = _method()
    v = _volume()
    token_mask, ids_keep, ids_restore, grid = m.random_masking(v)
    voxel_mask = unpatchify(tf.repeat(token_mask[:, :, None], 8 ** 3, axis=-1), 8, grid)
    other = v + voxel_mask * tf.random.uniform(v.shape, 1.0, 2.0, seed=2)
    lat_a = m.forward_encoder(v, ids_keep)
    lat_b = m.forward_encoder(other, ids_keep)
    np.testing.assert_allclose(lat_a, lat_b, atol=1e-6)
    _, pred_a, mask_a, _ = m.forward(v)
    _, pred_b, mask_b, _ = m.forward(other)
    np.testing.assert_array_equal(mask_a, mask_b)
    np.testing.assert_allclose(pred_a, pred_b, atol=1e-5)
    # the matmul patch embedding is the ViT's own Conv3D embedding
    np.testing.assert_allclose(m.patch_tokens(v), m.vit.embed(v)[0], atol=1e-5)


def test_train_step_updates_encoder_and_decoder():
    m = _method()
    assert get_method("mae") is MAE
    before = {w.path: w.numpy().copy() for w in m.trainable_weights}
    logs = m.train_step({"image": _volume(seed=3)})
    assert 0.5 < float(logs["loss"]) < 2.0  # ~1 at init for per-patch normalised targets
    for w in m.trainable_weights:  # every weight gets a gradient (mask token included)
        assert not np.array_equal(before[w.path], w.numpy()), w.path
    assert any("mask_token" in w.path for w in m.trainable_weights)


def test_summary_images_and_export(tmp_path):
    import keras

    m = _method()
    imgs = m.summary_images({"image": _volume()})
    assert sorted(imgs) == ["input", "masked_input", "reconstruction"]
    assert all(i.shape == (2, 32, 32, 1) for i in imgs.values())
    assert m.transfer_parts() == {"vit": m.vit}
    export = m.export_parts()["vit_encoder"]
    out = export(_volume())
    assert sorted(out) == ["block_1", "block_2", "output"]
    assert out["output"].shape == (2, 4, 4, 2, 24)
    path = str(tmp_path / "vit.keras")
    export.save(path)
    again = keras.saving.load_model(path)
    np.testing.assert_allclose(again(_volume())["block_1"], out["block_1"], atol=1e-5)
    assert sorted(again.transfer_parts()) == ["vit"]


def test_recipe_and_config_checks():
    image = tf.cast(tf.random.uniform((40, 40, 40, 1), -1000, 1000), tf.int16)
    out = masked_crop((32, 32, 16))(image, tf.constant([1, 2]), lambda x: tf.cast(x, tf.float32))
    assert out["image"].shape == (32, 32, 16, 1) and out["image"].dtype == tf.int16
    run = PretrainConfig("mae", "d", "r", crop_size=(32, 32, 16))
    MAE.check_config(TINY, run)
    with pytest.raises(ConfigError, match="crop_size"):
        MAE.check_config(TINY, dataclasses.replace(run, crop_size=(36, 32, 16)))
    with pytest.raises(ConfigError, match="decoder_heads"):
        MAE.check_config(dataclasses.replace(TINY, decoder_heads=5), run)


MASK_SCRIPT = r'''
import json
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from rr_tf.methods.masking import global_random_masking, global_uniform

batch = tf.reshape(tf.range(4 * 3, dtype=tf.float32), (4, 3))
one = global_random_masking(batch, 20, 0.75, seed=7, step=3)[0].numpy().tolist()
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
ds = tf.data.Dataset.from_tensors(batch).unbatch().batch(4)
dist = strategy.experimental_distribute_dataset(ds)
out = strategy.run(tf.function(lambda b: global_random_masking(b, 20, 0.75, seed=7, step=3)[0]),
                   (next(iter(dist)),))
two = tf.concat(strategy.experimental_local_results(out), 0).numpy().tolist()
# RepRec's mask_fill=noise draw: per sample over the global batch
fill_one = global_uniform(batch, 8, 3).numpy().tolist()
fill = strategy.run(tf.function(lambda b: global_uniform(b, 8, 3)), (next(iter(dist)),))
fill_two = tf.concat(strategy.experimental_local_results(fill), 0).numpy().tolist()
print(json.dumps({"one": one, "two": two, "fill_one": fill_one, "fill_two": fill_two}))
'''


def test_one_vs_two_replicas_mask_alike():
    """The noise is drawn for the global batch; each replica keeps its rows."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    res = run_logged([sys.executable, "-c", MASK_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["two"]) == 4 and out["one"] == out["two"]
    assert len({tuple(r) for r in out["one"]}) == 4  # four different masks
    assert out["fill_one"] == out["fill_two"] and len({tuple(r) for r in out["fill_one"]}) == 4
