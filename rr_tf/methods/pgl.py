"""PGL: "Prior-Guided Local Self-supervised Learning for 3D Medical Image
Segmentation" (Xie et al., 2020), as described in ``docs/methods.md``
(Related methods).

Two views of one volume are cut with *known* crop boxes and flips (the
"prior"). BYOL-style networks:

* online: UNet3D (encoder + decoder, with skips) -> global projector ->
  global predictor on the pooled bottleneck; per decoder stage a voxel-wise
  (1x1x1) projector -> predictor;
* target: an EMA (:class:`~rr_tf.models.momentum.MomentumEncoder`) of the
  UNet3D, the global projector and the voxel-wise projectors; constants of
  the objective (stop-gradient).

Losses, both symmetrised over the two views:

1. global: negative cosine between the online prediction of one view and
   the target projection of the other (BYOL, in SimSiam's ``-cos`` form);
2. local: the overlap of the two boxes is located in each view's feature
   grid (:mod:`rr_tf.methods.alignment`: resize from box to crop size and
   flips accounted for), both maps are resampled over it to one grid
   (trilinear crop-and-resize; the grid is the stage's map size), and the
   voxel-wise negative cosine (or MSE, ``local_loss``) between the aligned
   online predictions and target projections is minimised, averaged over
   the decoder stages used (``local_stages``, coarsest first).

``L = lambda_global * L_global + lambda_local * L_local``. The EMA is
updated once per step, before the targets are computed (as in rr_tf's
MoCo/RepRec; BYOL updates after the optimizer step: the same sequence
shifted by one step). Augmentation: flips and intensity only (a small
affine or patch swap would break the exact voxel correspondence).
"""

import contextlib
import dataclasses

import keras
import tensorflow as tf
from keras import ops

from rr_tf import losses
from rr_tf.data import recipes
from rr_tf.errors import ConfigError
from rr_tf.methods import alignment
from rr_tf.methods.base import CNNConfig, PretrainMethod, param
from rr_tf.methods.contrastive import check_key_bn_groups, momentum_keys
from rr_tf.models.heads import ProjectionHead
from rr_tf.models.layers import BN_EPSILON, BN_MOMENTUM, register, with_channels
from rr_tf.models.momentum import MomentumEncoder, batch_statistics
from rr_tf.models.parts import CNNPyramid


@dataclasses.dataclass
class Config(CNNConfig):
    """PGL hyper-parameters (see configs/pgl.flags for their sources)."""

    proj_dim: int = param(256, "Output size of the global projector and predictor.", low=1)
    proj_hidden_dim: int = param(4096, "Hidden size of the global projector and predictor MLPs.",
                                 low=1)
    local_dim: int = param(128, "Channels of the voxel-wise (1x1x1) projector and predictor "
                           "outputs (hidden: twice this).", low=1)
    local_stages: int = param(3, "Decoder stages with a local consistency term, counted from "
                              "the coarsest (at most levels - 1).", low=1)
    local_loss: str = param("cosine", "Voxel-wise consistency: negative cosine or MSE of the "
                            "aligned feature vectors.", choices=("cosine", "mse"))
    lambda_global: float = param(1.0, "Weight of the global (BYOL) term.", low=0.0)
    lambda_local: float = param(1.0, "Weight of the local consistency term.", low=0.0)
    momentum: float = param(0.996, "EMA momentum of the target network.", low=0.0, high=1.0)
    key_bn_groups: int = param(2, "Target network BatchNorm: statistics over this many random "
                               "groups of the global batch (BYOL runs its target with batch "
                               "statistics; a multiple of the replica count that divides the "
                               "batch); 0 = its EMA moving statistics.", low=0)
    min_iou: float = param(0.3, "Minimum 3D IoU of the two crops (their overlap is what the "
                           "local term aligns).", low=0.0, high=1.0)
    crop_scales: tuple = param((1.0, 1.25, 1.5), "Crop sizes as multiples of --crop_size "
                               "(resized to it), drawn per view.", low=0.01)


