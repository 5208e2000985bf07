"""Semi-supervised fine-tuning with a mean teacher (rr_tf.training.mean_teacher)."""

import dataclasses
import json
import math
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from rr_tf.data.records import read_manifest
from rr_tf.errors import ConfigError
from rr_tf.models.segmenters import UNetSegmenter, build_segmenter
from rr_tf.training.finetune import (FinetuneConfig, choose_labeled,
                                     num_classes_of,
                                     run_finetuning, unlabelled_cases, unlabelled_stream)
from rr_tf.training.mean_teacher import (NOISE_CLIP, MeanTeacherTask, consistency_ramp, perturb,
                                         softmax_mse)
from rr_tf.training.segmentation import SegmentationTask
from method_harness import phantom_shards
from subproc import run_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


# ------------------------------------------------------------ pieces
def test_rampup_values():
    w = 2.0
    for step, want in [(0, w * math.exp(-5.0)), (25, w * math.exp(-5.0 * 0.75 ** 2)),
                       (50, w * math.exp(-1.25)), (99, w * math.exp(-5.0 * 0.01 ** 2)),
                       (100, w), (1000, w)]:
        np.testing.assert_allclose(float(consistency_ramp(step, w, 100)), want, rtol=1e-6)
    # hand-computed: 2 * exp(-5) = 0.0134759, 2 * exp(-1.25) = 0.5730096
    np.testing.assert_allclose(float(consistency_ramp(0, w, 100)), 0.0134759, rtol=1e-5)
    np.testing.assert_allclose(float(consistency_ramp(50, w, 100)), 0.5730096, rtol=1e-5)
    assert float(consistency_ramp(0, w, 0)) == w  # no ramp
    assert float(consistency_ramp(tf.constant(7, tf.int64), 0.5, 0)) == 0.5


def test_noise_is_seeded_clipped_and_independent():
    x = tf.zeros((2, 4, 4, 4, 1))
    a = perturb(x, tf.constant([1, 2], tf.int32), 0.1).numpy()
    np.testing.assert_array_equal(a, perturb(x, tf.constant([1, 2], tf.int32), 0.1).numpy())
    assert np.abs(a).max() <= NOISE_CLIP * 0.1 + 1e-7 and a.std() > 0.05
    assert perturb(x, tf.constant([1, 2], tf.int32), 0.0) is x
    task = MeanTeacherTask(_tiny(), 3, seed=5)
    s1, t1 = task._noise_seeds(3)
    s2, t2 = task._noise_seeds(3)
    np.testing.assert_array_equal(s1.numpy(), s2.numpy())
    assert not np.array_equal(s1.numpy(), t1.numpy())  # student and teacher: independent noise
    assert not np.array_equal(s1.numpy(), task._noise_seeds(4)[0].numpy())  # a new draw per step


def _tiny(classes=3, seed=0):
    """A 1x1x1 convolution: logits = x * w + b per voxel."""
    x = keras.Input((None, None, None, 1))
    out = keras.layers.Conv3D(classes, 1, kernel_initializer=keras.initializers.RandomNormal(
        seed=seed), bias_initializer=keras.initializers.RandomNormal(seed=seed + 1))(x)
    return keras.Model(x, out)


