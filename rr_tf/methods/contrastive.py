"""The contrastive CNN branch shared by MoCo v2, SimCLR and RepRec.

Two views of one volume go through the online CNN and a projection head:

* **MoCo v2** (He et al. 2020; Chen et al. 2020, "Improved baselines"): the
  query ``q`` comes from view 1 through the online network; the key ``k``
  from view 2 through a *momentum* copy of CNN + head (EMA, ``m = 0.999``,
  updated once per step *before* the keys are computed), with no gradient.
  InfoNCE (tau 0.2) of ``q`` against ``k`` and a FIFO queue of earlier keys
  (16384 x 128); after the step the keys of all replicas are gathered and
  enqueued (:class:`rr_tf.models.momentum.Queue` gathers them).
* **SimCLR** (Chen et al. 2020): both views through the online network;
  NT-Xent (tau 0.1) where each view's negatives are the other ``2N - 2``
  views of the *global* batch (gathered from all replicas, differentiably).

:class:`ContrastiveBranch` is the mixin that holds this once. A host method
provides ``self.proj`` (the online head), ``self.queue`` (MoCo), and

* ``contrastive_features(x, training)``: the online CNN's last feature map;
* ``contrastive_mode``: ``"moco"`` or ``"simclr"``;
* ``contrastive_temperature``: tau;

and calls ``build_momentum_branch(cnn, m)`` in ``build_for`` (MoCo: the key
encoder ``cnn_ema`` + ``projection_ema``; RepRec also uses ``cnn_ema`` for its
recovery targets). :class:`ContrastiveEncoderMethod` is the common body of
the MoCo and SimCLR methods (UNet3D encoder + head on a contrastive pair).

Key-encoder BatchNorm (``key_bn_groups``): the EMA copy is frozen, and
Keras runs a frozen BatchNorm in inference mode, i.e. with the EMA of the
online moving statistics. Those lag the online network by about
``1 / (1 - momentum)`` steps (the BN momentum compounds with the EMA), so
early in training the keys are normalised by statistics that no longer fit
and carry little per-sample information: on toy volumes MoCo with such keys
stayed at the chance loss ln(K + 1) where keys normalised by batch
statistics learned within 100 steps. MoCo runs its key encoder in training
mode (batch statistics) and shuffles the key batch across GPUs so that a
key's statistics never come from the same samples as its query's ("shuffling
BN"). ``key_bn_groups = G`` does that for any replica count: the global key
batch is shuffled and normalised in G groups
(:func:`rr_tf.models.momentum.shuffled_group_apply`); ``0`` keeps the moving
statistics.
"""

import dataclasses

import tensorflow as tf
from keras import ops

from rr_tf import losses
from rr_tf.data import recipes
from rr_tf.errors import ConfigError
from rr_tf.methods.base import CNNConfig, PretrainMethod, param, zero_volumes
from rr_tf.distribute import gather_from_replicas, replica_row_offset
from rr_tf.models.heads import ProjectionHead
from rr_tf.models.momentum import MomentumEncoder, shuffled_group_apply
from rr_tf.optim import optimizer_step
from rr_tf.models.parts import CNNPyramid

SIMCLR_TEMPERATURE = 0.1  # SimCLR's NT-Xent tau (RepRec's simclr flag uses it)


def simclr_global_loss(z1, z2, temperature=SIMCLR_TEMPERATURE):
    """NT-Xent of this replica's pairs ``(z1, z2)`` against the global batch.

    Under tf.distribute both projections are gathered from every replica
    (``all_gather`` passes gradients back to the producing replica) and this
    replica's rows are the anchors; on one device it is plain NT-Xent.
    Returns ``(loss, logits)`` (positive in column 0)."""
    return losses.nt_xent_global(z1, z2, gather_from_replicas(z1), gather_from_replicas(z2),
                                 replica_row_offset(z1), temperature=temperature)


KEY_BN_HELP = ("Key encoder BatchNorm: statistics over this many random groups of the "
               "global batch (MoCo's shuffling BN; a multiple of the replica count that "
               "divides the batch); 0 = its EMA moving statistics.")