@register
class PointwiseMLP(keras.layers.Layer):
    """``conv1`` 1x1x1 (hidden) -> ``bn`` -> ReLU -> ``conv2`` 1x1x1 (out):
    an MLP applied to every voxel's feature vector (BN synchronised across
    replicas, PyTorch eps/momentum)."""

    def __init__(self, hidden_dim, out_dim, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim, self.out_dim = int(hidden_dim), int(out_dim)
        dt = self.dtype_policy
        self.conv1 = keras.layers.Conv3D(self.hidden_dim, 1, name="conv1", dtype=dt)
        self.bn = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                                  synchronized=True, name="bn", dtype=dt)
        self.conv2 = keras.layers.Conv3D(self.out_dim, 1, name="conv2", dtype=dt)

    def build(self, input_shape):
        self.conv1.build(input_shape)
        hidden = with_channels(input_shape, self.hidden_dim)
        self.bn.build(hidden)
        self.conv2.build(hidden)
        self.built = True

    def call(self, x, training=False):
        return self.conv2(ops.relu(self.bn(self.conv1(x), training=training)))

    def compute_output_shape(self, input_shape):
        return with_channels(input_shape, self.out_dim)

    def get_config(self):
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim, out_dim=self.out_dim)
        return config


@register
class StageHeads(keras.layers.Layer):
    """One :class:`PointwiseMLP` per decoder stage (``stage1``, ...): maps a
    list of feature maps to the list of their heads' outputs."""

    def __init__(self, num_stages, hidden_dim, out_dim, **kwargs):
        super().__init__(**kwargs)
        self.num_stages = int(num_stages)
        self.hidden_dim, self.out_dim = int(hidden_dim), int(out_dim)
        self.heads = [PointwiseMLP(self.hidden_dim, self.out_dim, name=f"stage{i + 1}",
                                   dtype=self.dtype_policy) for i in range(self.num_stages)]

    def build(self, input_shape):
        for head, shape in zip(self.heads, input_shape):
            head.build(tuple(shape))
        self.built = True

    def call(self, maps, training=False):
        return [head(m, training=training) for head, m in zip(self.heads, maps)]

    def get_config(self):
        config = super().get_config()
        config.update(num_stages=self.num_stages, hidden_dim=self.hidden_dim, out_dim=self.out_dim)
        return config


def decoder_stages(unet, pyramid, count, training=False):
    """The first ``count`` decoder stage outputs (coarse to fine) of a
    UNet3D, without running the finer stages and the head (the same layers
    and order as ``UNet3D.decode``)."""
    x, out = pyramid[-1], []
    for i, (up, dec) in enumerate(zip(unet.up_convs[:count], unet.dec_blocks[:count])):
        x = up(x)
        if unet.skips:
            x = ops.concatenate([x, pyramid[-2 - i]], axis=-1)
        x = dec(x, training=training)
        out.append(x)
    return out


def local_consistency(online, target, kind="cosine"):
    """Voxel-wise consistency of aligned maps ``[B, d, h, w, C]``: mean over
    voxels of ``-cos(online, sg target)`` (``kind="cosine"``, minimum -1) or
    of the squared difference (``"mse"``, minimum 0). Float32."""
    c = online.shape[-1]
    if kind == "cosine":
        return losses.simsiam_loss(ops.reshape(online, (-1, c)), ops.reshape(target, (-1, c)))
    if kind == "mse":
        target = ops.stop_gradient(ops.cast(target, "float32"))
        return ops.mean(ops.square(ops.cast(online, "float32") - target))
    raise ValueError(f"local_loss must be cosine or mse, got {kind!r}")


