"""Keras callbacks of a training run: checkpoints, NaN guard, throughput,
learning rate, TensorBoard images and hyper-parameters."""

import math
import time

import keras
import numpy as np
import tensorflow as tf


def _step(model):
    return int(model.optimizer.iterations.numpy())


def _finite(logs):
    return all(np.isfinite(float(v)) for k, v in (logs or {}).items()
               if "loss" in k and np.ndim(v) == 0)


class NaNGuard(keras.callbacks.Callback):
    """Stops training at the first step whose losses are NaN or Inf and
    remembers it, so no checkpoint is written after it (the last good
    checkpoint stays the latest)."""

    def __init__(self):
        super().__init__()
        self.bad_step = None
        self.bad_logs = None

    def on_train_batch_end(self, batch, logs=None):
        if self.bad_step is None and not _finite(logs):
            self.bad_step = _step(self.model)
            self.bad_logs = {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}
            self.model.stop_training = True


class StepLimit(keras.callbacks.Callback):
    """Stops exactly at ``train_steps`` optimizer steps (epochs are only
    logging/checkpoint chunks)."""

    def __init__(self, train_steps):
        super().__init__()
        self.train_steps = train_steps

    def on_train_batch_end(self, batch, logs=None):
        if _step(self.model) >= self.train_steps:
            self.model.stop_training = True


class PeriodicCheckpoint(keras.callbacks.Callback):
    """Saves the tf.train.CheckpointManager every ``every`` steps and at the
    end of training, never after a NaN/Inf step. A save writes new files and
    then swaps the small ``checkpoint`` index file, so a process killed in
    the middle of a save leaves the previous checkpoint usable."""

    def __init__(self, manager, every, guard, on_save=None):
        super().__init__()
        self.manager, self.every, self.guard, self.on_save = manager, every, guard, on_save
        self.last_saved = None

    def _save(self):
        step = _step(self.model)
        if self.guard.bad_step is not None or step == self.last_saved:
            return
        self.manager.save(checkpoint_number=step)
        self.last_saved = step
        if self.on_save:
            self.on_save(step)

    def on_train_batch_end(self, batch, logs=None):
        if _step(self.model) % self.every == 0:
            self._save()

    def on_train_end(self, logs=None):
        self._save()


class Throughput(keras.callbacks.Callback):
    """Adds ``samples_per_sec`` and ``learning_rate`` to the step logs (put it
    before the TensorBoard callback so they are written too)."""

    def __init__(self, global_batch_size):
        super().__init__()
        self.batch = global_batch_size
        self._t = None

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if logs is None or self._t is None:
            return
        dt = time.perf_counter() - self._t
        logs["samples_per_sec"] = self.batch / dt if dt > 0 else math.nan
        lr = self.model.optimizer.learning_rate
        if callable(lr):
            lr = lr(self.model.optimizer.iterations)
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(lr))


class ImageSummary(keras.callbacks.Callback):
    """Every ``every`` steps, writes ``model.summary_images(batch)`` (a dict
    name -> float images [N, H, W, C] in [0, 1]) for a fixed preview batch."""

    def __init__(self, logdir, preview_batch, every):
        super().__init__()
        self.writer = tf.summary.create_file_writer(logdir)
        self.batch, self.every = preview_batch, every

    def on_train_batch_end(self, batch, logs=None):
        step = _step(self.model)
        if step % self.every and step != 1:
            return
        images = self.model.summary_images(self.batch)
        with self.writer.as_default(step=step):
            for name, img in images.items():
                tf.summary.image(name, tf.clip_by_value(tf.cast(img, tf.float32), 0.0, 1.0),
                                 max_outputs=4)
        self.writer.flush()


def write_hparams(logdir, hparams):
    """Records the run's hyper-parameters for TensorBoard's HParams tab."""
    from tensorboard.plugins.hparams import api as hp

    clean = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in hparams.items()}
    with tf.summary.create_file_writer(logdir).as_default():
        hp.hparams(clean)
