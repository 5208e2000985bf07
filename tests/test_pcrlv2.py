"""PCRLv2 mechanics: stateless stage choice, mid-stage weight schedule,
SimSiam stop-gradient, one-hot stage selection, multi-scale shapes."""

import dataclasses
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from rr_tf.errors import ConfigError
from rr_tf.methods.pcrlv2 import (PCRLv2, Config, mid_stage_weight, pair_loss, stage_choices)
from rr_tf.training.pretrain import PretrainConfig
from method_harness import build_method, uniform_views

TINY = Config(base_width=2, levels=4, num_local=1, local_size=8, mid_decay_steps=100)
GLOBAL = (16, 16, 8)


def _batch(b=2, seed=0, num_local=1):
    g = tf.random.Generator.from_seed(seed)
    box = tf.constant([[[0, 0, 0], [16, 16, 8]]] * b)
    return {**uniform_views(("global1", "global2", "target1", "target2"), b, GLOBAL, generator=g),
            "locals": g.uniform((b, num_local, 8, 8, 8, 1)), "box1": box,
            "box2": box + tf.constant([[[4, 2, 0], [4, 4, 4]]]),
            "local_boxes": tf.constant([[[[2, 2, 1], [8, 8, 8]]] * num_local] * b)}


def _method(config=TINY, seed=3):
    keras.utils.set_random_seed(1)  # the same initial weights every time
    return build_method(PCRLv2, config, _batch(num_local=config.num_local), seed=seed,
                        optimizer=("sgd", 1e-3, 100))


def test_stage_choice_is_stateless_and_covers_all_stages():
    a = stage_choices(7, 12, 13, 3).numpy()
    np.testing.assert_array_equal(a, stage_choices(7, 12, 13, 3).numpy())  # same (seed, step)
    assert a.shape == (13,) and a.min() >= 0 and a.max() <= 2
    others = [stage_choices(7, s, 13, 3).numpy() for s in range(13, 20)]
    assert any(not np.array_equal(a, o) for o in others)                   # the step matters
    assert not np.array_equal(a, stage_choices(8, 12, 13, 3).numpy())      # the seed matters
    firsts = np.array([int(stage_choices(7, s, 13, 3)[0]) for s in range(300)])
    counts = np.bincount(firsts, minlength=3)
    assert counts.min() > 60, counts                                        # about uniform
    assert set(np.unique(np.concatenate(others))) == {0, 1, 2}


def test_mid_stage_weight_schedule():
    for step, want in [(0, 1.0), (50, 0.5), (100, 0.0), (25, 0.5 * (1 + math.cos(math.pi / 4))),
                       (150, 0.0)]:  # clipped after the end
        assert float(mid_stage_weight(step, 100)) == pytest.approx(want, abs=1e-6), step


def test_pair_loss_selects_a_stage_and_stops_gradients_at_projections():
    rng = np.random.default_rng(0)
    dims = (12, 8, 4)
    za, pa, zb, pb = ([tf.constant(rng.normal(size=(3, d)), tf.float32) for d in dims]
                      for _ in range(4))
    onehot = tf.constant([0.0, 1.0, 0.0])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(za + pa + zb + pb)
        loss = pair_loss(list(zip(za, pa)), list(zip(zb, pb)), onehot)

    def neg_cos(p, z):
        p, z = p.numpy(), z.numpy()
        return -np.mean(np.sum(p * z, 1) / np.linalg.norm(p, axis=1) / np.linalg.norm(z, axis=1))

    want = 0.5 * (neg_cos(pa[1], zb[1]) + neg_cos(pb[1], za[1]))
    assert float(loss) == pytest.approx(want, abs=1e-5)
    for z in za + zb:  # projections are SimSiam targets: constants
        assert tape.gradient(loss, z) is None
    for i, p in enumerate(pa + pb):
        g = tape.gradient(loss, p)
        if i % 3 == 1:
            assert float(tf.reduce_max(tf.abs(g))) > 0
        else:
            assert g is None or float(tf.reduce_max(tf.abs(g))) == 0.0


