"""The fine-tuning task: a segmenter trained with Dice + cross-entropy on
labelled patches, optional encoder freezing for the first steps, and a
validation callback that runs sliding-window inference on whole validation
volumes and keeps the best weights.

``SegmentationTask`` plays the part a pre-training method plays for
``rr_tf.training.loop.train`` (same checkpoints, resume, NaN stop,
TensorBoard), so fine-tuning has no loop of its own.
"""

import json
import math
import os

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from rr_tf import losses
from rr_tf import optim
from rr_tf.distribute import DistributedFitMixin, num_replicas, sum_over_replicas
from rr_tf.utils.figures import tensorboard_overlay
from rr_tf.utils.files import atomic_write_json
from rr_tf.training.callbacks import _step


class SegmentationTask(DistributedFitMixin, keras.Model):
    """Wraps a segmenter (``rr_tf.models.segmenters`` API) for training."""

    def __init__(self, segmenter, num_classes, class_weights=None, freeze_encoder_steps=0,
                 **kwargs):
        super().__init__(name="segmentation", **kwargs)
        self.segmenter = segmenter
        self.num_classes = int(num_classes)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.freeze_encoder_steps = int(freeze_encoder_steps)
        self._trackers = {n: keras.metrics.Mean(name=n) for n in
                          ("loss", "loss_ce", "train_dice")}

    @property
    def metrics(self):
        return list(self._trackers.values())

    @staticmethod
    def sample_volume(batch):
        return batch["image"]

    def build_for(self, batch):
        self.segmenter(batch["image"][:1])
        self.built = True
        if self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.segmenter.trainable_variables)

    def call(self, x, training=False):
        return self.segmenter(x, training=training)

    def segmentation_loss(self, logits, label, dice_weight=1.0):
        """Dice + CE of the *global* batch: under tf.distribute the Dice
        (and weighted-CE) sums are added over replicas before the ratios,
        so 1 and R replicas train alike (tested)."""
        return losses.dice_ce_loss(logits, label, self.num_classes, self.class_weights,
                                   dice_weight=dice_weight, reduce_sums=sum_over_replicas,
                                   replicas=num_replicas())

    def supervised(self, image, label):
        """(loss, main logits) of a labelled batch in training mode. With
        deep supervision (a segmenter with ``deep_supervision = K > 0``) the
        loss is ``sum_k w_k DiceCE(logits_k, label_k)`` over the main output
        (k = 0) and the K heads at strides 2**k, ``label_k`` the label
        subsampled by 2**k (nearest voxel, as nnU-Net downsamples
        segmentations), ``w_k`` = :func:`deep_supervision_weights`."""
        heads = getattr(self.segmenter, "deep_supervision", 0)
        if not heads:
            logits = self.segmenter(image, training=True)
            return self.segmentation_loss(logits, label), logits
        outputs = self.segmenter.deep_outputs(image, training=True)
        loss = 0.0
        for k, (w, out) in enumerate(zip(deep_supervision_weights(heads), outputs)):
            s = 2 ** k
            loss += w * self.segmentation_loss(out, label[:, ::s, ::s, ::s])
        return loss, outputs[0]

    def train_step(self, batch):
        image, label = batch["image"], batch["label"]
        variables = self.segmenter.trainable_variables
        with tf.GradientTape() as tape:
            loss, logits = self.supervised(image, label)
            scaled = optim.replica_scaled(loss)
        optim.backprop(self.optimizer, tape, scaled, variables)
        ce = self.segmentation_loss(logits, label, dice_weight=0.0)
        values = {"loss": loss, "loss_ce": ce, "train_dice": foreground_dice(logits, label,
                                                                             self.num_classes)}
        for name, value in values.items():
            self._trackers[name].update_state(value)
        return self.replica_logs({n: t.result() for n, t in self._trackers.items()})

    # ------------------------------------------------------------ hooks of loop.train
    def extra_callbacks(self):
        return [_EncoderFreeze(self.freeze_encoder_steps)] if self.freeze_encoder_steps else []

    def summary_images(self, batch):
        """Middle axial slice of up to 4 patches: the image, then the label
        and the prediction overlaid on it in the evaluation figure's colours
        (``image_label_prediction``, RGB side by side)."""
        image, label = batch["image"][:4], batch["label"][:4]
        pred = ops.argmax(self.segmenter(image, training=False), axis=-1)
        z = image.shape[3] // 2
        img = image[:, :, :, z]
        lab = ops.reshape(label, ops.shape(pred))[:, :, :, z]
        grey = ops.repeat(ops.clip(ops.cast(img, "float32"), 0.0, 1.0), 3, axis=-1)
        panels = [grey, tensorboard_overlay(img, lab, self.num_classes),
                  tensorboard_overlay(img, pred[:, :, :, z], self.num_classes)]
        return {"image_label_prediction": ops.concatenate(panels, axis=2)}


def deep_supervision_weights(heads):
    """Loss weights of the main output and ``heads`` deep-supervision
    outputs at strides 1, 2, 4, ...: ``2**-k`` normalised to sum 1
    (nnU-Net's halving per resolution; ``heads = 0``: ``[1.0]``)."""
    w = [0.5 ** k for k in range(int(heads) + 1)]
    return [v / sum(w) for v in w]


