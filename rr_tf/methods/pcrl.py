"""PCRL: Preservational Contrastive Representation Learning (Zhou et al.,
"Preservational Learning Improves Self-supervised Medical Image Models by
Reconstructing Diverse Contexts", ICCV 2021), as in ``docs/methods.md``.

A UNet3D *with skips* is trained to keep (preserve) the information of its
input while learning contrastive features. Per step, with two views of one
volume (recipe :func:`rr_tf.data.recipes.pcrl_views`: flip + affine, blur,
Genesis local shuffling p 0.5 and painting p 0.9 on the inputs; the clean
targets are the crops after the spatial augmentation):

1. **Contrast** (MoCo style): query ``q`` = embedding head (GAP(bottleneck)
   -> 128 -> ReLU -> 128) of the student encoder on view 1; key ``k`` = the
   momentum (EMA, m 0.999) encoder + head on view 2; InfoNCE (tau 0.2)
   against a FIFO queue of 16384 keys. **Decision** (docs/methods.md): InfoNCE,
   not the public code's CMC-style NCE with a frozen normaliser.
2. **Transformation-conditioned attention**: each view has a 7-d vector
   (3 flip bits + rot90 one-hot); an MLP (7 -> 256 -> 512, sigmoid) turns it
   into one gate per bottleneck channel; the decoder fed the gated
   bottleneck (and the plain skips) must output the clean crop *as
   transformed by that vector*.
3. **Cross-model mixup**: ``alpha ~ Beta(1, 1)``, ``alpha = max(alpha,
   1 - alpha)``; the bottleneck (gated, each view by its own vector) and
   every skip are mixed ``alpha * student + (1 - alpha) * EMA``; the shared
   decoder must output ``alpha * T1(target1) + (1 - alpha) * T2(target2)``.
4. **Input mixup** (``input_mixup``): ``x = lam * x + (1 - lam) * x[perm]``
   inside the batch (lam drawn like alpha), for both views; the student
   restores the mixed clean target, a second cross-model mixup (its own
   alpha, no gating) restores the mix of the mixed targets, and two more
   InfoNCE terms contrast the mixed query with the EMA key of the mixed view
   2 and with the same mix of the plain keys (as the public code).

``loss = mean(InfoNCE terms) + mean(restoration MSE terms)``.

Choices, where the public code (Luchixiang/PCRL, 3D) differs or is silent:

* The momentum copy is the U-Net *encoder* + embedding head: the public code
  keeps an EMA of the whole network but never runs the EMA decoder, so the
  copy of it would be dead weight. Its BatchNorm uses batch statistics over
  ``key_bn_groups`` random groups of the global batch (the public code's
  batch statistics + ShuffleBN, as rr_tf's MoCo); 0 = the EMA moving
  statistics.
* The conditioned decoder's target is the *clean* crop transformed (the
  public code transforms the corrupted input, and its mixup targets are the
  crops before the spatial augmentation that the inputs went through).
* ``alpha``, ``alpha2``, ``lam`` and the permutation are stateless draws
  from ``(seed, step)``: a run is reproducible. Under tf.distribute the
  three scalars are the same on every replica, but the input-mixup
  permutation pairs samples *within* each replica's batch (the partners'
  inputs stay local); the keys of all replicas are gathered before they are
  enqueued.
* As the reference, which enqueues the keys of each of its three contrast
  calls, a step with input mixup enqueues three key sets (the plain keys,
  the keys of the mixed inputs and the mixed keys: the pointer moves by 3 x
  the global batch); without it one. Unlike the reference, all three are
  enqueued after the step, so the second and third terms do not see the
  first term's keys of the same step among their negatives (one batch in a
  queue of 16384).
"""

import dataclasses

import keras
import tensorflow as tf
from keras import ops

from rr_tf import losses
from rr_tf.data import recipes
from rr_tf.errors import ConfigError
from rr_tf.methods.base import PretrainMethod, param
from rr_tf.methods.contrastive import MoCoConfig, check_key_bn_groups, momentum_keys
from rr_tf.methods.genesis import ACTIVATIONS, restoration_unet
from rr_tf.methods.genesis import Config as GenesisConfig
from rr_tf.optim import optimizer_step
from rr_tf.models.heads import ProjectionHead
from rr_tf.models.layers import register
from rr_tf.models import rng
from rr_tf.models.momentum import MomentumEncoder, Queue
from rr_tf.models.parts import UNetFeatures
from rr_tf.models.unet3d import UNet3D

TRANSFORM_DIM = 7  # 3 flip bits + one-hot of the rot90 multiple
VOLUME_KEYS = ("view1", "view2", "target1", "target2", "aug_target1", "aug_target2")