@dataclasses.dataclass
class MoCoConfig(CNNConfig):
    """The fields of a MoCo-style contrastive term (embedding, queue,
    temperature, key encoder), declared once for every method that has one
    (RepRec, PCRL, the sequential multi-task method, MoCo): one flag and one
    help text each. A method with another published default re-declares the
    field with ``MoCoConfig.field`` (same help and checks)."""

    proj_dim: int = param(128, "Contrastive embedding size.", low=1)
    queue_size: int = param(16384, "MoCo queue length (>= the global batch size).", low=1)
    temperature: float = param(0.2, "InfoNCE temperature of the MoCo term.", low=1e-4)
    momentum: float = param(0.999, "EMA momentum of the key (or target) encoder.", low=0.0,
                            high=1.0)
    key_bn_groups: int = param(2, KEY_BN_HELP, low=0)


def check_key_bn_groups(config, run):
    """``key_bn_groups`` cuts the global batch into groups of at least 2
    (the replica count is checked when the step is traced)."""
    groups = config.key_bn_groups
    if groups and (run.batch_size % groups or run.batch_size // groups < 2):
        raise ConfigError("key_bn_groups", f"{groups} must divide the batch size "
                          f"({run.batch_size}) into groups of 2 or more (BatchNorm over one "
                          "sample zeroes the head's output)")


KEY_SEED_OFFSET = 7919  # keeps the key groups' draws apart from the method's other draws


def momentum_keys(method, encode, x, groups):
    """Keys of ``x`` from a momentum (EMA) encoder, never differentiated.

    ``encode(x, batch_stats)`` runs the key encoder and returns a tensor or
    a nested structure of ``[n, ...]`` tensors. With ``groups > 0``
    (shuffling BN) it runs with ``batch_stats=True`` on ``groups`` random
    groups of the global batch, drawn from ``(method.seed + KEY_SEED_OFFSET,
    optimizer step)`` (:func:`rr_tf.models.momentum.shuffled_group_apply`);
    with 0 it runs once with ``batch_stats=False`` (the EMA moving
    statistics). MoCo, RepRec, PCRL, the multi-task method and PGL share it."""
    if not groups:
        return tf.nest.map_structure(ops.stop_gradient, encode(x, False))
    seed = tf.stack([tf.constant(method.seed + KEY_SEED_OFFSET, tf.int32),
                     optimizer_step(method)])
    return shuffled_group_apply(lambda v: encode(v, True), x, groups, seed)


class ContrastiveBranch:
    """Mixin: the MoCo v2 / SimCLR objective of a CNN + projection head.

    See the module docstring for what the host class provides."""

    contrastive_mode = "moco"
    contrastive_temperature = 0.2

    @staticmethod
    def example_batch(crop_size, batch_size=2):
        """A zero batch of the two views (to build)."""
        return zero_volumes(crop_size, batch_size, ("view1", "view2"))

    def contrastive_features(self, x, training=False):
        raise NotImplementedError

    def build_momentum_branch(self, cnn, momentum):
        """The EMA copies of ``cnn`` and ``self.proj`` (key encoder), created
        in this order (``cnn_ema``, ``projection_ema``): checkpoints key
        variables by their order."""
        self.cnn_ema = MomentumEncoder(cnn, momentum, name="cnn_ema")
        self.proj_ema = MomentumEncoder(self.proj, momentum, name="projection_ema")

    def momentum_update(self, head=True):
        """One EMA step of the key encoder (MoCo: before computing keys)."""
        self.cnn_ema.update()
        if head:
            self.proj_ema.update()

    @property
    def key_bn_groups(self):
        return self.config.key_bn_groups

    def key_encoder(self, x, batch_stats=False):
        """Momentum CNN + head (BatchNorm by the statistics of ``x`` or by
        the moving statistics)."""
        return self.proj_ema(self.cnn_ema(x, batch_stats=batch_stats)[-1], batch_stats=batch_stats)

    def keys(self, v2):
        """MoCo keys of view 2: momentum CNN + head, no gradient. With
        ``key_bn_groups = G > 0`` (shuffling BN) the key encoder's BatchNorm
        uses the statistics of G random groups of the global batch, drawn
        from (seed, step); with 0, its moving statistics."""
        return momentum_keys(self, self.key_encoder, v2, self.key_bn_groups)

    def simclr_projections(self, v1, v2, training=False):
        """SimCLR: both views through the online CNN + head as *one* batch of
        2N, as the SimCLR code does (BatchNorm statistics over all views);
        returns ``(z1, z2)``."""
        b = ops.shape(v1)[0]
        x = ops.concatenate([v1, v2], axis=0)
        z = self.proj(self.contrastive_features(x, training=training), training=training)
        return z[:b], z[b:]

    def contrastive_terms(self, v1, v2, training=False):
        """``(loss, logits, queries, keys)``; keys is None for SimCLR, whose
        ``queries`` are view 1's projections (view 2's enter the loss only)."""
        if self.contrastive_mode == "simclr":
            q, z2 = self.simclr_projections(v1, v2, training=training)
            loss, logits = simclr_global_loss(q, z2, self.contrastive_temperature)
            return loss, logits, q, None
        q = self.proj(self.contrastive_features(v1, training=training), training=training)
        k = self.keys(v2)
        loss, logits = losses.info_nce(q, k, self.queue.values(), self.contrastive_temperature)
        return loss, logits, q, k

    def enqueue_keys(self, k):
        """FIFO: the keys of every replica replace the oldest queue rows."""
        if k is not None:
            self.queue.enqueue(k)


class ContrastiveEncoderMethod(ContrastiveBranch, PretrainMethod):
    """MoCo / SimCLR body: a UNet3D encoder (``cnn``, Genesis widths) and a
    projection head (``projection``) trained on a contrastive pair.

    Subclasses set ``Config``, ``contrastive_mode``, ``name`` and write
    ``train_step``; the Config has ``base_width``, ``levels``, ``norm``,
    ``proj_dim``, ``proj_hidden_dim``, ``proj_bn`` and ``temperature``."""

    metric_names = ("loss", "contrast_acc", "embedding_std")
    supports_micle = True  # the batch is a view1/view2 pair: --pairing=patient applies

    def __init__(self, config, seed=0, name="contrastive", **kwargs):
        super().__init__(config, name=name, **kwargs)
        self.seed = int(seed)
        self.cnn = config.unet3d(encoder_only=True, name="cnn")
        self.proj = ProjectionHead(hidden_dim=config.proj_hidden_dim, out_dim=config.proj_dim,
                                   use_bn=config.proj_bn, name="projection")

    @property
    def contrastive_temperature(self):
        return self.config.temperature

    def contrastive_features(self, x, training=False):
        return self.cnn.encode(x, training=training)[-1]

    # ------------------------------------------------------------ set-up
    @staticmethod
    def recipe(config, crop_size):
        return recipes.contrastive_pair(crop_size)

    @staticmethod
    def check_config(config, run):
        config.check_crop(run.crop_size)

    def build_online(self, batch):
        """Builds the online CNN and head from one batch; returns the volume."""
        v = self.sample_volume(batch)
        self.cnn.build(v.shape)
        self.proj(self.contrastive_features(v))
        return v

    def call(self, x, training=False):
        """The online embedding of a volume batch ``[B, proj_dim]``."""
        return self.proj(self.contrastive_features(x, training=training), training=training)

    def contrastive_report(self, loss, logits, q):
        return self.report(loss=loss, contrast_acc=losses.contrastive_accuracy(logits),
                           embedding_std=losses.embedding_std(q))

    # ------------------------------------------------------------ monitoring
    def summary_images(self, batch):
        """Middle axial slices of both views, and the cosine similarity of
        view-1 against view-2 embeddings of the shown samples (positives on
        the diagonal; (cos + 1) / 2 in [0, 1])."""
        v1, v2 = batch["view1"][:8], batch["view2"][:8]
        z1 = losses.l2_normalize(self(v1))
        z2 = losses.l2_normalize(self(v2))
        sim = (ops.matmul(z1, ops.transpose(z2)) + 1.0) / 2.0
        z = v1.shape[3] // 2
        return {"view1": v1[:4, :, :, z], "view2": v2[:4, :, :, z],
                "similarity": sim[None, :, :, None]}

    # ------------------------------------------------------------ transfer
    def transfer_parts(self):
        """The UNet3D encoder (what HPT and fine-tuning load)."""
        return {"unet": self.cnn}

    def export_parts(self):
        """The encoder pyramid (``stride_1`` .. ``stride_8``) for a segmenter."""
        return {"cnn_encoder": CNNPyramid(self.cnn)}


__all__ = ["SIMCLR_TEMPERATURE", "simclr_global_loss", "ContrastiveBranch", "MoCoConfig",
           "ContrastiveEncoderMethod"]
