"""Sequential multi-task SSL: the slab recipe (positions, neighbours, clean
target), the three loss terms and where their gradients go, queue / EMA,
config checks, checkpoint and export parts."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from rr_tf.data import recipes
from rr_tf.errors import ConfigError
from rr_tf.methods.multitask import Config, SequentialMultiTask, global_average
from rr_tf.training.pretrain import PretrainConfig
from method_harness import build_method, watching

TINY = Config(base_width=2, levels=3, queue_size=8, proj_dim=8, momentum=0.5,
              key_bn_groups=1)  # small batches: one BatchNorm group of keys
CROP = (16, 16, 3)


def to_unit(x):
    return tf.cast(x, tf.float32) / 2000.0 + 0.5


def _batch(b=2, crop=CROP, seed=0):
    g = tf.random.Generator.from_seed(seed)
    out = SequentialMultiTask.example_batch(crop, b)
    for key in ("slab1", "slab2", "target", "corrupted"):
        out[key] = g.uniform(out[key].shape)
    out["position1"] = g.uniform([b])
    return out


def _method(config=TINY, batch=None):
    return build_method(SequentialMultiTask, config, batch or _batch())


# ---------------------------------------------------------------- recipe
Z = 9
Z_HU = np.arange(Z) * 200 - 900          # every axial slice constant: its value encodes z
Z_CODED = tf.constant(np.broadcast_to(Z_HU[None, None, :, None], (40, 36, Z, 1)), tf.int16)


def _sample(fn, volume, seed):
    return {k: v.numpy() for k, v in fn(volume, tf.constant(seed, tf.int64)).items()}


def _traced(recipe):
    """The recipe as tf.data runs it: one graph (eager Genesis ops are slow)."""
    return tf.function(lambda volume, seed: recipe(volume, seed, to_unit))


def test_recipe_positions_neighbours_and_slab_slices():
    fn = _traced(recipes.slice_slabs(CROP, neighbour_range=2, foreground_p=0.5, corrupt=False))
    seen = set()
    for seed in range(6):
        out = _sample(fn, Z_CODED, [seed, 7])
        z1, z2 = int(out["z1"]), int(out["z2"])
        seen.add(z1)
        assert out["slab1"].shape == out["target"].shape == out["slab2"].shape == (16, 16, 3)
        assert int(out["depth"]) == Z and abs(z2 - z1) <= 2 and 0 <= z2 < Z
        # hand-computed normalised positions: z / (depth - 1)
        assert out["position1"] == pytest.approx(z1 / 8)
        assert out["position2"] == pytest.approx(z2 / 8)
        # the clean target holds slices z-1, z, z+1 (clamped at the ends) as channels
        expect = to_unit(Z_HU[np.clip([z1 - 1, z1, z1 + 1], 0, Z - 1)]).numpy()
        np.testing.assert_allclose(out["target"], np.broadcast_to(expect, (16, 16, 3)), atol=1e-6)
        assert out["box1"][0, 2] == z1 - 1 and out["box1"][1, 2] == 3
        assert out["box2"][0, 2] == z2 - 1
    assert len(seen) >= 4  # z varies
    same = _traced(recipes.slice_slabs(CROP, neighbour_range=0, corrupt=False))
    for seed in range(2):
        out = _sample(same, Z_CODED, [seed, 1])
        assert int(out["z1"]) == int(out["z2"])


def test_recipe_target_is_the_clean_flipped_window_and_corrupted_differs():
    vol = tf.cast(tf.random.stateless_uniform([40, 36, 12, 1], [4, 2], -1000, 1000, tf.int32),
                  tf.int16)
    fn = _traced(recipes.slice_slabs(CROP, neighbour_range=1, scales=(1.0,)))
    changed = 0
    for seed in range(4):
        out = _sample(fn, vol, [seed, 3])
        (x, y, z), size = out["box1"]                      # z = first slice of the slab
        assert tuple(size) == (16, 16, 3)
        crop = to_unit(tf.gather(vol[x:x + 16, y:y + 16, :, 0],
                                 np.clip(np.arange(z, z + 3), 0, 11), axis=2)).numpy()
        assert out["corrupted"].shape == (16, 16, 3)
        flips = [crop, crop[::-1], crop[:, ::-1], crop[::-1, ::-1]]
        assert any(np.allclose(out["target"], f, atol=1e-6) for f in flips), seed
        changed += not np.allclose(out["corrupted"], out["target"])
        assert 0.0 <= out["corrupted"].min() and out["corrupted"].max() <= 1.0
    assert changed >= 2  # Genesis corruption (p ~ 0.99 of some change)
    with pytest.raises(ValueError, match="odd"):
        recipes.slice_slabs((16, 16, 2))


# ---------------------------------------------------------------- losses and gradients
def _has_grad(grads):
    return any(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)


def test_each_head_gets_gradient_only_from_its_own_term():
    m = _method()
    b = _batch()
    frozen = m.unet_ema.target.weights + m.proj_ema.target.weights + m.queue.weights
    with watching(frozen) as tape:
        emb = m.embed(b["slab1"], True)
        terms = {"contrast": m.contrastive_term(emb, b["slab2"], True)[0],
                 "position": m.position_term(emb, b["position1"], True)[0],
                 "restore": m.restoration_term(b["corrupted"], b["target"], True)[0]}
    u = m.unet
    groups = {
        "encoder": [v for layer in u.encoder_layers for v in layer.trainable_variables],
        "decoder": [v for layer in u.decoder_layers + [u.head] for v in layer.trainable_variables],
        "projection": m.proj.trainable_variables,
        "position_head": m.position_head.trainable_variables,
    }
    expected = {"contrast": {"encoder", "projection"}, "position": {"encoder", "position_head"},
                "restore": {"encoder", "decoder"}}
    for term, loss in terms.items():
        # EMA copies and the queue are constants of every term
        assert not _has_grad(tape.gradient(loss, [w.value for w in frozen])), term
        for group, variables in groups.items():
            assert _has_grad(tape.gradient(loss, variables)) == (group in expected[term]), \
                (term, group)
    # every trainable variable is in exactly one group; none belongs to an EMA copy
    assert sum(len(v) for v in groups.values()) == len(m.trainable_variables)
    assert not any("_ema" in v.path or "queue" in v.path for v in m.trainable_variables)


def test_position_loss_by_hand_and_weighted_sum():
    cfg = dataclasses.replace(TINY, lambda_contrast=2.0, lambda_position=0.5, lambda_restore=3.0)
    m = _method(cfg)
    fc2 = m.position_head.fc2
    fc2.kernel.assign(tf.zeros_like(fc2.kernel))
    fc2.bias.assign([0.25])                              # the head predicts 0.25 for every slab
    b = _batch()
    b["position1"] = tf.constant([0.0, 1.0])
    loss, mae = m.position_term(m.embed(b["slab1"], False), b["position1"], False)
    assert float(loss) == pytest.approx((0.25 ** 2 + 0.75 ** 2) / 2)
    assert float(mae) == pytest.approx((0.25 + 0.75) / 2)
    terms, keys = m.objective(b, training=False)
    assert tuple(keys.shape) == (2, 8)
    assert float(terms["loss"]) == pytest.approx(2.0 * float(terms["loss_contrast"])
                                                 + 0.5 * float(terms["loss_position"])
                                                 + 3.0 * float(terms["loss_restore"]), rel=1e-6)
    # restoration: MSE of the sigmoid output against the clean target, all k slices
    restored = m.unet(b["corrupted"]).numpy()
    assert restored.shape == (2, 16, 16, 3)
    assert float(terms["loss_restore"]) == pytest.approx(
        float(np.mean((restored - b["target"].numpy()) ** 2)), rel=1e-5)


def test_zero_weight_switches_a_task_off():
    m = _method(dataclasses.replace(TINY, lambda_position=0.0))
    b = _batch()
    with tf.GradientTape() as tape:
        terms, _ = m.objective(b)
    assert float(terms["loss_position"]) == 0.0
    assert not _has_grad(tape.gradient(terms["loss"], m.position_head.trainable_variables))
    head = {id(v) for v in m.position_head.trainable_variables}
    kept = {id(v) for v in m.task_variables()}
    assert not head & kept and len(kept) == len(m.trainable_variables) - len(head)
    before = [v.numpy().copy() for v in m.position_head.trainable_variables]
    m.train_step(b)  # no "gradients do not exist" update of the idle head
    for a, v in zip(before, m.position_head.trainable_variables):
        np.testing.assert_array_equal(a, v.numpy())


def test_train_step_updates_queue_fifo_with_ema_keys_and_moves_ema():
    m = _method()
    queue_before = m.queue.values().numpy().copy()
    ema_before = [w.numpy().copy() for w in m.unet_ema.target.weights]
    b = _batch()
    # the EMA is still a copy of the online net: the keys are the online
    # embeddings of slab 2 in training mode (batch statistics, one group)
    online = m.proj(global_average(m.unet.encode(b["slab2"], training=True)[-1])).numpy()
    keys = m.keys(b["slab2"]).numpy()
    np.testing.assert_allclose(keys, online, rtol=1e-4, atol=1e-5)
    logs = m.train_step(b)
    assert set(logs) == set(SequentialMultiTask.metric_names)
    assert all(np.isfinite(float(v)) for v in logs.values())
    q = m.queue.values().numpy()
    assert int(m.queue.pointer.numpy()) == 2
    np.testing.assert_allclose(q[2:], queue_before[2:])
    # the enqueued rows are the momentum branch's normalised keys of slab 2
    np.testing.assert_allclose(q[:2], keys / np.linalg.norm(keys, axis=1, keepdims=True),
                               atol=1e-5)
    m.train_step(_batch(seed=1))  # the EMA moves from the second step on (MoCo order)
    assert int(m.queue.pointer.numpy()) == 4
    after = [w.numpy() for w in m.unet_ema.target.weights]
    assert any(not np.array_equal(a, c) for a, c in zip(after, ema_before))


# ---------------------------------------------------------------- config, checkpoint, export
@pytest.mark.parametrize("crop,change,field", [
    ((32, 32, 2), {}, "crop_size"),
    ((30, 32, 3), {}, "crop_size"),
    ((32, 32, 3), dict(queue_size=2), "queue_size"),
    ((32, 32, 1), dict(lambda_contrast=0.0, lambda_position=0.0, lambda_restore=0.0),
     "lambda_contrast"),
])
def test_config_checks(crop, change, field):
    run = PretrainConfig("multitask", "d", "r", crop_size=crop, batch_size=4)
    with pytest.raises(ConfigError, match=field):
        SequentialMultiTask.check_config(dataclasses.replace(TINY, **change), run)
    SequentialMultiTask.check_config(TINY, dataclasses.replace(run, crop_size=(32, 32, 3),
                                                               batch_size=2))


def test_checkpoint_round_trips_every_variable(tmp_path):
    from rr_tf.training.loop import checkpoint_for, restore_latest

    m = _method()
    m.train_step(_batch())
    m.train_step(_batch(seed=1))
    tf.train.CheckpointManager(checkpoint_for(m), str(tmp_path), max_to_keep=1).save(
        checkpoint_number=2)
    fresh = _method(batch=SequentialMultiTask.example_batch(CROP))
    assert restore_latest(fresh, str(tmp_path)) == 2
    assert len(m.weights) == len(fresh.weights) > 50
    for a, b in zip(m.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_export_part_takes_volumes_and_transfers_the_unet():
    m = _method()
    b = _batch()
    volume = m.sample_volume(b)
    assert tuple(volume.shape) == (2, 16, 16, 3, 1)
    part = m.export_parts()["unet2d"]
    out = part(volume)
    assert tuple(out["stride_4"].shape) == (2, 4, 4, 3, 16)
    assert tuple(out["decoder_stride_1"].shape) == (2, 16, 16, 3, 4)
    assert part.transfer_parts()["unet2d"] is m.unet is m.transfer_parts()["unet2d"]
    # slice z of the export = the U-Net's decoder on the slab centred on z (edge-padded)
    v = volume.numpy()[..., 0]
    slab = np.stack([v[..., 1], v[..., 2], v[..., 2]], -1)          # centred on the last slice
    stages, _ = m.unet.decode(m.unet.encode(slab))
    np.testing.assert_allclose(out["decoder_stride_1"][:, :, :, 2], stages[-1], atol=1e-5)