def test_multiscale_output_shapes_and_image_panel():
    m = _method()
    assert m.stage_strides == [4, 2, 1] and m.unet.skips is False
    b = _batch()
    emb, out, mids = m.forward(b["global1"], reconstruct=True)
    widths = m.unet.decoder_channels  # base 2: 16, 8, 4
    assert widths == [16, 8, 4]
    for (z, p), c in zip(emb, widths):
        assert z.shape == (2, c) and p.shape == (2, c)
    assert out.shape == (2,) + GLOBAL + (1,)
    for mid in mids:  # every stage reconstructs at full size, sigmoid
        assert mid.shape == (2,) + GLOBAL + (1,)
        assert 0.0 <= float(tf.reduce_min(mid)) and float(tf.reduce_max(mid)) <= 1.0
    emb_l, _, none = m.forward(tf.zeros((3, 8, 8, 8, 1)))
    assert none is None and [z.shape for z, _ in emb_l] == [(3, 16), (3, 8), (3, 4)]
    images = m.summary_images(b)
    assert images["stage_reconstructions"].shape == (2, 16, 48, 1)
    assert images["locals"].shape == (2, 8, 8, 1) and images["layout"].shape == (2, 16, 16, 3)
    for img in images.values():
        assert 0.0 <= float(tf.reduce_min(img)) and float(tf.reduce_max(img)) <= 1.0


def test_objective_sums_the_terms_and_trains_only_the_chosen_stages():
    m = _method(seed=0)
    b = _batch()
    chosen = set(stage_choices(m.seed, 0, 3, 3).numpy().tolist())  # global pair + 2 local pairs
    assert chosen == {0, 2}  # with seed 0, stage 1 is drawn by no pair at step 0
    with tf.GradientTape() as tape:
        t = m.objective(b)
    want = t["loss_global"] + t["loss_local"] + t["loss_rec"] + t["mid_weight"] * t["loss_mid"]
    assert float(t["loss"]) == pytest.approx(float(want), abs=1e-6)
    assert float(t["mid_weight"]) == 1.0  # step 0
    preds = [p.trainable_variables for p in m.predictors]
    grads = tape.gradient(t["loss"], [v for vs in preds for v in vs])
    k = 0
    for stage, vs in enumerate(preds):
        g = grads[k:k + len(vs)]
        k += len(vs)
        moved = any(x is not None and float(tf.reduce_max(tf.abs(x))) > 0 for x in g)
        assert moved == (stage in chosen), (stage, chosen)


def test_train_step_is_reproducible_and_logs_every_term():
    a, b = _method(), _method()
    logs_a = a.train_step(_batch())
    logs_b = b.train_step(_batch())
    assert set(logs_a) == set(PCRLv2.metric_names)
    for k in logs_a:
        assert float(logs_a[k]) == pytest.approx(float(logs_b[k]), abs=1e-6), k
    assert int(a.optimizer.iterations.numpy()) == 1
    assert float(logs_a["loss_rec"]) > 0 and float(logs_a["embedding_std"]) > 0


def test_check_config_resolves_the_schedule_and_checks_sizes():
    run = PretrainConfig("pcrlv2", "d", "r", crop_size=(64, 64, 32), train_steps=321)
    cfg = Config()
    PCRLv2.check_config(cfg, run)
    assert cfg.mid_decay_steps == 321
    kept = Config(mid_decay_steps=50)
    PCRLv2.check_config(kept, run)
    assert kept.mid_decay_steps == 50
    with pytest.raises(ConfigError, match="crop_size"):
        PCRLv2.check_config(Config(), dataclasses.replace(run, crop_size=(60, 64, 32)))
    with pytest.raises(ConfigError, match="local_size"):
        PCRLv2.check_config(Config(local_size=12), run)
    with pytest.raises(ConfigError, match="mid_decay_steps"):
        PCRLv2(Config(base_width=2)).objective(_batch())


def test_stage_projection_pools_then_normalises_and_serializes():
    from rr_tf.methods.pcrlv2 import StageProjection

    proj = StageProjection(name="projection1")
    x = tf.random.stateless_uniform((4, 2, 2, 2, 3), [1, 2])
    z = proj(x, training=True)
    pooled = tf.reduce_mean(x, axis=(1, 2, 3))
    want = (pooled - tf.reduce_mean(pooled, 0)) / tf.sqrt(tf.math.reduce_variance(pooled, 0) + 1e-5)
    np.testing.assert_allclose(z.numpy(), want.numpy(), atol=1e-4)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(proj))
    assert again(x).shape == (4, 3)
