"""Sequential multi-task SSL (Dong, Kampffmeyer, Voiculescu, ECML-PKDD 2021),
as decided in ``docs/methods.md`` (the paper's text and code are
not public; everything below is the rr_tf design, not a reproduction).

Several pretext tasks on a *sequence* of 2D axial slices exploit the
anatomy that neighbouring slices share, and pre-train the encoder and the
decoder of a 2D U-Net together, for dense prediction. The network sees a
slab: an in-plane window of ``k`` consecutive slices as channels
(``crop_size = (X, Y, k)``, ``k`` odd; ``k = 1`` is a plain slice). Three
heads share the encoder:

1. contrastive (MoCo v2): the query is the online encoder's embedding of
   slab 1 (global average of the bottleneck -> projection MLP), the key the
   momentum encoder's embedding of slab 2 (the same slice under other
   augmentations, or a neighbouring slice within +-``neighbour_range``),
   negatives from a queue; InfoNCE with temperature tau;
2. slice position: an MLP on the same embedding of slab 1 regresses the
   normalised z-position ``z / (depth - 1)`` of its centre slice in its
   volume (MSE);
3. restoration: the whole U-Net (head: k sigmoid channels) maps a Models
   Genesis corruption of slab 1 (before intensity augmentation) back to that
   clean slab, all k slices (MSE).

``L = lambda_contrast * L_contrast + lambda_position * L_position
+ lambda_restore * L_restore`` (all weights 1 by default; a weight of 0
skips its term). Transfer: the whole U-Net (``unet2d``), to be applied slice
by slice (``rr_tf.models.unet2d.SliceSegmenter``).

Left out: the design's alternative position task (classify the order of a
shuffled triplet of slices). It needs three more slabs per sample and three
more encoder passes per step, where the regression reuses the embedding the
contrastive term computes anyway (one small MLP). The key encoder uses MoCo's
shuffled BatchNorm (``key_bn_groups``, as rr_tf's MoCo). Also left out: MICLe
pairing (``--pairing=patient``): slice positions of two scans do not
correspond.
"""

import dataclasses

import tensorflow as tf
from keras import ops

from rr_tf import losses
from rr_tf.data import recipes
from rr_tf.errors import ConfigError
from rr_tf.methods.base import PretrainMethod, param
from rr_tf.methods.contrastive import MoCoConfig, check_key_bn_groups, momentum_keys
from rr_tf.models.heads import ProjectionHead
from rr_tf.models.momentum import MomentumEncoder, Queue, batch_statistics
from rr_tf.models.unet2d import SliceFeatures, UNet2D
from rr_tf.models.unet3d import unet3d_channels

MAX_SLAB = 15  # slab depths above this are refused (a slab is a few slices, not a crop)


@dataclasses.dataclass
class Config(MoCoConfig):
    """Sequential multi-task hyper-parameters. Nothing was published beyond
    the task list: the defaults are rr_tf decisions (see configs/multitask.flags)."""

    queue_size: int = MoCoConfig.field("queue_size", 65536)
    neighbour_range: int = param(2, "Contrastive positives: the key slab is centred on a "
                                 "slice within +-this many slices of the query's (0 = the same "
                                 "slice under two augmentations).", low=0)
    foreground_p: float = param(0.9, "Probability that a slab is centred on a body voxel "
                                "(HU > -500) rather than anywhere.", low=0.0, high=1.0)
    lambda_contrast: float = param(1.0, "Weight of the contrastive loss (0 = off).", low=0.0)
    lambda_position: float = param(1.0, "Weight of the slice-position loss (0 = off).", low=0.0)
    lambda_restore: float = param(1.0, "Weight of the restoration loss (0 = off).", low=0.0)


def global_average(x):
    """[B, H, W, C] -> [B, C] (float32)."""
    return ops.mean(ops.cast(x, "float32"), axis=(1, 2))


