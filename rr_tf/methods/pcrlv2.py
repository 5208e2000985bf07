"""PCRLv2: "A Unified Visual Information Preservation Framework for
Self-supervised Pre-Training in Medical Image Analysis" (TPAMI 2023), as
described in ``docs/methods.md`` and the public code RL4M/PCRLv2.

Network: the Genesis UNet3D *without* skip connections (the pre-training
"non-skip U-Net"), sigmoid head. Each of its decoder stages ``s`` (coarse
to fine, strides 4, 2, 1 at 4 levels) has

* a projection ``z_s`` = GAP -> BN of the stage's map,
* a predictor ``p_s`` = Dense(2C) -> BN -> ReLU -> Dense(C) of ``z_s``,
* a 1-channel reconstruction head, upsampled to full size (sigmoid).

One sample: two global views (IoU > 0.3, resized to the crop size), their
restoration targets (the globals after spatial, before intensity
augmentation) and ``num_local`` local views (sub-crops inside the union of
the globals, resized to ``local_size^3``). Losses per step, all weights 1:

1. ``L_global``: SimSiam symmetric negative cosine with stop-gradient,
   ``0.5 * (D(p1, sg z2) + D(p2, sg z1))``, between the two globals at one
   randomly chosen stage;
2. ``L_local``: the same between each local view and each global, each pair
   at its own random stage, averaged over the ``2 * num_local`` pairs;
3. ``L_rec``: MSE of the final output of global 1 against its target;
4. ``L_mid``: MSE of global 1's reconstruction at the stage chosen in (1),
   weighted by ``0.5 * (1 + cos(pi * progress))``.

``progress`` is the public code's ``epoch / total_epochs`` made step-based:
``step / mid_decay_steps`` (clipped to 1), where ``mid_decay_steps = 0``
(the default) means "the run's ``train_steps``" and is resolved by
:meth:`PCRLv2.check_config`, so the value stored with the run is the one
used. Stage choices are drawn statelessly from ``(seed, step)``: a run is
reproducible, and every replica draws the same stages. No negatives, no
queue, no momentum encoder.

Differences from the public code, kept small on purpose: the reconstruction
heads are a 1x1x1 conv, trilinear upsampling, then the sigmoid (the code
uses a 3x3x3 conv + BN + sigmoid at the stage's resolution, then upsamples);
all BatchNorm layers of the heads are synchronised across replicas (on one
device this changes nothing).
"""

import dataclasses
import math

import keras
import tensorflow as tf
from keras import ops

from rr_tf import losses
from rr_tf.data import recipes
from rr_tf.errors import ConfigError
from rr_tf.methods.base import CNNConfig, PretrainMethod, param
from rr_tf.optim import optimizer_step
from rr_tf.models import rng
from rr_tf.models.heads import PredictorHead, ReconstructionHead, global_pool
from rr_tf.models.layers import BN_EPSILON, BN_MOMENTUM, register
from rr_tf.models.parts import CNNPyramid

# sizes of the global / local crops as multiples of the output size: with a
# 64x64x32 crop these are the published 64..112 (globals) and 16..32 (locals)
GLOBAL_SCALES = (1.0, 1.25, 1.5, 1.75)
LOCAL_SCALES = (1.0, 1.5, 2.0)


@dataclasses.dataclass
class Config(CNNConfig):
    """PCRLv2 hyper-parameters (defaults: the published values)."""

    num_local: int = param(6, "Local views per sample (sub-crops inside the union box of the "
                           "two global views).", low=1)
    local_size: int = param(16, "Edge of the cubic local views (voxels); local crops of 1, 1.5 "
                            "or 2 times this size are resized to it.", low=1)
    min_iou: float = param(0.3, "Minimum 3D IoU of the two global crops.", low=0.0, high=1.0)
    mid_decay_steps: int = param(0, "Steps over which the mid-stage reconstruction weight decays "
                                 "as 0.5 * (1 + cos(pi * step / mid_decay_steps)) (the published "
                                 "per-epoch schedule, step-based); 0 = the run's --train_steps.",
                                 low=0)


# ---------------------------------------------------------------------------
# pure pieces of the objective (tested on their own)