class PGL(PretrainMethod):
    """The PGL pre-training model; ``train_step`` implements the objective."""

    Config = Config
    metric_names = ("loss", "loss_global", "loss_local", "embedding_std")

    def __init__(self, config, seed=0, **kwargs):
        super().__init__(config, name="pgl", **kwargs)
        self.seed = int(seed)
        self.unet = config.unet3d(skips=True, name="unet3d")
        n = self.num_local_stages = min(int(config.local_stages), config.levels - 1)
        # decoder stage i (coarse to fine) is at stride 2**(levels - 2 - i)
        self.stage_strides = [2 ** (config.levels - 2 - i) for i in range(n)]
        self.projector = ProjectionHead(hidden_dim=config.proj_hidden_dim, out_dim=config.proj_dim,
                                        name="projector")
        self.predictor = ProjectionHead(hidden_dim=config.proj_hidden_dim, out_dim=config.proj_dim,
                                        name="predictor")
        self.local_projector = StageHeads(n, 2 * config.local_dim, config.local_dim,
                                          name="local_projector")
        self.local_predictor = StageHeads(n, 2 * config.local_dim, config.local_dim,
                                          name="local_predictor")

    # ------------------------------------------------------------ set-up
    @staticmethod
    def recipe(config, crop_size):
        return recipes.pgl_pair(crop_size, min_iou=config.min_iou, scales=config.crop_scales)

    @staticmethod
    def check_config(config, run):
        if config.levels < 2:
            raise ConfigError("levels", "PGL needs >= 2 levels (a decoder)")
        config.check_crop(run.crop_size)
        if not 1 <= config.local_stages <= config.levels - 1:
            raise ConfigError("local_stages", f"must be in 1..{config.levels - 1} (decoder stages)")
        if config.local_loss not in ("cosine", "mse"):
            raise ConfigError("local_loss", "must be 'cosine' or 'mse'")
        if not 0.0 <= config.momentum <= 1.0:
            raise ConfigError("momentum", "must be in [0, 1]")
        check_key_bn_groups(config, run)
        if not config.crop_scales or min(config.crop_scales) <= 0:
            raise ConfigError("crop_scales", "need positive scales")

    @staticmethod
    def example_batch(crop_size, batch_size=2):
        """A zero batch with the structure of :func:`recipes.pgl_pair`."""
        shape = (batch_size,) + tuple(crop_size) + (1,)
        box = tf.tile(tf.constant([[[0, 0, 0], list(crop_size)]], tf.int32), [batch_size, 1, 1])
        flips = tf.zeros((batch_size, 3), tf.int32)
        return {"view1": tf.zeros(shape), "view2": tf.zeros(shape), "box1": box, "box2": box,
                "flips1": flips, "flips2": flips}

    def build_for(self, batch):
        """Creates every variable (online nets, then their EMA copies)."""
        v = self.sample_volume(batch)
        self.unet.build(v.shape)
        self.unet(v)  # builds the whole UNet3D (its tail is not used by the objective)
        pyramid = self.unet.encode(v)
        stages = decoder_stages(self.unet, pyramid, self.num_local_stages)
        self.predictor(self.projector(pyramid[-1]))
        self.local_predictor(self.local_projector(stages))
        m = self.config.momentum
        self.unet_ema = MomentumEncoder(self.unet, m, sample_input=v, name="unet_ema")
        self.projector_ema = MomentumEncoder(self.projector, m, sample_input=pyramid[-1],
                                             name="projector_ema")
        self.local_projector_ema = MomentumEncoder(self.local_projector, m, sample_input=stages,
                                                   name="local_projector_ema")
        self.finish_build(v)

    def call(self, x, training=False):
        return self.unet(x, training=training)

    # ------------------------------------------------------------ networks
    def online(self, x, training=False):
        """(global projection z, global prediction p, per-stage voxel-wise
        predictions) of the online network."""
        pyramid = self.unet.encode(x, training=training)
        stages = decoder_stages(self.unet, pyramid, self.num_local_stages, training=training)
        z = self.projector(pyramid[-1], training=training)
        p = self.predictor(z, training=training)
        q = self.local_predictor(self.local_projector(stages, training=training), training=training)
        return z, p, q

    def target(self, x):
        """(global projection, per-stage voxel-wise projections) of the EMA
        target network, as constants. Its BatchNorm uses the statistics of
        ``key_bn_groups`` random groups of the global batch (BYOL's target
        runs in training mode), or with 0 the EMA moving statistics."""
        groups = self.config.key_bn_groups
        net = self.unet_ema.target

        def project(v, batch_stats):
            with batch_statistics(net) if batch_stats else contextlib.nullcontext():
                pyramid = net.encode(v, training=batch_stats)
                stages = decoder_stages(net, pyramid, self.num_local_stages,
                                        training=batch_stats)
            return (self.projector_ema(pyramid[-1], batch_stats=batch_stats),
                    self.local_projector_ema(stages, batch_stats=batch_stats))

        z, k = momentum_keys(self, project, x, groups)
        return z, list(k)

    def update_targets(self):
        for ema in (self.unet_ema, self.projector_ema, self.local_projector_ema):
            ema.update()

    # ------------------------------------------------------------ objective
    def aligned(self, maps1, maps2, batch):
        """Per stage: both views' maps resampled over the overlap of the
        boxes to the stage's map size -> list of (aligned1, aligned2)."""
        crop = tuple(int(c) for c in batch["view1"].shape[1:4])
        out = []
        for m1, m2, stride in zip(maps1, maps2, self.stage_strides):
            r1, r2 = alignment.overlap_regions(batch["box1"], batch["box2"], batch["flips1"],
                                               batch["flips2"], crop, stride)
            grid = tuple(int(s) for s in m1.shape[1:4])
            out.append((alignment.sample_region(m1, r1, grid),
                        alignment.sample_region(m2, r2, grid)))
        return out

    def objective(self, batch, training=True):
        """The loss terms of one batch (the EMA targets are not updated here)."""
        cfg = self.config
        v1, v2 = batch["view1"], batch["view2"]
        z1, p1, q1 = self.online(v1, training=training)
        z2, p2, q2 = self.online(v2, training=training)
        t1, k1 = self.target(v1)
        t2, k2 = self.target(v2)
        l_global = 0.5 * (losses.simsiam_loss(p1, t2) + losses.simsiam_loss(p2, t1))
        # q1 (view 1, online) meets k2 (view 2, target) on the overlap, and vice versa
        terms = []
        for (a_q1, a_k2), (a_k1, a_q2) in zip(self.aligned(q1, k2, batch),
                                               self.aligned(k1, q2, batch)):
            terms.append(0.5 * (local_consistency(a_q1, a_k2, cfg.local_loss)
                                + local_consistency(a_q2, a_k1, cfg.local_loss)))
        l_local = ops.mean(ops.stack(terms))
        total = cfg.lambda_global * l_global + cfg.lambda_local * l_local
        return {"loss": total, "loss_global": l_global, "loss_local": l_local,
                "embedding_std": losses.embedding_std(z1)}

    def _trained_variables(self):
        """Every trainable variable the objective reaches: not the UNet3D's
        1x1x1 output head, nor decoder stages finer than ``local_stages``."""
        n = self.num_local_stages
        unused = [self.unet.head] + self.unet.up_convs[n:] + self.unet.dec_blocks[n:]
        skip = {id(v) for layer in unused for v in layer.trainable_variables}
        return [v for v in self.trainable_variables if id(v) not in skip]

    def train_step(self, batch):
        self.update_targets()
        with tf.GradientTape() as tape:
            terms = self.objective(batch, training=True)
            scaled = self.replica_scaled(terms["loss"])
        self.backprop(tape, scaled, self._trained_variables())
        return self.report(**terms)

    # ------------------------------------------------------------ monitoring
    def summary_images(self, batch):
        """Middle axial slices (first 4 samples): each view with the overlap
        tinted red, both views resampled over the overlap by the same
        alignment the local loss uses (they must show the same anatomy,
        up to intensity augmentation), and the voxel-wise cosine between
        the aligned online prediction (view 1) and target projection
        (view 2) at the finest stage used, mapped from [-1, 1] to [0, 1]."""
        b = {k: v[:4] for k, v in batch.items() if k in
             ("view1", "view2", "box1", "box2", "flips1", "flips2")}
        crop = tuple(int(c) for c in b["view1"].shape[1:4])
        r1, r2 = alignment.overlap_regions(b["box1"], b["box2"], b["flips1"], b["flips2"], crop, 1)
        z = crop[2] // 2

        def tinted(v, region):
            m = alignment.region_mask(region, crop)[:, :, :, z]
            g = ops.clip(ops.cast(v[:, :, :, z], "float32"), 0.0, 1.0)
            return ops.concatenate([g * (1 - 0.4 * m) + 0.4 * m, g * (1 - 0.4 * m),
                                    g * (1 - 0.4 * m)], axis=-1)

        def slice01(v):
            return ops.clip(ops.cast(v[:, :, :, v.shape[3] // 2], "float32"), 0.0, 1.0)

        _, _, q1 = self.online(b["view1"])
        _, k2 = self.target(b["view2"])
        a_q1, a_k2 = self._aligned_finest(q1, k2, b)
        cos = ops.sum(losses.l2_normalize(a_q1) * losses.l2_normalize(a_k2), axis=-1, keepdims=True)
        return {"view1_overlap": tinted(b["view1"], r1), "view2_overlap": tinted(b["view2"], r2),
                "overlap1": slice01(alignment.sample_region(b["view1"], r1, crop)),
                "overlap2": slice01(alignment.sample_region(b["view2"], r2, crop)),
                "local_cosine": slice01(0.5 * (cos + 1.0))}

    def _aligned_finest(self, q1, k2, batch):
        crop = tuple(int(c) for c in batch["view1"].shape[1:4])
        stride = self.stage_strides[-1]
        r1, r2 = alignment.overlap_regions(batch["box1"], batch["box2"], batch["flips1"],
                                           batch["flips2"], crop, stride)
        grid = tuple(int(s) for s in q1[-1].shape[1:4])
        return (alignment.sample_region(q1[-1], r1, grid),
                alignment.sample_region(k2[-1], r2, grid))

    # ------------------------------------------------------------ transfer
    def transfer_parts(self):
        """The online UNet3D, encoder and decoder (with skips, as in
        fine-tuning)."""
        return {"unet": self.unet}

    def export_parts(self):
        """The encoder pyramid (strides 1-8)."""
        return {"cnn_encoder": CNNPyramid(self.unet)}
