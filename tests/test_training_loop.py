"""The training loop: checkpoints, resume at the exact step, NaN stop,
TensorBoard scalars, run directory rules."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from rr_tf.errors import ConfigError, DataError
from rr_tf.data.spec import PreprocessSpec
from rr_tf.training import loop
from rr_tf.training.loop import TrainConfig, TrainingDiverged, restore_latest, train
from rr_tf.training.run_dir import RunDir


class Regressor(keras.Model):
    """A test method: linear regression with a custom train_step; its loss
    turns NaN from step ``nan_at`` on (to exercise the guard)."""

    def __init__(self, nan_at=None):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.queue = self.add_weight(shape=(4,), initializer="zeros", trainable=False, name="queue")
        self.nan_at = nan_at
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((self(x) - y) ** 2)
            if self.nan_at is not None:
                loss = tf.where(self.optimizer.iterations + 1 >= self.nan_at, np.nan, loss)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.queue.assign_add(tf.ones([4]))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    @property
    def metrics(self):
        return [self.loss_tracker]


def _data():
    x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5]], "float32")
    return tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8)


def _method(nan_at=None):
    m = Regressor(nan_at)
    m.compile(optimizer=keras.optimizers.SGD(0.05))
    m(np.zeros((1, 3), "float32"))
    return m


def _run(tmp_path, steps, every=2, nan_at=None, overwrite=False):
    run = RunDir(tmp_path / "run")
    run.prepare("toy", PreprocessSpec(), steps, overwrite=overwrite)
    method = _method(nan_at)
    out = train(method, _data(), run, TrainConfig(train_steps=steps, checkpoint_every=every,
                                                  keep_checkpoints=2, log_every=1, verbose=0))
    return run, method, out


def test_checkpoints_resume_and_tensorboard(tmp_path):
    run, m1, out = _run(tmp_path, 4)
    assert out["step"] == 4 and out["resumed_from"] == 0
    assert run.state()["finished"] and run.state()["last_step"] == 4
    # keep_checkpoints=2: steps 2 and 4 kept
    assert sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "run/checkpoints/ckpt-*.index"))) \
        == ["ckpt-2.index", "ckpt-4.index"]
    # a finished run is refused unless more steps (or overwrite) are asked for
    with pytest.raises(ConfigError, match="finished run"):
        RunDir(tmp_path / "run").prepare("toy", PreprocessSpec(), 4)
    run, m2, out = _run(tmp_path, 8)
    assert out["resumed_from"] == 4 and out["step"] == 8
    np.testing.assert_allclose(m2.queue.numpy(), 8.0)  # non-weight state restored then advanced
    # a fresh method restored from the last checkpoint equals the trained one
    m3 = _method()
    assert restore_latest(m3, run.checkpoints) == 8
    for a, b in zip(m2.get_weights(), m3.get_weights()):
        np.testing.assert_array_equal(a, b)
    events = glob.glob(str(tmp_path / "run/tensorboard/train/events.out.tfevents.*"))
    tags = {v.tag for e in events for ev in tf.compat.v1.train.summary_iterator(e)
            for v in ev.summary.value}
    assert {"batch_loss", "batch_samples_per_sec", "batch_learning_rate"} <= tags, tags


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged) as info:
        _run(tmp_path, 10, every=2, nan_at=5)
    msg = str(info.value)
    assert "step 5" in msg and "ckpt-4" in msg and "\n" not in msg
    assert not glob.glob(str(tmp_path / "run/checkpoints/ckpt-5*"))
    assert tf.train.latest_checkpoint(str(tmp_path / "run/checkpoints")).endswith("ckpt-4")


def test_run_dir_refuses_other_method_or_spec(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare("reprec", PreprocessSpec(), 10)
    with pytest.raises(ConfigError, match="'reprec' run"):
        RunDir(tmp_path / "r").prepare("mae", PreprocessSpec(), 10)
    with pytest.raises(ConfigError, match="spec"):
        RunDir(tmp_path / "r").prepare("reprec", PreprocessSpec(spacing=(3, 3, 3)), 10)
    assert RunDir(tmp_path / "r").prepare("mae", PreprocessSpec(), 10, overwrite=True) is False


@pytest.mark.parametrize("damage", ["truncated_data", "truncated_index"])
def test_unreadable_newest_checkpoint_is_set_aside_and_the_run_resumes(tmp_path, damage):
    """A kill (or a full disk) during a checkpoint write: the newest
    checkpoint does not read. Resume names it, sets it aside, restores the
    previous intact one and reaches the final step; a leftover *_temp
    folder is removed."""
    run, _, _ = _run(tmp_path, 4)
    ckpt = tmp_path / "run" / "checkpoints"
    target = glob.glob(str(ckpt / ("ckpt-4.data-*" if damage == "truncated_data" else "ckpt-4.index")))[0]
    with open(target, "r+b") as f:
        f.truncate(max(os.path.getsize(target) // 2, 1))
    (ckpt / "ckpt-5_temp").mkdir()
    said = []
    assert loop.latest_step(str(ckpt), log=said.append) == 2
    assert len(said) == 1 and "ckpt-4" in said[0] and "unreadable" in said[0], said
    assert not (ckpt / "ckpt-5_temp").exists() and glob.glob(str(ckpt / "ckpt-4.*.unreadable"))
    run, m, out = _run(tmp_path, 6)
    assert out["resumed_from"] == 2 and out["step"] == 6 and run.state()["finished"]
    m2 = _method()
    assert restore_latest(m2, run.checkpoints) == 6
    # nothing readable at all: one clear error naming the folder
    for f in glob.glob(str(ckpt / "ckpt-*.index")):
        with open(f, "r+b") as fh:
            fh.truncate(3)
    with pytest.raises(DataError, match="no readable checkpoint"):
        restore_latest(_method(), run.checkpoints, log=lambda m: None)