@dataclasses.dataclass
class Config(MoCoConfig):
    """PCRL hyper-parameters (defaults: the published ones)."""

    output_activation: str = GenesisConfig.field("output_activation", "sigmoid")
    gate_hidden: int = param(256, "PCRL: hidden width of the transformation-gating MLP "
                             "(7 -> hidden -> bottleneck channels).", low=1)
    mixup_alpha: float = param(1.0, "PCRL: Beta(a, a) of the cross-model (alpha) and input "
                               "(lambda) mixup coefficients; each is folded to max(x, 1 - x).",
                               low=1e-3)
    input_mixup: bool = param(True, "PCRL: also train on inputs mixed inside the batch "
                              "(two restoration and two contrastive terms).")
    shuffle_p: float = param(0.5, "Probability of Genesis local pixel shuffling.",
                             low=0.0, high=1.0)
    paint_p: float = param(0.9, "Probability of Genesis painting (out- or in-painting).",
                           low=0.0, high=1.0)
    outpaint_p: float = param(0.8, "Share of out-painting among paintings (the rest is "
                              "in-painting).", low=0.0, high=1.0)


@register
class TransformGate(keras.layers.Layer):
    """PCRL's transformation-conditioned attention: the 7-d transformation
    vector -> ``fc1`` Dense(hidden) -> ReLU -> ``fc2`` Dense(channels) ->
    sigmoid: one gate in (0, 1) per bottleneck channel, ``[B, channels]``."""

    def __init__(self, channels, hidden_dim=256, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.hidden_dim = int(channels), int(hidden_dim)
        self.fc1 = keras.layers.Dense(self.hidden_dim, name="fc1", dtype=self.dtype_policy)
        self.fc2 = keras.layers.Dense(self.channels, name="fc2", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.fc1.build(input_shape)
        self.fc2.build(tuple(input_shape[:-1]) + (self.hidden_dim,))
        self.built = True

    def call(self, vector):
        return ops.sigmoid(self.fc2(ops.relu(self.fc1(vector))))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.channels,)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, hidden_dim=self.hidden_dim)
        return config


def mse(pred, target):
    """Mean squared error in float32."""
    return ops.mean(ops.square(ops.cast(pred, "float32") - ops.cast(target, "float32")))


def mix(a, b, weight):
    """``weight * a + (1 - weight) * b`` in the dtype of ``a``."""
    w = ops.cast(weight, a.dtype)
    return w * a + (1.0 - w) * ops.cast(b, a.dtype)


def cross_mix(student, teacher, alpha):
    """Cross-model mixup of two feature pyramids (every skip and the
    bottleneck): ``alpha * student + (1 - alpha) * teacher``."""
    return [mix(s, t, alpha) for s, t in zip(student, teacher)]


def folded_beta(seed, n, a):
    """``n`` draws of ``max(x, 1 - x)``, ``x ~ Beta(a, a)``, stateless under
    ``seed``. Beta(1, 1) (the default) is Uniform(0, 1), drawn portably
    (:mod:`rr_tf.models.rng`: the same under XLA); otherwise a ratio of
    TensorFlow's stateless gammas, which XLA draws differently."""
    if float(a) == 1.0:
        x = rng.uniform([n], seed)  # portable: the same under XLA
    else:
        g = tf.random.stateless_gamma([2, n], seed, alpha=float(a))
        x = g[0] / (g[0] + g[1])
    return tf.maximum(x, 1.0 - x)