def stage_choices(seed, step, count, num_stages):
    """``count`` decoder-stage indices in ``[0, num_stages)``, drawn
    statelessly from ``(seed, step)``: the same on every replica and on
    every re-run (index 0 = the global pair, then two per local view)."""
    key = tf.stack([tf.cast(seed, tf.int32), tf.cast(step, tf.int32)])
    return rng.uniform_int([count], key, 0, num_stages)


def mid_stage_weight(step, total_steps):
    """``0.5 * (1 + cos(pi * p))`` with ``p = step / total_steps`` clipped to
    [0, 1]: 1 at the start, 0.5 half-way, 0 at the end (float32)."""
    p = tf.clip_by_value(tf.cast(step, tf.float32) / float(total_steps), 0.0, 1.0)
    return 0.5 * (1.0 + tf.cos(math.pi * p))


def pair_loss(a, b, onehot):
    """SimSiam symmetric loss between two views at the stage ``onehot``
    selects. ``a``, ``b``: per stage ``(z, p)`` (projection, prediction);
    each prediction is pulled towards the other view's projection, which is
    a constant (stop-gradient). Every stage's term is computed (cheap) and
    the one-hot weights keep the chosen one, so the graph is static."""
    terms = ops.stack([losses.simsiam_symmetric_loss(pa, pb, za, zb)
                       for (za, pa), (zb, pb) in zip(a, b)])
    return ops.sum(ops.cast(onehot, "float32") * terms)


def mse(pred, target):
    """Mean squared error in float32; the target is a constant."""
    target = ops.stop_gradient(ops.cast(target, "float32"))
    return ops.mean(ops.square(ops.cast(pred, "float32") - target))