class SequentialMultiTask(PretrainMethod):
    """The multi-task pre-training model; ``train_step`` implements the objective."""

    Config = Config
    metric_names = ("loss", "loss_contrast", "loss_position", "loss_restore", "contrast_acc",
                    "position_mae", "embedding_std")

    def __init__(self, config, seed=0, **kwargs):
        super().__init__(config, name="multitask", **kwargs)
        self.unet = None  # built by build_for: its head restores the k slices of a slab
        width = unet3d_channels(config.base_width, config.levels)[-1][1]
        # MoCo v2 head (Dense-ReLU-Dense, hidden = backbone width) and the
        # position regressor (same shape, one output)
        self.proj = ProjectionHead(hidden_dim=width, out_dim=config.proj_dim, use_bn=False,
                                   name="projection")
        self.position_head = ProjectionHead(hidden_dim=width, out_dim=1, use_bn=False,
                                            name="position_head")
        self.queue = Queue(config.queue_size, config.proj_dim, seed=seed, name="queue")
        self.seed = int(seed)
        self.slab_size = None

    # ------------------------------------------------------------ set-up
    @staticmethod
    def recipe(config, crop_size):
        return recipes.slice_slabs(crop_size, neighbour_range=config.neighbour_range,
                                   foreground_p=config.foreground_p)

    @staticmethod
    def check_config(config, run):
        x, y, k = run.crop_size
        if k < 1 or k % 2 == 0 or k > MAX_SLAB:
            raise ConfigError("crop_size", f"multitask reads crop_size as X,Y,k: an X x Y window "
                              f"of k axial slices (k odd, <= {MAX_SLAB}; 1 = single slices); "
                              f"got k = {k}")
        factor = 2 ** (config.levels - 1)
        if x % factor or y % factor:
            raise ConfigError("crop_size", f"the in-plane window {x}x{y} must be divisible by "
                              f"{factor} ({config.levels} UNet2D levels)")
        if config.queue_size < run.batch_size:
            raise ConfigError("queue_size", f"must be >= the batch size ({run.batch_size})")
        check_key_bn_groups(config, run)
        if config.lambda_contrast + config.lambda_position + config.lambda_restore <= 0:
            raise ConfigError("lambda_contrast", "at least one task weight must be > 0")

    @staticmethod
    def example_batch(crop_size, batch_size=2):
        """A zero batch with the structure of the recipe (``crop_size = (X, Y, k)``)."""
        x, y, k = (int(c) for c in crop_size)
        slab = tf.zeros((batch_size, x, y, k))
        scalar = tf.zeros((batch_size,))
        index = tf.zeros((batch_size,), tf.int32)
        box = tf.zeros((batch_size, 2, 3), tf.int32)
        return {"slab1": slab, "slab2": slab, "target": slab, "corrupted": slab,
                "position1": scalar, "position2": scalar, "z1": index, "z2": index,
                "depth": index + 1, "box1": box, "box2": box}

    @staticmethod
    def sample_volume(batch):
        """The slab ``[B, X, Y, k]`` read as the thin volume it was cut from,
        ``[B, X, Y, k, 1]`` (RAS: the slices run along the last axis), which
        is what the exported slice-wise model takes."""
        return batch["slab1"][..., None]

    def build_for(self, batch):
        """Creates every variable (online U-Net and heads, EMA copies, queue)."""
        x = batch["slab1"]
        self.slab_size = int(x.shape[-1])
        self.unet = UNet2D(base_width=self.config.base_width, levels=self.config.levels,
                           norm=self.config.norm, skips=True, out_channels=self.slab_size,
                           final_activation="sigmoid", name="unet2d")
        self.unet.build(x.shape)
        embedding = global_average(self.unet.encode(x)[-1])
        self.proj(embedding)
        self.position_head(embedding)
        self.unet_ema = MomentumEncoder(self.unet, self.config.momentum, name="unet2d_ema")
        self.proj_ema = MomentumEncoder(self.proj, self.config.momentum, name="projection_ema")
        self.queue.build(None)
        self.finish_build(x)

    def call(self, x, training=False):
        return self.unet(x, training=training)

    # ------------------------------------------------------------ the three tasks
    def embed(self, slab, training):
        """Online encoder embedding of a slab: GAP of the bottleneck, [B, C]."""
        return global_average(self.unet.encode(slab, training=training)[-1])

    def contrastive_term(self, embedding, key_slab, training):
        """(InfoNCE loss, logits, queries, keys): query from the online
        embedding, key from the momentum encoder (constant)."""
        q = self.proj(embedding, training=training)
        k = self.keys(key_slab)
        loss, logits = losses.info_nce(q, k, self.queue.values(), self.config.temperature)
        return loss, logits, q, k

    def keys(self, key_slab):
        """Momentum encoder + head on the key slabs (constants); shuffling BN
        over ``key_bn_groups`` groups of the global batch (0: the EMA moving
        statistics), as MoCo."""
        groups = self.config.key_bn_groups
        net = self.unet_ema.target

        def encode(slab, batch_stats):
            if not batch_stats:
                return self.proj_ema(global_average(net.encode(slab)[-1]))
            with batch_statistics(net):
                features = global_average(net.encode(slab, training=True)[-1])
            return self.proj_ema(features, batch_stats=True)

        return momentum_keys(self, encode, key_slab, groups)

    def position_term(self, embedding, position, training):
        """(MSE, mean absolute error) of the regressed normalised z-position."""
        pred = ops.cast(self.position_head(embedding, training=training)[:, 0], "float32")
        err = pred - ops.cast(position, "float32")
        return ops.mean(ops.square(err)), ops.mean(ops.abs(err))

    def restoration_term(self, corrupted, target, training):
        """(MSE, restored slab) of the U-Net on the corrupted slab vs the clean one."""
        restored = ops.cast(self.unet(corrupted, training=training), "float32")
        if restored.shape[-1] != target.shape[-1]:  # never let the MSE broadcast
            raise ValueError(f"restoration: {restored.shape[-1]} output channels for a "
                             f"{target.shape[-1]}-slice target")
        return ops.mean(ops.square(restored - ops.cast(target, "float32"))), restored

    def objective(self, batch, training=True):
        """All terms of one batch: dict of losses and monitors, and the key
        batch to enqueue (None when the contrastive term is off)."""
        cfg = self.config
        zero = ops.zeros(())
        out = dict(loss_contrast=zero, loss_position=zero, loss_restore=zero,
                   contrast_acc=zero, position_mae=zero, embedding_std=zero)
        keys = None
        if cfg.lambda_contrast > 0 or cfg.lambda_position > 0:
            embedding = self.embed(batch["slab1"], training)
        if cfg.lambda_contrast > 0:
            loss, logits, q, keys = self.contrastive_term(embedding, batch["slab2"], training)
            out.update(loss_contrast=loss, contrast_acc=losses.contrastive_accuracy(logits),
                       embedding_std=losses.embedding_std(q))
        if cfg.lambda_position > 0:
            loss, mae = self.position_term(embedding, batch["position1"], training)
            out.update(loss_position=loss, position_mae=mae)
        if cfg.lambda_restore > 0:
            out["loss_restore"] = self.restoration_term(batch["corrupted"], batch["target"],
                                                        training)[0]
        out["loss"] = (cfg.lambda_contrast * out["loss_contrast"]
                       + cfg.lambda_position * out["loss_position"]
                       + cfg.lambda_restore * out["loss_restore"])
        return out, keys

    def task_variables(self):
        """Trainable variables of the tasks switched on (a head whose weight
        is 0 gets no gradient and is left out of the update)."""
        cfg, off = self.config, set()
        if cfg.lambda_contrast <= 0:
            off |= {id(v) for v in self.proj.trainable_variables}
        if cfg.lambda_position <= 0:
            off |= {id(v) for v in self.position_head.trainable_variables}
        if cfg.lambda_restore <= 0:
            off |= {id(v) for layer in self.unet.decoder_layers + [self.unet.head]
                    for v in layer.trainable_variables}
        return [v for v in self.trainable_variables if id(v) not in off]

    def train_step(self, batch):
        if self.config.lambda_contrast > 0:
            self.unet_ema.update()  # MoCo: the key encoder moves before computing keys
            self.proj_ema.update()
        with tf.GradientTape() as tape:
            terms, keys = self.objective(batch, training=True)
            scaled = self.replica_scaled(terms["loss"])
        self.backprop(tape, scaled, self.task_variables())
        if keys is not None:
            self.queue.enqueue(keys)  # gathers all replicas' keys first
        return self.report(**terms)

    # ------------------------------------------------------------ monitoring
    def summary_images(self, batch):
        """Centre slice of: the two augmented slabs, the clean target, the
        corrupted input and its restoration."""
        c = int(batch["slab1"].shape[-1]) // 2
        _, restored = self.restoration_term(batch["corrupted"][:4], batch["target"][:4], False)
        pick = lambda x: ops.cast(x[:4, :, :, c:c + 1], "float32")  # noqa: E731
        return {"slab1": pick(batch["slab1"]), "slab2": pick(batch["slab2"]),
                "target": pick(batch["target"]), "corrupted": pick(batch["corrupted"]),
                "restored": pick(restored)}

    # ------------------------------------------------------------ transfer
    def transfer_parts(self):
        """HPT and fine-tuning load the whole U-Net (encoder + decoder)."""
        return {"unet2d": self.unet}

    def export_parts(self):
        """The U-Net applied slice by slice to a volume [B, D, H, W, 1] (slabs
        of ``k`` neighbouring slices, edge-padded): the encoder pyramid and
        the last decoder stage, stacked along z."""
        return {"unet2d": SliceFeatures(self.unet, slab_size=self.slab_size or 1,
                                        name="unet2d_slices")}