class PCRL(PretrainMethod):
    """The PCRL pre-training model; ``train_step`` implements the objective."""

    Config = Config
    metric_names = ("loss", "loss_contrast", "loss_restore", "restore_transformed",
                    "restore_cross", "restore_mixup", "contrast_acc", "embedding_std")

    def __init__(self, config, seed=0, **kwargs):
        super().__init__(config, name="pcrl", **kwargs)
        self.seed = int(seed)
        self.unet = restoration_unet(config)
        # PCRL: fc1 (bottleneck -> 128), ReLU, fc2 (128 -> 128); no BN
        self.head = ProjectionHead(hidden_dim=config.proj_dim, out_dim=config.proj_dim,
                                   use_bn=False, name="embedding")
        self.gate = TransformGate(self.unet.encoder_channels[-1], config.gate_hidden,
                                  name="transform_gate")
        self.queue = Queue(config.queue_size, config.proj_dim, seed=seed, name="queue")

    # ------------------------------------------------------------ set-up
    @staticmethod
    def recipe(config, crop_size):
        return recipes.pcrl_views(crop_size, shuffle_p=config.shuffle_p, paint_p=config.paint_p,
                                  outpaint_p=config.outpaint_p)

    @staticmethod
    def check_config(config, run):
        config.check_crop(run.crop_size)
        if run.crop_size[0] != run.crop_size[1]:
            raise ConfigError("crop_size", "PCRL rotates crops by 90 degrees in the (D, H) plane: "
                              f"D and H must be equal, got {run.crop_size}")
        if config.queue_size < run.batch_size:
            raise ConfigError("queue_size", f"must be >= the batch size ({run.batch_size})")
        check_key_bn_groups(config, run)
        if config.output_activation not in ACTIVATIONS:
            raise ConfigError("output_activation", f"must be one of {ACTIVATIONS}")
        if config.mixup_alpha <= 0:
            raise ConfigError("mixup_alpha", "must be > 0")

    @staticmethod
    def example_batch(crop_size, batch_size=2):
        """A zero batch with the structure ``train_step`` expects (to build)."""
        shape = (batch_size,) + tuple(crop_size) + (1,)
        identity = tf.one_hot(tf.fill([batch_size], 3), TRANSFORM_DIM)  # no flip, k = 0
        batch = {k: tf.zeros(shape) for k in VOLUME_KEYS}
        batch.update(aug1=identity, aug2=identity)
        return batch

    def encoder_weights(self):
        """The online U-Net encoder's weights, in the order of an
        ``encoder_only`` UNet3D's (the EMA pairs them by position)."""
        return [w for block in self.unet.enc_blocks for w in block.weights]

    def build_for(self, batch):
        """Creates every variable: U-Net, head, gate, EMA encoder + head, queue."""
        v = self.sample_volume(batch)
        self.unet.build(tuple(v.shape))
        pyramid = self.unet.encode(v)
        self.head(pyramid[-1])
        self.gate(tf.zeros([1, TRANSFORM_DIM]))
        cfg = self.config
        target = UNet3D(base_width=cfg.base_width, levels=cfg.levels, norm=cfg.norm,
                        encoder_only=True, name="unet_encoder_ema")
        target.build(tuple(v.shape))
        self.encoder_ema = MomentumEncoder(target=target, momentum=cfg.momentum,
                                           name="encoder_ema")
        self.encoder_ema.attach(self.encoder_weights())
        self.encoder_ema.update(0.0)  # starts as a copy
        self.head_ema = MomentumEncoder(self.head, cfg.momentum, name="embedding_ema")
        self.queue.build(None)
        self.finish_build(v)

    def call(self, x, training=False):
        """The unconditioned restoration of a crop (the transferable U-Net)."""
        return self.unet(x, training=training)

    # ------------------------------------------------------------ pieces
    def mixing_draws(self, batch_size, step=None):
        """This step's ``(alpha, alpha2, lam, perm)``: cross-model mixup of
        the plain and of the mixed views, input mixup and its in-batch
        permutation; stateless from ``(seed, step)``."""
        step = optimizer_step(self) if step is None else tf.cast(step, tf.int32)
        seed = tf.stack([tf.constant(self.seed, tf.int32), step])
        alpha, alpha2, lam = tf.unstack(folded_beta(seed, 3, self.config.mixup_alpha))
        noise = rng.uniform([batch_size], rng.fold_in(seed, 1))
        return alpha, alpha2, lam, tf.argsort(noise, stable=True)

    def condition(self, pyramid, vector):
        """Transformation-conditioned attention: the bottleneck's channels
        multiplied by the gates of ``vector`` (skips unchanged)."""
        gates = ops.cast(self.gate(vector), pyramid[-1].dtype)
        return list(pyramid[:-1]) + [pyramid[-1] * gates[:, None, None, None, :]]

    def restore(self, pyramid, training=False):
        """The shared decoder's output for a (possibly mixed, gated) pyramid."""
        return self.unet.decode(pyramid, training=training)[1]

    def keys(self, x):
        """EMA encoder pyramid and key embedding of ``x`` (constants), with
        shuffling BN when ``key_bn_groups`` > 0."""
        groups = self.config.key_bn_groups

        def encode(v, batch_stats):
            pyramid = list(self.encoder_ema(v, batch_stats=batch_stats))
            return pyramid, self.head_ema(pyramid[-1], batch_stats=batch_stats)

        return momentum_keys(self, encode, x, groups)

    def restoration_targets(self, batch, draws):
        """What the decoder must output in each restoration term."""
        alpha, alpha2, lam, perm = draws
        t1, t2 = batch["aug_target1"], batch["aug_target2"]
        targets = {"transformed": t1, "cross": mix(t1, t2, alpha)}
        if self.config.input_mixup:
            m1 = mix(batch["target1"], tf.gather(batch["target1"], perm), lam)
            m2 = mix(batch["target2"], tf.gather(batch["target2"], perm), lam)
            targets.update(mixup=m1, mixup_cross=mix(m1, m2, alpha2))
        return targets

    def objective(self, batch, draws, training=False):
        """Every loss term, the outputs, their targets and the keys."""
        cfg = self.config
        alpha, alpha2, lam, perm = draws
        v1, v2 = batch["view1"], batch["view2"]
        queue = self.queue.values()
        targets = self.restoration_targets(batch, draws)

        # contrast: student query of view 1 against the EMA key of view 2
        pyr_k, k = self.keys(v2)
        pyr_q = self.unet.encode(v1, training=training)
        q = self.head(pyr_q[-1], training=training)
        l_plain, logits = losses.info_nce(q, k, queue, cfg.temperature)
        contrast, enqueue = [l_plain], [k]

        # preservation: the gated student decodes its transformed target; the
        # cross-model mix (both gated by their own vectors) the mixed target
        cond_q = self.condition(pyr_q, batch["aug1"])
        cond_k = self.condition(pyr_k, batch["aug2"])
        outputs = {"transformed": self.restore(cond_q, training),
                   "cross": self.restore(cross_mix(cond_q, cond_k, alpha), training)}

        if cfg.input_mixup:
            xm1 = mix(v1, tf.gather(v1, perm), lam)
            xm2 = mix(v2, tf.gather(v2, perm), lam)
            pyr_km, km = self.keys(xm2)
            pyr_qm = self.unet.encode(xm1, training=training)
            qm = self.head(pyr_qm[-1], training=training)
            k_mix = mix(k, tf.gather(k, perm), lam)
            contrast += [losses.info_nce(qm, km, queue, cfg.temperature)[0],
                         losses.info_nce(qm, k_mix, queue, cfg.temperature)[0]]
            enqueue += [km, k_mix]  # the reference enqueues the keys of each of its 3 calls
            outputs.update(mixup=self.restore(pyr_qm, training),
                           mixup_cross=self.restore(cross_mix(pyr_qm, pyr_km, alpha2), training))

        terms = {name: mse(outputs[name], targets[name]) for name in outputs}
        l_con = ops.mean(ops.stack(contrast))
        l_rest = ops.mean(ops.stack(list(terms.values())))
        mixup = (terms["mixup"] + terms["mixup_cross"]) / 2.0 if cfg.input_mixup else ops.zeros(())
        return {"loss": l_con + l_rest, "loss_contrast": l_con, "loss_restore": l_rest,
                "restore_transformed": terms["transformed"], "restore_cross": terms["cross"],
                "restore_mixup": mixup, "logits": logits, "queries": q, "keys": k,
                "enqueue": ops.concatenate(enqueue, axis=0),
                "outputs": outputs, "targets": targets}

    # ------------------------------------------------------------ training
    def train_step(self, batch):
        # MoCo: the key encoder moves before it computes this step's keys
        self.encoder_ema.update()
        self.head_ema.update()
        draws = self.mixing_draws(tf.shape(batch["view1"])[0])
        with tf.GradientTape() as tape:
            out = self.objective(batch, draws, training=True)
            scaled = self.replica_scaled(out["loss"])
        self.backprop(tape, scaled, self.trainable_variables)
        self.queue.enqueue(out["enqueue"])  # the 1 or 3 key sets of all replicas, FIFO
        return self.report(
            loss=out["loss"], loss_contrast=out["loss_contrast"], loss_restore=out["loss_restore"],
            restore_transformed=out["restore_transformed"], restore_cross=out["restore_cross"],
            restore_mixup=out["restore_mixup"], contrast_acc=losses.contrastive_accuracy(out["logits"]),
            embedding_std=losses.embedding_std(out["queries"]))

    # ------------------------------------------------------------ monitoring
    def summary_images(self, batch):
        """Middle axial slice of the corrupted input, its transformed target
        and the conditioned restoration, and the cross-model mixup's target
        and restoration."""
        batch = {k: batch[k][:4] for k in VOLUME_KEYS + ("aug1", "aug2")}
        out = self.objective(batch, self.mixing_draws(tf.shape(batch["view1"])[0]))
        z = batch["view1"].shape[3] // 2

        def mid(x):
            return ops.cast(x, "float32")[:, :, :, z]

        return {"input": mid(batch["view1"]), "target_transformed": mid(out["targets"]["transformed"]),
                "restoration": mid(out["outputs"]["transformed"]),
                "cross_mix_target": mid(out["targets"]["cross"]),
                "cross_mix_restoration": mid(out["outputs"]["cross"])}

    # ------------------------------------------------------------ transfer
    def transfer_parts(self):
        """Encoder and decoder: the whole U-Net transfers (the gate, the
        heads and the EMA copies are pre-training only)."""
        return {"unet": self.unet}

    def export_parts(self):
        """The whole U-Net: encoder pyramid, decoder stages and output."""
        return {"unet": UNetFeatures(self.unet)}
