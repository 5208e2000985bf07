"""Semi-supervised fine-tuning with a mean teacher (Tarvainen & Valpola
2017, "Mean teachers are better role models"; for 3D medical segmentation
e.g. Yu et al. 2019).

The student is the segmenter being fine-tuned; the teacher is an EMA copy of
it (:class:`~rr_tf.models.momentum.MomentumEncoder`, every weight including
the BatchNorm moving statistics). Each step::

    loss = DiceCE(student(labelled), label)
         + w(step) * mean((softmax(student(x + n1)) - softmax(teacher(x + n2)))^2)

where ``x`` are patches of the *unlabelled* training cases (their labels are
never read), ``n1``, ``n2`` independent clipped Gaussian noise drawn
statelessly from ``(seed, step, replica)`` (reproducible under a seed and
across a resume), the teacher term carries no gradient, and
``w(step) = weight * exp(-5 (1 - step / T)^2)`` for ``step < T`` (the
paper's sigmoid ramp-up; ``T = 0``: no ramp). Only the student's trainable
variables get gradients; after the optimizer step the teacher moves by
``t = m * t + (1 - m) * s``. The mean squared error is averaged over the
batch, the voxels and the classes.

Choices (documented, not in the brief's spec):

* the consistency term covers the unlabelled patches only (the original
  implementations also apply it to the labelled ones);
* the student sees the labelled and the unlabelled patches in two forward
  passes, so the supervised term is exactly :class:`SegmentationTask`'s
  (its BatchNorm layers, if any, normalise each pass by its own batch and
  update their moving statistics from both);
* the teacher runs with its BatchNorm layers on the statistics of its input
  batch (moving statistics left alone), as the reference implementations
  keep the EMA model in training mode; without BatchNorm this changes
  nothing;
* validation, the best weights and the export use the *student* (as Yu et
  al. report); the teacher lives in the checkpoints only, so a resumed run
  continues with the same teacher.
"""

import keras
import tensorflow as tf
from keras import ops

from rr_tf.optim import optimizer_step
from rr_tf.models import rng
from rr_tf.models.momentum import MomentumEncoder, copy_weights
from rr_tf import optim
from rr_tf.training.segmentation import SegmentationTask, foreground_dice

# noise is clipped at this many standard deviations (Yu et al.: 0.1, clip 0.2)
NOISE_CLIP = 2.0


def consistency_ramp(step, weight, rampup_steps):
    """``weight * exp(-5 (1 - step / T)^2)`` for ``step < T``, then
    ``weight`` (``T = rampup_steps``; ``T = 0``: always ``weight``).
    ``step`` may be a Python number or a tensor; returns a float32 tensor."""
    weight = float(weight)
    if rampup_steps <= 0:
        return ops.convert_to_tensor(weight, "float32")
    t = ops.clip(ops.cast(step, "float32") / float(rampup_steps), 0.0, 1.0)
    return weight * ops.exp(-5.0 * ops.square(1.0 - t))


def perturb(x, seed, std):
    """``x`` plus Gaussian noise of ``std`` clipped at ``NOISE_CLIP * std``,
    drawn statelessly from ``seed`` (int32 ``[2]``); ``std = 0``: ``x``."""
    if std <= 0:
        return x
    noise = rng.normal(tf.shape(x), seed, stddev=std)
    noise = tf.clip_by_value(noise, -NOISE_CLIP * std, NOISE_CLIP * std)
    return x + tf.cast(noise, x.dtype)


def softmax_mse(student_logits, teacher_logits):
    """Mean over all elements of ``(softmax(student) - softmax(teacher))^2``
    in float32; no gradient flows into the teacher's side."""
    p = ops.softmax(ops.cast(student_logits, "float32"), axis=-1)
    q = ops.stop_gradient(ops.softmax(ops.cast(teacher_logits, "float32"), axis=-1))
    return ops.mean(ops.square(p - q))