def foreground_dice(logits, labels, num_classes):
    """Hard Dice of the argmax prediction, averaged over the foreground
    classes present in the batch's label or prediction (a cheap training
    monitor; validation uses rr_tf.metrics). A class absent from both is left
    out rather than scored 1.0, which made a model that segments nothing look
    good on small patches; a batch with no foreground anywhere scores 1.0."""
    pred = ops.argmax(logits, axis=-1)
    labels = ops.cast(ops.reshape(labels, ops.shape(pred)), pred.dtype)
    scores, present = [], []
    for c in range(1, num_classes):
        p = ops.cast(ops.equal(pred, c), "float32")
        r = ops.cast(ops.equal(labels, c), "float32")
        denom = ops.sum(p) + ops.sum(r)
        scores.append(2.0 * ops.sum(p * r) / ops.maximum(denom, 1.0))
        present.append(ops.cast(denom > 0, "float32"))
    scores, present = ops.stack(scores), ops.stack(present)
    count = ops.sum(present)
    return ops.where(count > 0, ops.sum(scores * present) / ops.maximum(count, 1.0), 1.0)


class _EncoderFreeze(keras.callbacks.Callback):
    """Encoder frozen (``trainable=False``: no updates, BatchNorm on moving
    statistics) until ``until`` steps, then trained; the train function is
    re-traced at the switch."""

    def __init__(self, until):
        super().__init__()
        self.until = until

    def _sync(self):
        seg = self.model.segmenter
        frozen = _step(self.model) < self.until
        if frozen != seg.encoder_frozen:
            seg.freeze_encoder(frozen)
            self.model.make_train_function(force=True)

    def on_train_begin(self, logs=None):
        self._sync()

    def on_train_batch_end(self, batch, logs=None):
        self._sync()


class Validation(keras.callbacks.Callback):
    """Every ``every`` steps and at the end: sliding-window inference on
    each validation volume, per-class Dice (``rr_tf.metrics``), TensorBoard
    scalars, and the best weights (by mean foreground Dice) saved to
    ``best_dir`` (``segmenter.weights.h5`` + ``best.json``, written under a
    temporary name and renamed)."""

    def __init__(self, cases, window, every, best_dir, logdir, labels, overlap=0.5,
                 window_batch=2, log=print, names=None):
        super().__init__()
        # TensorBoard tags val/dice_<label>_<name> when the data set names its labels
        self.tags = {int(k): f"val/dice_{k}_{names[k]}" if names and k in names else
                     f"val/dice_{k}" for k in labels}
        self.cases, self.window, self.every = cases, tuple(window), every
        self.best_dir, self.labels, self.overlap = best_dir, list(labels), overlap
        self.window_batch, self.log = window_batch, log
        self.writer = tf.summary.create_file_writer(logdir)
        self.best = _read_best(best_dir)
        self.best_predictions = None  # of the best weights, when found in this process
        self.last = None

    def predictions(self):
        """Label maps (uint8) of the validation volumes by the model's
        segmenter (sliding window, argmax), in the order of ``cases``."""
        from rr_tf.inference import keras_predict_fn, sliding_window_inference

        predict = keras_predict_fn(self.model.segmenter)
        return [np.argmax(sliding_window_inference(case["image"], predict, self.window,
                                                   overlap=self.overlap,
                                                   window_batch=self.window_batch),
                          axis=-1).astype(np.uint8)
                for case in self.cases]

    def evaluate(self):
        """(summary, predictions) of the current weights."""
        from rr_tf import metrics

        preds = self.predictions()
        per_case = {case["case_id"]: metrics.evaluate_case(pred, case["label"], case["spacing"],
                                                           self.labels)
                    for case, pred in zip(self.cases, preds)}
        return metrics.aggregate(per_case, self.labels), preds

    def _run(self):
        step = _step(self.model)
        if step == self.last:
            return
        self.last = step
        summary, preds = self.evaluate()
        mean = summary["overall"]["dice_class_mean"]
        with self.writer.as_default(step=step):
            tf.summary.scalar("val/mean_dice", mean)
            for label, stats in summary["classes"].items():
                if not math.isnan(stats["dice_mean"]):
                    tf.summary.scalar(self.tags.get(int(label), f"val/dice_{label}"),
                                      stats["dice_mean"])
        self.writer.flush()
        improved = self.best is None or mean > self.best["mean_dice"]
        self.log(f"validation at step {step}: mean Dice {mean:.4f}"
                 + (" (best so far)" if improved else f" (best {self.best['mean_dice']:.4f} "
                                                       f"at step {self.best['step']})"))
        if improved and not math.isnan(mean):
            self.best = {"step": step, "mean_dice": mean,
                         "per_class": {str(k): v["dice_mean"] for k, v in summary["classes"].items()}}
            _write_best(self.best_dir, self.model.segmenter, self.best)
            self.best_predictions = preds  # the postprocessing choice reuses them

    def on_train_batch_end(self, batch, logs=None):
        if _step(self.model) % self.every == 0:
            self._run()

    def on_train_end(self, logs=None):
        self._run()


def _read_best(best_dir):
    path = os.path.join(best_dir, "best.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_best(best_dir, segmenter, info):
    os.makedirs(best_dir, exist_ok=True)
    tmp = os.path.join(best_dir, f".segmenter.tmp-{os.getpid()}.weights.h5")
    segmenter.save_weights(tmp)
    os.replace(tmp, os.path.join(best_dir, "segmenter.weights.h5"))
    atomic_write_json(os.path.join(best_dir, "best.json"), info)
