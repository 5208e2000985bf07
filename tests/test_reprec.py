"""RepRec mechanics: masking, stop-gradients, queue, two-stage schedule."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from rr_tf.errors import ConfigError
from rr_tf.methods.reprec import CELL, RepRec
from rr_tf.training.pretrain import PretrainConfig
from method_harness import REPREC_TINY, assert_constants, build_method, reprec_batch, watching

TINY, _batch = REPREC_TINY, reprec_batch


def _method(config=TINY, batch=None):
    return build_method(RepRec, config, batch or _batch())


def test_cell_mask_geometry():
    m = _method()
    v = _batch(b=3, shape=(32, 48, 32))["view1"]
    token_mask, ids_keep, ids_restore, voxel, grid = m.cell_mask(v)
    assert grid == (2, 3, 2) and token_mask.shape == (3, 12)
    np.testing.assert_array_equal(tf.reduce_sum(token_mask, 1), [6, 6, 6])
    # the voxel mask is the token mask blown up to 16^3 cells
    cells = tf.reshape(token_mask, (3,) + grid)
    for i, j, k in [(0, 0, 0), (1, 2, 1), (0, 1, 1)]:
        block = voxel[:, i * CELL:(i + 1) * CELL, j * CELL:(j + 1) * CELL, k * CELL:(k + 1) * CELL, 0]
        np.testing.assert_array_equal(tf.reduce_min(block, [1, 2, 3]), cells[:, i, j, k])
        np.testing.assert_array_equal(tf.reduce_max(block, [1, 2, 3]), cells[:, i, j, k])
    # kept ids are exactly the unmasked tokens
    kept = tf.gather(token_mask, ids_keep, batch_dims=1)
    assert float(tf.reduce_max(kept)) == 0.0
    masked = m.masked_input(v, voxel)
    np.testing.assert_array_equal(masked.numpy()[voxel.numpy() > 0], 0.0)
    np.testing.assert_array_equal(masked.numpy()[voxel.numpy() == 0], v.numpy()[voxel.numpy() == 0])


def test_masked_content_cannot_leak_into_the_prediction():
    """Input-level masking: changing voxels inside masked cells changes nothing."""
    m = _method()
    v = _batch()["view1"]
    token_mask, _, _, voxel, _ = m.cell_mask(v)
    other = v + voxel * tf.random.uniform(v.shape, 0.5, 1.0)
    loss_a, pred_a, *_ = m.recovery_terms(v, training=False)
    loss_b, pred_b, *_ = m.recovery_terms(other, training=False)
    np.testing.assert_allclose(pred_a, pred_b, atol=1e-5)


def test_gradients_reach_online_parts_only():
    m = _method()
    b = _batch()
    targets = m.cnn_ema.target.weights + m.proj_ema.target.weights + m.queue.weights
    with watching(targets) as tape:
        l_con, *_ = m.contrastive_terms(b["view1"], b["view2"], training=True)
        l_rec, *_ = m.recovery_terms(b["view1"], training=True)
        total = l_con + l_rec
    # EMA copies, queue: constants of the objective
    assert_constants(targets, tape.gradient(total, [w.value for w in targets]))
    grads = tape.gradient(total, m.trainable_variables)
    names_with_grad = {v.path for v, g in zip(m.trainable_variables, grads) if g is not None}
    for part in ("cnn", "transformer", "decoder", "projection"):
        assert any(part in n for n in names_with_grad), part
    assert not any("_ema" in v.path for v in m.trainable_variables)


def test_train_step_updates_queue_fifo_and_ema():
    m = _method()
    queue_before = m.queue.values().numpy().copy()
    ema_before = [w.numpy().copy() for w in m.cnn_ema.target.weights]
    logs = m.train_step(_batch())
    assert np.isfinite(float(logs["loss"])) and float(logs["loss_recover"]) > 0
    q = m.queue.values().numpy()
    assert int(m.queue.pointer.numpy()) == 2
    assert not np.allclose(q[:2], queue_before[:2]) and np.allclose(q[2:], queue_before[2:])
    np.testing.assert_allclose(np.linalg.norm(q[:2], axis=1), 1.0, rtol=1e-5)
    # the EMA is updated before the optimizer step (MoCo): it moves from step 2 on
    m.train_step(_batch(seed=1))
    assert int(m.queue.pointer.numpy()) == 4
    after = [w.numpy() for w in m.cnn_ema.target.weights]
    assert any(not np.array_equal(a, b) for a, b in zip(after, ema_before))


def test_target_std_reports_collapsed_recovery_targets():
    """The collapse monitor of the lambda_contrast=0 ablation: spread-out
    targets score above 0; a target CNN that maps everything to the same
    (zero) features scores 0."""
    m = _method(dataclasses.replace(TINY, lambda_contrast=0.0))
    logs = m.train_step(_batch())
    healthy = float(logs["target_std"])
    assert 0.0 < healthy <= 1.0
    fresh = _method(dataclasses.replace(TINY, lambda_contrast=0.0))
    for w in fresh.cnn_ema.target.weights:
        if w.path.endswith("kernel"):
            w.assign(np.zeros(w.shape, w.dtype))
    fresh.cnn_ema.momentum = 1.0  # the EMA step keeps the collapsed target
    assert float(fresh.train_step(_batch())["target_std"]) < 1e-6 < healthy


def test_two_stage_trains_the_right_parts():
    cfg = dataclasses.replace(TINY, schedule="two_stage", stage1_steps=1)
    m = _method(cfg)
    cnn = [w.numpy().copy() for w in m.encoder.cnn.trainable_weights]
    trf = [w.numpy().copy() for w in m.encoder.transformer.trainable_weights]
    m.stage = 1
    logs = m.train_step(_batch())
    assert float(logs["loss_recover"]) == 0.0
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(cnn, m.encoder.cnn.trainable_weights))
    np.testing.assert_array_equal(trf[0], m.encoder.transformer.trainable_weights[0].numpy())
    m.stage = 2
    m.reset_metrics()  # reported values are running means
    cnn = [w.numpy().copy() for w in m.encoder.cnn.trainable_weights]
    logs = m.train_step(_batch(seed=1))
    assert float(logs["loss_contrast"]) == 0.0
    for a, w in zip(cnn, m.encoder.cnn.trainable_weights):
        np.testing.assert_array_equal(a, w.numpy())
    assert any(not np.array_equal(a, w.numpy())
               for a, w in zip(trf, m.encoder.transformer.trainable_weights))


@pytest.mark.parametrize("change,field", [
    (dict(crop_size=(40, 32, 32)), "crop_size"),
    (dict(train_steps=5), "stage1_steps"),
])
def test_config_checks(change, field):
    run = dataclasses.replace(PretrainConfig("reprec", "d", "r", crop_size=(32, 32, 32),
                                             train_steps=100), **change)
    cfg = dataclasses.replace(TINY, schedule="two_stage", stage1_steps=10)
    with pytest.raises(ConfigError, match=field):
        RepRec.check_config(cfg, run)


def test_checkpoint_round_trips_every_variable(tmp_path):
    """Regression: nested Keras models (hybrid encoder, EMA CNN) must have all
    their variables in the checkpoint, BN statistics included."""
    from rr_tf.training.loop import checkpoint_for, restore_latest

    m = _method(dataclasses.replace(TINY, momentum=0.5))
    m.train_step(_batch())
    m.train_step(_batch(seed=1))
    tf.train.CheckpointManager(checkpoint_for(m), str(tmp_path), max_to_keep=1).save(checkpoint_number=2)
    fresh = _method(dataclasses.replace(TINY, momentum=0.5))
    assert restore_latest(fresh, str(tmp_path)) == 2
    assert len(m.weights) == len(fresh.weights) > 100
    for a, b in zip(m.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    bn_stats = [w for w in m.cnn_ema.target.weights if "moving_mean" in w.path]
    assert bn_stats and any(float(np.abs(w.numpy()).max()) > 0 for w in bn_stats)