class MeanTeacherTask(SegmentationTask):
    """:class:`SegmentationTask` plus an EMA teacher and a consistency loss
    on unlabelled patches. Batches are dicts ``{"image", "label",
    "unlabelled"}`` (``unlabelled``: ``[b_u, D, H, W, 1]`` network input).

    Args beyond SegmentationTask's:
      consistency_weight: ``w`` (>= 0; 0 keeps the term at zero weight).
      rampup_steps: ``T`` of the sigmoid ramp-up (0 = none).
      teacher_momentum: EMA momentum ``m`` of the teacher.
      noise_std: std of the input noise of student and teacher (network
        units; 0 = none).
      seed: the noise's stateless seed (with the step and the replica id).
    """

    def __init__(self, segmenter, num_classes, class_weights=None, freeze_encoder_steps=0,
                 consistency_weight=0.1, rampup_steps=0, teacher_momentum=0.99, noise_std=0.1,
                 seed=0, **kwargs):
        super().__init__(segmenter, num_classes, class_weights, freeze_encoder_steps, **kwargs)
        self.consistency_weight = float(consistency_weight)
        self.rampup_steps = int(rampup_steps)
        self.teacher_momentum = float(teacher_momentum)
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        self.teacher = None
        for name in ("loss_consistency", "consistency_weight"):
            self._trackers[name] = keras.metrics.Mean(name=name)

    def build_for(self, batch):
        """Builds the student, then the teacher as an exact copy of it."""
        sample = batch["image"][:1]
        self.segmenter(sample)
        if self.teacher is None:
            self.teacher = MomentumEncoder(self.segmenter, self.teacher_momentum,
                                           sample_input=sample, name="teacher")
        super().build_for(batch)

    def sync_teacher(self):
        """Teacher := student (after loading pre-trained weights at step 0)."""
        copy_weights(self.teacher.target, self.segmenter)

    def _noise_seeds(self, step):
        """Independent stateless seeds of the student's and the teacher's
        noise for ``step`` on this replica."""
        ctx = tf.distribute.get_replica_context()
        replica = 0 if ctx is None else ctx.replica_id_in_sync_group
        key = tf.stack([tf.constant(self.seed, tf.int32), tf.cast(step, tf.int32)])
        key = rng.fold_in(key, replica)
        return rng.fold_in(key, 0), rng.fold_in(key, 1)

    def consistency(self, unlabelled, step):
        """The consistency loss of a batch of unlabelled patches at ``step``
        (student in training mode; call it under a tape for gradients)."""
        s_student, s_teacher = self._noise_seeds(step)
        teacher_logits = self.teacher(perturb(unlabelled, s_teacher, self.noise_std),
                                      batch_stats=True)
        student_logits = self.segmenter(perturb(unlabelled, s_student, self.noise_std),
                                        training=True)
        return softmax_mse(student_logits, ops.stop_gradient(teacher_logits))

    def train_step(self, batch):
        image, label, unlabelled = batch["image"], batch["label"], batch["unlabelled"]
        step = optimizer_step(self)
        weight = consistency_ramp(step, self.consistency_weight, self.rampup_steps)
        variables = self.segmenter.trainable_variables
        with tf.GradientTape() as tape:
            supervised, logits = self.supervised(image, label)
            consistency = self.consistency(unlabelled, step)
            loss = supervised + weight * consistency
            scaled = optim.replica_scaled(loss)
        optim.backprop(self.optimizer, tape, scaled, variables)
        self.teacher.update()  # after the optimizer step (auto control dependencies keep the order)
        ce = self.segmentation_loss(logits, label, dice_weight=0.0)
        values = {"loss": loss, "loss_ce": ce,
                  "train_dice": foreground_dice(logits, label, self.num_classes),
                  "loss_consistency": consistency, "consistency_weight": weight}
        for name, value in values.items():
            self._trackers[name].update_state(value)
        return self.replica_logs({n: t.result() for n, t in self._trackers.items()})
