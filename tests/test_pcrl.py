"""PCRL mechanics: the 7-d transformation vectors, the gating, cross-model
and input mixup targets, stop-gradients, the queue, export and checks."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from rr_tf.data import recipes
from rr_tf.errors import ConfigError
from rr_tf.methods.pcrl import PCRL, TRANSFORM_DIM, Config, folded_beta
from rr_tf.training.pretrain import PretrainConfig
from method_harness import (assert_all_reached, assert_constants, build_method, uniform_views,
                            watching)

VOLUME = tf.cast(tf.random.stateless_uniform([60, 56, 40, 1], [4, 2], -1000, 1000, tf.int32), tf.int16)
TINY = Config(base_width=2, queue_size=5, proj_dim=8, gate_hidden=8, momentum=0.5,
              key_bn_groups=1)  # batches of 2-3: one BatchNorm group of keys


def to_unit(x):
    return tf.cast(x, tf.float32) / 2000.0 + 0.5


def _apply_vector(x, vector):
    """The transformation a 7-d vector encodes, with numpy: flips, then rot90 in (D, H)."""
    flips, onehot = vector[:3], vector[3:]
    assert set(np.unique(flips)) <= {0.0, 1.0} and onehot.sum() == 1.0
    axes = tuple(np.flatnonzero(flips))
    y = np.flip(x, axes) if axes else x
    return np.rot90(y, int(np.argmax(onehot)), axes=(0, 1))


def test_transformation_vector_matches_the_applied_flips_and_rot90():
    fn = recipes.pcrl_views((32, 32, 16))
    ks, flips = set(), set()
    for seed in ([1, 1], [2, 3], [5, 8], [7, 1], [9, 9]):
        out = {k: v.numpy() for k, v in fn(VOLUME, tf.constant(seed, tf.int64), to_unit).items()}
        for i in (1, 2):
            vec = out[f"aug{i}"]
            assert vec.shape == (TRANSFORM_DIM,) and vec.dtype == np.float32
            np.testing.assert_allclose(out[f"aug_target{i}"], _apply_vector(out[f"target{i}"], vec),
                                       atol=1e-6)
            ks.add(int(np.argmax(vec[3:])))
            flips.add(tuple(vec[:3]))
            # the input is the corrupted target (shuffling / painting), same shape
            assert out[f"view{i}"].shape == out[f"target{i}"].shape == (32, 32, 16, 1)
        assert not np.array_equal(out["view1"], out["target1"]) or not np.array_equal(
            out["view2"], out["target2"])
    assert len(ks) >= 3 and len(flips) >= 3  # the seeds exercised several transformations
    again = fn(VOLUME, tf.constant([2, 3], tf.int64), to_unit)
    np.testing.assert_array_equal(again["aug1"], fn(VOLUME, tf.constant([2, 3], tf.int64), to_unit)["aug1"])


def test_recipe_without_corruption_feeds_the_clean_target():
    cfg = dataclasses.replace(TINY, shuffle_p=0.0, paint_p=0.0)
    fn = PCRL.recipe(cfg, (32, 32, 16))
    # blur is the only change left, and (torchio's default p = 1, as the
    # reference) every seed blurs: no view is the clean target, each is close to it
    outs = [fn(VOLUME, tf.constant([s, 1], tf.int64), to_unit) for s in range(6)]
    assert not any(np.array_equal(o["view1"], o["target1"]) for o in outs)
    assert all(abs(float(np.mean(o["view1"] - o["target1"]))) < 0.05 for o in outs)


def _batch(b=3, shape=(16, 16, 16), seed=0):
    batch = uniform_views(("view1", "view2", "target1", "target2"), b, shape, seed)
    rng = np.random.default_rng(seed)
    for i in (1, 2):
        vecs, transformed = [], []
        for j in range(b):
            vec = np.concatenate([rng.integers(0, 2, 3), np.eye(4)[rng.integers(0, 4)]])
            vecs.append(vec.astype("float32"))
            transformed.append(_apply_vector(batch[f"target{i}"][j].numpy(), vec))
        batch[f"aug{i}"] = tf.constant(np.stack(vecs))
        batch[f"aug_target{i}"] = tf.constant(np.stack(transformed))
    return batch


def _method(config=TINY, batch=None):
    return build_method(PCRL, config, batch or _batch(), optimizer=("sgd", 0.05, 100, 1e-4))


def test_gate_multiplies_the_bottleneck_channels():
    m = _method()
    c, h = m.unet.encoder_channels[-1], TINY.gate_hidden
    rng = np.random.default_rng(1)
    w1, b1 = rng.normal(size=(TRANSFORM_DIM, h)), rng.normal(size=h)
    w2, b2 = rng.normal(size=(h, c)), rng.normal(size=c)
    m.gate.fc1.kernel.assign(w1), m.gate.fc1.bias.assign(b1)
    m.gate.fc2.kernel.assign(w2), m.gate.fc2.bias.assign(b2)
    vec = np.array([[1, 0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0, 0]], "float32")
    gates = 1.0 / (1.0 + np.exp(-(np.maximum(vec @ w1 + b1, 0.0) @ w2 + b2)))  # [2, c]
    pyramid = m.unet.encode(_batch(b=2)["view1"])
    conditioned = m.condition(pyramid, vec)
    for a, b in zip(conditioned[:-1], pyramid[:-1]):  # skips untouched
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(conditioned[-1], pyramid[-1].numpy() * gates[:, None, None, None, :],
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(gates[0], gates[1])  # each sample its own gates


def test_mixing_draws_are_folded_seeded_and_stateless():
    m = _method()
    draws = [m.mixing_draws(6, step=s) for s in range(40)]
    coeffs = np.array([[float(d[0]), float(d[1]), float(d[2])] for d in draws])
    assert coeffs.min() >= 0.5 and coeffs.max() <= 1.0 and coeffs.std() > 0.05
    for d in draws:
        assert sorted(d[3].numpy()) == list(range(6))
    again = m.mixing_draws(6, step=7)
    for a, b in zip(again, draws[7]):
        np.testing.assert_array_equal(a, b)
    other = PCRL(TINY, seed=4)  # another run seed, other draws
    assert float(other.mixing_draws(6, step=7)[0]) != float(draws[7][0])
    beta = folded_beta(tf.constant([1, 2]), 500, 2.0).numpy()  # Beta(2, 2) via gammas
    assert beta.min() >= 0.5 and beta.max() <= 1.0
    np.testing.assert_array_equal(beta, folded_beta(tf.constant([1, 2]), 500, 2.0))


def test_mixup_targets_are_the_same_mix_of_the_targets():
    m = _method()
    b = _batch(b=4, seed=5)
    alpha, alpha2, lam, perm = m.mixing_draws(4, step=11)
    a, a2, l, p = float(alpha), float(alpha2), float(lam), perm.numpy()
    assert min(a, a2, l) >= 0.5
    t = m.restoration_targets(b, (alpha, alpha2, lam, perm))
    T1, T2 = b["aug_target1"].numpy(), b["aug_target2"].numpy()
    t1, t2 = b["target1"].numpy(), b["target2"].numpy()
    np.testing.assert_allclose(t["transformed"], T1)
    np.testing.assert_allclose(t["cross"], a * T1 + (1 - a) * T2, atol=1e-6)
    m1, m2 = l * t1 + (1 - l) * t1[p], l * t2 + (1 - l) * t2[p]
    np.testing.assert_allclose(t["mixup"], m1, atol=1e-6)
    np.testing.assert_allclose(t["mixup_cross"], a2 * m1 + (1 - a2) * m2, atol=1e-6)


def test_decoder_inputs_are_the_mixed_features_and_inputs():
    """With view 2 = view 1 (same vector) and the EMA a copy of the student,
    each query equals its key, and the cross-model mix of identical features
    restores what the student alone restores; the input-mixup branch
    decodes the mixed input (everything in inference mode: keys from the
    moving statistics)."""
    m = _method(dataclasses.replace(TINY, key_bn_groups=0))
    b = _batch(b=3, seed=6)
    b.update(view2=b["view1"], aug2=b["aug1"])
    draws = m.mixing_draws(3, step=2)
    res = m.objective(b, draws)
    out = res["outputs"]
    np.testing.assert_allclose(res["queries"], res["keys"], atol=1e-5)  # row i: its own key
    np.testing.assert_allclose(out["cross"], out["transformed"], atol=1e-5)
    lam, perm = draws[2], draws[3]
    mixed = lam * b["view1"] + (1 - lam) * tf.gather(b["view1"], perm)
    np.testing.assert_allclose(out["mixup"], m(mixed), atol=1e-5)
    np.testing.assert_allclose(out["mixup_cross"], out["mixup"], atol=1e-5)


def test_keys_use_batch_statistics_like_the_training_student():
    """key_bn_groups = 1: the EMA (a copy of the student) normalises the key
    batch by its own statistics, so each key equals the query the student
    computes in training mode on the same input."""
    m = _method()
    b = _batch(b=3, seed=6)
    b.update(view2=b["view1"], aug2=b["aug1"])
    res = m.objective(b, m.mixing_draws(3, step=2), training=True)
    np.testing.assert_allclose(res["queries"], res["keys"], atol=1e-5)
    inference = m.objective(b, m.mixing_draws(3, step=2))
    assert not np.allclose(inference["queries"], inference["keys"], atol=1e-3)


def test_gradients_reach_the_student_only():
    m = _method()
    b = _batch(seed=1)
    frozen = m.encoder_ema.target.weights + m.head_ema.target.weights + m.queue.weights
    with watching(frozen, persistent=False) as tape:
        out = m.objective(b, m.mixing_draws(3, step=0), training=True)
    # one backward pass for everything (a persistent tape re-runs it per call)
    grads = tape.gradient(out["loss"], [w.value for w in frozen] + m.trainable_variables)
    assert_constants(frozen, grads[:len(frozen)])  # EMA copies and queue: constants
    assert_all_reached(m.trainable_variables, grads[len(frozen):])
    names = {v.path for v in m.trainable_variables}
    for part in ("unet/enc1", "unet/dec1", "unet/head", "embedding/fc2", "transform_gate/fc1"):
        assert any(n.startswith(part) for n in names), part
    assert not any("ema" in n or "queue" in n for n in names)


def test_train_step_queue_is_fifo_and_ema_follows():
    m = _method(dataclasses.replace(TINY, input_mixup=False))  # queue of 5, batch 2: 2 keys a step
    rows = [m.queue.values().numpy().copy()]
    ema0 = [w.numpy().copy() for w in m.encoder_ema.target.weights]
    online0 = [w.numpy().copy() for w in m.encoder_weights()]
    for a, o in zip(ema0, online0):  # the EMA starts as a copy of the encoder
        np.testing.assert_array_equal(a, o)
    for step in range(3):
        logs = m.train_step(_batch(b=2, seed=step))
        rows.append(m.queue.values().numpy().copy())
    for name in PCRL.metric_names:
        assert np.isfinite(float(logs[name])), name
    assert float(logs["loss_contrast"]) > 0

    def changed(a, b):
        return {i for i in range(5) if not np.array_equal(a[i], b[i])}

    assert changed(rows[0], rows[1]) == {0, 1}
    assert changed(rows[1], rows[2]) == {2, 3}
    assert changed(rows[2], rows[3]) == {4, 0}  # wraps around
    assert int(m.queue.pointer.numpy()) == 1
    np.testing.assert_allclose(np.linalg.norm(rows[3], axis=1), 1.0, rtol=1e-5)
    # EMA (m = 0.5, updated before each step): between the start and the online weights
    ema = [w.numpy() for w in m.encoder_ema.target.weights]
    online = [w.numpy() for w in m.encoder_weights()]
    kernel = 0  # enc1/unit1/conv/kernel
    assert not np.array_equal(ema[kernel], ema0[kernel])
    assert not np.array_equal(ema[kernel], online[kernel])


def test_each_of_the_three_contrast_terms_enqueues_its_keys():
    """With input mixup the reference enqueues keys on each of its three
    contrast calls: the plain keys, the mixed inputs' keys and the mixed
    keys, so the pointer moves by 3 x the batch a step."""
    m = _method(dataclasses.replace(TINY, queue_size=16))
    before = m.queue.values().numpy().copy()
    b = _batch(b=2, seed=1)
    logs = m.train_step(b)
    assert float(logs["restore_mixup"]) > 0
    assert int(m.queue.pointer.numpy()) == 6
    after = m.queue.values().numpy()
    assert {i for i in range(16) if not np.array_equal(before[i], after[i])} == set(range(6))
    m.train_step(_batch(b=2, seed=2))
    assert int(m.queue.pointer.numpy()) == 12


def test_without_input_mixup_only_the_plain_terms_remain():
    m = _method(dataclasses.replace(TINY, input_mixup=False))
    b = _batch(seed=2)
    out = m.objective(b, m.mixing_draws(3, step=0))
    assert sorted(out["outputs"]) == ["cross", "transformed"]
    np.testing.assert_allclose(float(out["loss_restore"]),
                               (float(out["restore_transformed"]) + float(out["restore_cross"])) / 2,
                               rtol=1e-6)
    assert float(out["restore_mixup"]) == 0.0


def test_export_and_transfer_parts_are_the_whole_unet(tmp_path):
    m = _method()
    assert list(m.transfer_parts()) == ["unet"] and m.transfer_parts()["unet"] is m.unet
    part = m.export_parts()["unet"]
    out = part(_batch()["view1"])
    assert "decoder_stride_1" in out and "stride_8" in out
    np.testing.assert_allclose(out["output"], m(_batch()["view1"]), atol=1e-6)
    # HPT from the exported U-Net: encoder and decoder load, the EMA restarts as a copy
    path = str(tmp_path / "unet.keras")
    part.save(path)
    fresh = _method()
    report = fresh.init_from(path)
    assert not report.missing and any(k.startswith("unet/dec1/") for k in report.matched)
    for a, b in zip(fresh.encoder_ema.target.weights, m.encoder_weights()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    images = m.summary_images(_batch())
    assert set(images) == {"input", "target_transformed", "restoration", "cross_mix_target",
                           "cross_mix_restoration"}
    assert images["restoration"].shape == (3, 16, 16, 1)


@pytest.mark.parametrize("change,field", [
    (dict(crop_size=(32, 48, 32)), "crop_size"),
    (dict(crop_size=(36, 36, 32)), "crop_size"),
    (dict(batch_size=8), "queue_size"),
])
def test_config_checks(change, field):
    run = dataclasses.replace(PretrainConfig("pcrl", "d", "r", crop_size=(32, 32, 16), batch_size=4),
                              **change)
    with pytest.raises(ConfigError, match=field):
        PCRL.check_config(TINY, run)