@register
class StageProjection(keras.layers.Layer):
    """PCRLv2 projection of a decoder stage: global average pool -> ``bn``
    (BatchNorm1d; synchronised across replicas, PyTorch eps/momentum)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                                  synchronized=True, name="bn",
                                                  dtype=self.dtype_policy)

    def build(self, input_shape):
        self.bn.build((input_shape[0], input_shape[-1]))
        self.built = True

    def call(self, x, training=False):
        return self.bn(global_pool(x), training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


# ---------------------------------------------------------------------------


class PCRLv2(PretrainMethod):
    """The PCRLv2 pre-training model; ``train_step`` implements the objective."""

    Config = Config
    metric_names = ("loss", "loss_global", "loss_local", "loss_rec", "loss_mid", "mid_weight",
                    "embedding_std")

    def __init__(self, config, seed=0, **kwargs):
        super().__init__(config, name="pcrlv2", **kwargs)
        self.seed = int(seed)
        self.unet = config.unet3d(skips=False, final_activation="sigmoid", name="unet3d")
        n = self.num_stages = config.levels - 1
        # decoder stage i (coarse to fine) is at stride 2**(n - 1 - i)
        self.stage_strides = [2 ** (n - 1 - i) for i in range(n)]
        self.projections = [StageProjection(name=f"projection{i + 1}") for i in range(n)]
        self.predictors = [PredictorHead(name=f"predictor{i + 1}") for i in range(n)]
        self.reconstructions = [ReconstructionHead(factor=s, activation="sigmoid",
                                                   name=f"reconstruction{i + 1}")
                                for i, s in enumerate(self.stage_strides)]

    # ------------------------------------------------------------ set-up
    @staticmethod
    def recipe(config, crop_size):
        crop = tuple(int(c) for c in crop_size)
        local = (int(config.local_size),) * 3
        return recipes.pcrlv2_views(
            global_out=crop, local_out=local, num_local=config.num_local,
            min_iou=config.min_iou,
            global_sizes=[[int(round(c * f)) for c in crop] for f in GLOBAL_SCALES],
            local_sizes=[[int(round(c * f)) for c in local] for f in LOCAL_SCALES])

    @staticmethod
    def check_config(config, run):
        """Validates the config against the run; resolves ``mid_decay_steps=0``
        to ``run.train_steps`` (the resolved value is what the run stores)."""
        if config.levels < 2:
            raise ConfigError("levels", "PCRLv2 needs >= 2 levels (one decoder stage or more)")
        config.check_crop(run.crop_size)
        factor = 2 ** (config.levels - 1)
        if config.local_size % factor:
            raise ConfigError("local_size", f"must be a multiple of {factor} ({config.levels} "
                              f"UNet3D levels), got {config.local_size}")
        if config.num_local < 1:
            raise ConfigError("num_local", "must be >= 1")
        if config.mid_decay_steps < 0:
            raise ConfigError("mid_decay_steps", "must be >= 0 (0 = the run's train_steps)")
        if config.mid_decay_steps == 0:
            config.mid_decay_steps = int(run.train_steps)

    @staticmethod
    def example_batch(crop_size, batch_size=2):
        """A zero batch with the structure of :func:`recipes.pcrlv2_views`."""
        d = Config()
        g = (batch_size,) + tuple(crop_size) + (1,)
        box = tf.tile(tf.constant([[[0, 0, 0], list(crop_size)]], tf.int32), [batch_size, 1, 1])
        return {"global1": tf.zeros(g), "global2": tf.zeros(g), "target1": tf.zeros(g),
                "target2": tf.zeros(g), "box1": box, "box2": box,
                "locals": tf.zeros((batch_size, d.num_local) + (d.local_size,) * 3 + (1,)),
                "local_boxes": tf.zeros((batch_size, d.num_local, 2, 3), tf.int32)}

    def build_for(self, batch):
        """Creates every variable from one batch (the globals' shape)."""
        v = self.sample_volume(batch)
        self.unet.build(v.shape)
        self.forward(v, reconstruct=True)
        self.finish_build(v)

    def call(self, x, training=False):
        return self.unet(x, training=training)

    # ------------------------------------------------------------ forward
    def forward(self, x, training=False, reconstruct=False):
        """(per-stage ``(z, p)``, final output, per-stage full-size
        reconstructions or None)."""
        pyramid = self.unet.encode(x, training=training)
        stages, out = self.unet.decode(pyramid, training=training)
        emb = []
        for f, proj, pred in zip(stages, self.projections, self.predictors):
            z = proj(f, training=training)
            emb.append((z, pred(z, training=training)))
        mids = [head(f) for f, head in zip(stages, self.reconstructions)] if reconstruct else None
        return emb, out, mids

    # ------------------------------------------------------------ objective
    def objective(self, batch, training=True):
        """Every loss term of one batch, as a dict (``loss`` = their sum)."""
        cfg = self.config
        if cfg.mid_decay_steps < 1:
            raise ConfigError("mid_decay_steps", "unresolved (0 = the run's train_steps is "
                              "resolved by PCRLv2.check_config); give a positive value when "
                              "driving the method directly")
        g1, g2, t1 = batch["global1"], batch["global2"], batch["target1"]
        locs = batch["locals"]
        n_local = int(locs.shape[1])
        b = tf.shape(g1)[0]
        step = optimizer_step(self)
        onehot = tf.one_hot(stage_choices(self.seed, step, 1 + 2 * n_local, self.num_stages),
                            self.num_stages)
        w_mid = mid_stage_weight(step, cfg.mid_decay_steps)

        emb1, out1, mids1 = self.forward(g1, training=training, reconstruct=True)
        emb2, _, _ = self.forward(g2, training=training)
        # all local views in one batch, view-major (rows i*B .. (i+1)*B-1 = local i)
        flat = tf.reshape(tf.transpose(locs, [1, 0, 2, 3, 4, 5]),
                          tf.concat([[-1], tf.shape(locs)[2:]], 0))
        emb_l, _, _ = self.forward(flat, training=training)

        l_global = pair_loss(emb1, emb2, onehot[0])
        l_local = 0.0
        for i in range(n_local):
            emb_i = [(z[i * b:(i + 1) * b], p[i * b:(i + 1) * b]) for z, p in emb_l]
            l_local += pair_loss(emb1, emb_i, onehot[1 + 2 * i])
            l_local += pair_loss(emb2, emb_i, onehot[2 + 2 * i])
        l_local = l_local / (2.0 * n_local)
        l_rec = mse(out1, t1)
        l_mid = ops.sum(onehot[0] * ops.stack([mse(m, t1) for m in mids1]))
        total = l_global + l_local + l_rec + w_mid * l_mid
        spread = ops.sum(onehot[0] * ops.stack([losses.embedding_std(z) for z, _ in emb1]))
        return {"loss": total, "loss_global": l_global, "loss_local": l_local, "loss_rec": l_rec,
                "loss_mid": l_mid, "mid_weight": w_mid, "embedding_std": spread,
                "output": out1, "mids": mids1, "onehot": onehot}

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            terms = self.objective(batch, training=True)
            scaled = self.replica_scaled(terms["loss"])
        self.backprop(tape, scaled, self.trainable_variables)
        return self.report(**{n: terms[n] for n in self.metric_names})

    # ------------------------------------------------------------ monitoring
    def summary_images(self, batch):
        """Middle axial slices (first 4 samples): global 1, its target, the
        final reconstruction, the reconstructions of every decoder stage
        side by side (coarse to fine), the local views side by side, and the
        crop layout: global 2 (green) and the local boxes (red) drawn in the
        frame of global 1's box (projected on the D-H plane, flips and affine
        not undone)."""
        g1, t1 = batch["global1"][:4], batch["target1"][:4]
        _, out, mids = self.forward(g1, training=False, reconstruct=True)
        z = g1.shape[3] // 2
        mid = lambda v: ops.clip(ops.cast(v[:, :, :, z], "float32"), 0.0, 1.0)  # noqa: E731
        locs = batch["locals"][:4]
        lz = locs.shape[4] // 2
        strip = ops.concatenate([locs[:, i, :, :, lz] for i in range(locs.shape[1])], axis=2)
        return {"global1": mid(g1), "target1": mid(t1), "reconstruction": mid(out),
                "stage_reconstructions": ops.concatenate([mid(m) for m in mids], axis=2),
                "locals": ops.clip(ops.cast(strip, "float32"), 0.0, 1.0),
                "layout": crop_layout(batch["box1"][:4], batch["box2"][:4],
                                      batch["local_boxes"][:4], g1.shape[1:3])}

    # ------------------------------------------------------------ transfer
    def transfer_parts(self):
        """The UNet3D (its encoder is what transfers; the decoder has the
        no-skip shapes of pre-training)."""
        return {"unet": self.unet}

    def export_parts(self):
        """The encoder pyramid (strides 1-8) for a segmenter with skips."""
        return {"cnn_encoder": CNNPyramid(self.unet)}


def crop_layout(frame, box2, local_boxes, size):
    """RGB picture [B, size[0], size[1], 3] of box outlines in the frame of
    ``frame`` (global 1's box, resized to ``size``): ``box2`` green, local
    boxes red, the frame itself grey; axes D and H."""
    frame = tf.cast(frame, tf.float32)
    boxes = tf.concat([tf.cast(box2, tf.float32)[:, None], tf.cast(local_boxes, tf.float32)], 1)
    scale = tf.constant([float(s) for s in size], tf.float32) / tf.maximum(frame[:, 1, :2], 1.0)
    lo = (boxes[:, :, 0, :2] - frame[:, None, 0, :2]) * scale[:, None]       # [B, K, 2]
    hi = (boxes[:, :, 0, :2] + boxes[:, :, 1, :2] - frame[:, None, 0, :2]) * scale[:, None]

    def axis(a):
        c = tf.range(size[a], dtype=tf.float32)[None, None] + 0.5           # [1, 1, n]
        inside = (c >= lo[..., a:a + 1]) & (c <= hi[..., a:a + 1])
        edge = inside & ((c - lo[..., a:a + 1] < 1.0) | (hi[..., a:a + 1] - c < 1.0))
        return inside, edge

    in_d, edge_d = axis(0)
    in_h, edge_h = axis(1)
    inside = in_d[..., :, None] & in_h[..., None, :]
    outline = inside & (edge_d[..., :, None] | edge_h[..., None, :])
    outline = tf.cast(outline, tf.float32)                                   # [B, K, D, H]
    green = outline[:, 0]
    red = tf.reduce_max(outline[:, 1:], axis=1)
    base = tf.fill(tf.shape(green), 0.15)
    return tf.stack([tf.maximum(base, red), tf.maximum(base, green), base], axis=-1)