def _built_task(model, classes=3, **kwargs):
    task = MeanTeacherTask(model, classes, **kwargs)
    task.compile(optimizer=keras.optimizers.SGD(0.5))
    x = np.zeros((1, 4, 4, 4, 1), np.float32)
    task.build_for({"image": x, "label": np.zeros((1, 4, 4, 4), np.int32)})
    return task


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_consistency_matches_numpy_and_only_the_student_gets_gradients():
    task = _built_task(_tiny(), noise_std=0.0)
    teacher = task.teacher.target
    teacher.set_weights([np.array([[[[[0.3, -1.0, 2.0]]]]], np.float32),
                         np.array([0.1, 0.0, -0.2], np.float32)])
    ws, bs = (w.numpy() for w in task.segmenter.weights)
    wt, bt = (w.numpy() for w in teacher.weights)
    assert not np.allclose(ws, wt)
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 1)).astype(np.float32)
    with tf.GradientTape(persistent=True) as tape:
        value = task.consistency(tf.constant(x), 0)
    p = _softmax(x * ws.reshape(1, 1, 1, 1, 3) + bs)
    q = _softmax(x * wt.reshape(1, 1, 1, 1, 3) + bt)
    np.testing.assert_allclose(float(value), np.mean((p - q) ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(softmax_mse(tf.math.log(p), tf.math.log(q))),
                               np.mean((p - q) ** 2), rtol=1e-5)
    student_grads = tape.gradient(value, task.segmenter.trainable_variables)
    assert all(g is not None and np.abs(g.numpy()).sum() > 0 for g in student_grads)
    assert all(g is None for g in tape.gradient(value, teacher.weights))
    teacher_ids = {id(v) for v in teacher.weights}
    assert teacher_ids.isdisjoint(id(v) for v in task.trainable_variables)
    assert len(task.trainable_variables) == len(task.segmenter.trainable_variables)
    assert teacher_ids <= {id(v) for v in task.weights}  # checkpointed with the model


def test_teacher_moves_by_ema_after_the_step():
    m = 0.9
    task = _built_task(_tiny(seed=3), teacher_momentum=m, consistency_weight=1.0, noise_std=0.05)
    task.teacher.target.set_weights([w * 0.0 + 0.25 for w in task.teacher.target.get_weights()])
    t0 = [w.numpy().copy() for w in task.teacher.target.weights]
    s0 = [w.numpy().copy() for w in task.segmenter.weights]
    rng = np.random.default_rng(1)
    batch = {"image": rng.normal(size=(2, 4, 4, 4, 1)).astype(np.float32),
             "label": rng.integers(0, 3, (2, 4, 4, 4)).astype(np.int32),
             "unlabelled": rng.normal(size=(3, 4, 4, 4, 1)).astype(np.float32)}
    logs = task.train_step(batch)
    s1 = [w.numpy() for w in task.segmenter.weights]
    t1 = [w.numpy() for w in task.teacher.target.weights]
    assert not np.allclose(s1[0], s0[0])  # the student moved
    for t_before, s_after, t_after in zip(t0, s1, t1):
        np.testing.assert_allclose(t_after, m * t_before + (1 - m) * s_after, rtol=1e-6, atol=1e-7)
    assert set(logs) == {"loss", "loss_ce", "train_dice", "loss_consistency", "consistency_weight"}
    assert float(logs["consistency_weight"]) == 1.0 and float(logs["loss_consistency"]) > 0
    task.sync_teacher()  # what run_finetuning does after loading pre-trained weights
    for t, s in zip(task.teacher.target.weights, task.segmenter.weights):
        np.testing.assert_array_equal(t.numpy(), s.numpy())


def test_zero_weight_gives_the_supervised_loss_and_update():
    a = UNetSegmenter(3, base_width=2, levels=3)
    b = UNetSegmenter(3, base_width=2, levels=3)
    rng = np.random.default_rng(2)
    batch = {"image": rng.uniform(size=(2, 8, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 3, (2, 8, 8, 8)).astype(np.int32),
             "unlabelled": rng.uniform(size=(2, 8, 8, 8, 1)).astype(np.float32)}
    plain = SegmentationTask(a, 3)
    plain.compile(optimizer=keras.optimizers.SGD(0.1))
    plain.build_for(batch)
    mt = MeanTeacherTask(b, 3, consistency_weight=0.0, noise_std=0.1)
    mt.compile(optimizer=keras.optimizers.SGD(0.1))
    mt.build_for(batch)
    b.set_weights(a.get_weights())
    want = plain.train_step({"image": batch["image"], "label": batch["label"]})
    got = mt.train_step(batch)
    for name in ("loss", "loss_ce", "train_dice"):
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-6)
    assert float(got["consistency_weight"]) == 0.0 and float(got["loss_consistency"]) > 0
    for va, vb in zip(a.trainable_variables, b.trainable_variables):
        np.testing.assert_allclose(vb.numpy(), va.numpy(), rtol=1e-5, atol=1e-7)


def test_bad_values_are_one_line_config_errors(tmp_path):
    base = FinetuneConfig(data_dir=str(tmp_path), run_dir=str(tmp_path / "r"))
    base.validate()
    for field, value in [("consistency_weight", -1.0), ("consistency_weight", float("nan")),
                         ("consistency_rampup_steps", -5), ("teacher_momentum", 1.0),
                         ("teacher_momentum", -0.1), ("unlabelled_batch_size", -1),
                         ("consistency_noise", -0.5)]:
        with pytest.raises(ConfigError, match=field) as err:
            dataclasses.replace(base, **{field: value}).validate()
        assert "\n" not in str(err.value) and err.value.name == field
    res = run_logged([sys.executable, os.path.join(ROOT, "launch", "finetune.py"),
                          f"--data_dir={tmp_path}", f"--run_dir={tmp_path / 'r'}",
                          "--consistency_weight=1", "--teacher_momentum=1.0"],
                         env=ENV, capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "teacher_momentum" in lines[0], res.stderr


# ------------------------------------------------------------ with shards
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # three training cases, no validation case (a validation pass would add ~5 s per run;
    # the Validation callback is the supervised one, on the student)
    out = tmp_path_factory.mktemp("mt") / "shards"
    result = phantom_shards(out, 3, (48, 48, 48), (8.0, 8.0, 8.0), seed=3)
    assert result.ok
    return str(out)


def test_unlabelled_stream_skips_the_labelled_budget(shards, tmp_path):
    manifest = read_manifest(shards)
    train = sorted(c["case_id"] for c in manifest["cases"] if c["split"] == "train")
    labelled = choose_labeled(manifest, "1", seed=0)
    unlabelled = unlabelled_cases(manifest, labelled)
    assert len(train) == 3 and len(labelled) == 1 and sorted(labelled + unlabelled) == train
    cfg = FinetuneConfig(data_dir=shards, run_dir=str(tmp_path / "r"), crop_size=(16, 16, 16),
                         batch_size=2, unlabelled_batch_size=3, crops_per_volume=2)
    seen = set()
    for batch in unlabelled_stream(cfg, unlabelled, seed=4).take(6):
        assert "label" not in batch and batch["view"].shape == (3, 16, 16, 16, 1)
        assert batch["view"].dtype == tf.float32
        seen.update(c.decode() for c in batch["case_id"].numpy())
    assert seen and seen <= set(unlabelled) and not seen & set(labelled)
    with pytest.raises(ConfigError, match="consistency_weight"):
        unlabelled_stream(cfg, [], seed=0)


def test_no_unlabelled_case_fails_before_the_run_dir(shards, tmp_path):
    cfg = FinetuneConfig(data_dir=shards, run_dir=str(tmp_path / "r"), num_labeled="all",
                         consistency_weight=1.0)
    with pytest.raises(ConfigError, match="consistency_weight.*unlabelled") as err:
        run_finetuning(cfg, log=lambda m: None)
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "r")


def test_mean_teacher_finetuning_resumes_with_its_teacher(shards, tmp_path):
    run = tmp_path / "mt"
    cfg = FinetuneConfig(data_dir=shards, run_dir=str(run), num_labeled="1",
                         segmenter_args={"base_width": 2, "levels": 3}, train_steps=2,
                         batch_size=2, crop_size=(16, 16, 16), checkpoint_every=2, val_every=2,
                         verbose=0, seed=1, export=False, consistency_weight=1.0,
                         consistency_rampup_steps=4, teacher_momentum=0.5)
    metrics = run_finetuning(cfg, log=lambda m: None)
    assert metrics["step"] == 2 and metrics["mode"] == "mean_teacher"
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["loss_consistency"])
    # mean of the ramp at steps 0 and 1 (T = 4)
    np.testing.assert_allclose(metrics["consistency_weight"],
                               (math.exp(-5.0) + math.exp(-5.0 * 0.75 ** 2)) / 2, rtol=1e-5)
    state = json.load(open(run / "run.json"))
    labelled = json.load(open(run / "labelled_cases.json"))
    unlabelled = json.load(open(run / "unlabelled_cases.json"))
    assert state["mode"] == "mean_teacher" and state["unlabelled_cases"] == unlabelled
    assert len(labelled) == 1 and unlabelled and not set(labelled) & set(unlabelled)

    # the checkpoint holds the teacher: it comes back different from the student
    from rr_tf import checkpoints

    classes = num_classes_of(read_manifest(shards))
    segmenter = build_segmenter("unet", classes, base_width=2, levels=3)
    task = MeanTeacherTask(segmenter, classes)
    task.compile(optimizer=keras.optimizers.AdamW(1e-3))
    task.build_for({"image": np.zeros((1, 16, 16, 16, 1), np.float32)})
    assert checkpoints.restore_weights(task, str(run / "checkpoints")).endswith("-2")
    diffs = [np.abs(t.numpy() - s.numpy()).max()
             for t, s in zip(task.teacher.target.weights, segmenter.weights)]
    assert max(diffs) > 0  # EMA lag (a teacher re-made from the student would equal it)

    # resume: a longer schedule continues at step 2 with the restored teacher
    more = run_finetuning(dataclasses.replace(cfg, train_steps=3), log=lambda m: None)
    assert more["step"] == 3 and json.load(open(run / "run.json"))["last_step"] == 3
    # a supervised resume of a mean-teacher run is refused
    with pytest.raises(ConfigError, match="consistency_weight"):
        run_finetuning(dataclasses.replace(cfg, train_steps=4, consistency_weight=0.0),
                       log=lambda m: None)


