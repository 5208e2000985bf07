"""The training loop around ``keras.Model.fit``: resume, checkpoints, NaN
stop, TensorBoard, progress bar.

Epochs are checkpoint chunks of ``checkpoint_every`` steps; the optimizer's
``iterations`` is the step counter saved in every checkpoint, so a resumed
run continues at the exact step. The data stream is not restored from the
checkpoint (tf.data iterator state would include multi-GB shuffle buffers):
the launcher re-seeds it from the restored step instead, which keeps a
resumed run reproducible but not identical to an uninterrupted one.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from rr_tf.checkpoints import checkpoint_variables_of, usable_checkpoint
from rr_tf.errors import ConfigError, RrTfError
from rr_tf.training import callbacks as cb


class TrainingDiverged(RrTfError):
    """A loss became NaN or Inf; the message names the step and the last
    good checkpoint."""


@dataclasses.dataclass
class TrainConfig:
    train_steps: int
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    image_every: int = 200
    global_batch_size: int = 2
    verbose: int = 1            # 1 = Keras progress bar, 2 = one line per epoch, 0 = silent

    def validate(self):
        for name in ("train_steps", "checkpoint_every", "keep_checkpoints", "log_every",
                     "image_every", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")


def _checkpoint_variables(method):
    """Every variable of the method (weights incl. BN statistics, EMA copies,
    queues) and of its optimizer (step, slots), keyed by path.

    Keras 3 nests models inside models (the hybrid encoder, the EMA copy of
    the CNN), and TensorFlow's object-graph checkpoints do not reach such
    nested models' non-trainable variables, so the checkpoint is an
    explicit flat map instead of ``tf.train.Checkpoint(model=...)``."""
    items = checkpoint_variables_of("model", method.weights)
    items.update(checkpoint_variables_of("optimizer", method.optimizer.variables))
    return items


def checkpoint_for(method):
    """The tf.train.Checkpoint of a built, compiled method."""
    return tf.train.Checkpoint(**_checkpoint_variables(method))


def latest_step(checkpoint_dir, log=None):
    """Step of the newest usable checkpoint in ``checkpoint_dir`` (0 if
    none; :func:`usable_checkpoint`), read from its name without loading it
    (the launcher re-seeds data with it)."""
    latest = usable_checkpoint(checkpoint_dir, log)
    return int(latest.rsplit("-", 1)[1]) if latest else 0


def restore_latest(method, checkpoint_dir, log=None, read_only=False):
    """Restores the newest usable checkpoint in ``checkpoint_dir`` into
    ``method`` (which must be built and compiled; an unreadable newer one is
    set aside, :func:`usable_checkpoint`). Returns the restored step (0 if
    none). Raises if the checkpoint and the method do not hold exactly the
    same variables (e.g. another architecture)."""
    latest = usable_checkpoint(checkpoint_dir, log, read_only)
    if latest is None:
        return 0
    if not method.optimizer.built:
        method.optimizer.build(method.trainable_variables)
    status = checkpoint_for(method).restore(latest)
    status.assert_consumed()  # every saved value found its variable and vice versa
    return int(method.optimizer.iterations.numpy())


def device_batches(dataset):
    """``dataset`` without its string entries (case ids): what a compiled
    train step receives must be numeric (XLA has no string kernels, a TPU no
    string memory). Case ids stay in the preview batch for logging; a
    dataset with no string entry is returned as it is."""
    spec = dataset.element_spec
    flat = tf.nest.flatten(spec)
    keep = [s.dtype != tf.string for s in flat]
    if all(keep):
        return dataset
    if not isinstance(spec, dict):
        raise ConfigError("dataset", f"string entries outside a dict batch: {spec}")

    def strip(item):
        if isinstance(item, dict):
            return {k: strip(v) for k, v in item.items()
                    if not (isinstance(v, tf.Tensor) and v.dtype == tf.string)}
        return item

    return dataset.map(strip, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def train(method, dataset, run_dir, config, preview_batch=None, hparams=None, callbacks=None):
    """Trains ``method`` (a compiled, built keras.Model with a custom
    train_step) on ``dataset`` until ``config.train_steps``.

    In a multi-worker run every worker calls this with the same stream and
    its own ``run_dir`` (:meth:`RunDir.for_worker`): each restores the
    chief's newest checkpoint, trains on its slice of every global batch and
    saves where its run directory says (only the chief's are kept); only
    the chief shows progress.

    ``callbacks``: more Keras callbacks (e.g. fine-tuning's validation).
    Returns a dict with the final step and the last logged metrics.
    Raises TrainingDiverged on a NaN/Inf loss (the last good checkpoint
    stays the newest one).
    """
    config.validate()
    if not method.optimizer.built:
        method.optimizer.build(method.trainable_variables)
    step = restore_latest(method, run_dir.resume_from, read_only=not run_dir.is_chief)
    manager = tf.train.CheckpointManager(checkpoint_for(method), run_dir.checkpoints,
                                         max_to_keep=config.keep_checkpoints)
    if step >= config.train_steps:
        run_dir.write_state(last_step=step, finished=True)
        return {"step": step, "metrics": {}, "resumed_from": step}
    extra_callbacks = callbacks
    guard = cb.NaNGuard()
    callbacks = [
        cb.StepLimit(config.train_steps),
        guard,
        cb.Throughput(config.global_batch_size),
        keras.callbacks.TensorBoard(run_dir.tensorboard, update_freq=config.log_every,
                                    write_graph=False, profile_batch=0),
        cb.PeriodicCheckpoint(manager, config.checkpoint_every, guard,
                              on_save=lambda s: run_dir.write_state(last_step=s)),
    ]
    if hasattr(method, "extra_callbacks"):
        callbacks = method.extra_callbacks() + callbacks
    callbacks += list(extra_callbacks or [])
    if preview_batch is not None and hasattr(method, "summary_images"):
        callbacks.append(cb.ImageSummary(run_dir.tensorboard + "/images", preview_batch,
                                         config.image_every))
    if hparams and step == 0:
        cb.write_hparams(run_dir.tensorboard + "/hparams", hparams)
    per_epoch = config.checkpoint_every
    from rr_tf.training.strategy import for_workers

    history = method.fit(for_workers(device_batches(dataset), method.distribute_strategy),
                         epochs=math.ceil(config.train_steps / per_epoch),
                         initial_epoch=step // per_epoch, steps_per_epoch=per_epoch,
                         callbacks=callbacks, verbose=config.verbose if run_dir.is_chief else 0,
                         shuffle=False)
    if guard.bad_step is not None:
        latest = manager.latest_checkpoint or "none (no checkpoint was written before)"
        losses = ", ".join(f"{k}={v:g}" for k, v in guard.bad_logs.items() if "loss" in k)
        raise TrainingDiverged(f"loss became NaN/Inf at step {guard.bad_step} ({losses}); "
                               f"stopped; last good checkpoint: {latest}")
    final = int(method.optimizer.iterations.numpy())
    run_dir.write_state(last_step=final, finished=final >= config.train_steps)
    metrics = {k: float(np.asarray(v[-1])) for k, v in history.history.items() if v}
    return {"step": final, "metrics": metrics, "resumed_from": step}