MT_REPLICA_SCRIPT = r"""
import json
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from rr_tf.models.segmenters import UNetSegmenter
from rr_tf.training.mean_teacher import MeanTeacherTask

rng = np.random.default_rng(0)
batch = {"image": rng.uniform(size=(8, 16, 16, 16, 1)).astype("float32"),
         "label": rng.integers(0, 3, (8, 16, 16, 16)).astype("int32"),
         "unlabelled": rng.uniform(size=(8, 16, 16, 16, 1)).astype("float32")}
batch["label"][:2] = 0  # replica 0's half of step 1 has no foreground

def run(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        seg = UNetSegmenter(3, base_width=2, levels=3, norm="group")
        task = MeanTeacherTask(seg, 3, class_weights=(0.2, 1.0, 2.0), consistency_weight=5.0,
                               teacher_momentum=0.5, noise_std=0.0, seed=0)
        task.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=False)
        task.build_for({k: v[:4] for k, v in batch.items()})
    before = [w.numpy() for w in seg.weights]
    ds = tf.data.Dataset.from_tensor_slices(batch).batch(4)  # two steps: the teacher has moved
    logs = task.fit(ds, epochs=1, verbose=0).history
    return ([w.numpy() for w in seg.weights], [w.numpy() for w in task.teacher.target.weights],
            before, float(logs["loss"][0]), float(logs["loss_consistency"][0]))

s1, t1, init, loss1, c1 = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
s2, t2, _, loss2, c2 = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
diff = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
print(json.dumps({"moved": diff(s1, init), "student": diff(s1, s2), "teacher": diff(t1, t2),
                  "teacher_moved": diff(t1, init), "loss": [loss1, loss2],
                  "consistency": [c1, c2]}))
"""


def test_mean_teacher_steps_are_the_same_on_one_and_two_replicas():
    """Two steps (so the teacher differs from the student and the consistency
    term has a gradient): student, teacher and losses agree between one
    device and two logical-CPU replicas (GroupNorm, no input noise: with
    noise each replica draws its own, by design)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    res = run_logged([sys.executable, "-c", MT_REPLICA_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["moved"] > 1e-3 and out["teacher_moved"] > 1e-4, out
    assert out["consistency"][0] > 0, out
    np.testing.assert_allclose(out["loss"][0], out["loss"][1], rtol=1e-5)
    np.testing.assert_allclose(out["consistency"][0], out["consistency"][1], rtol=1e-4)
    assert out["student"] < 1e-3 * out["moved"], out
    assert out["teacher"] < 1e-3 * out["moved"], out
