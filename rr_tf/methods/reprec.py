"""RepRec: representation recovery (WACV 2023), as decided in
``docs/methods.md``.

A CNN encoder is trained contrastively (MoCo v2: two views, projection head,
momentum key encoder, queue, InfoNCE; SimCLR in-batch negatives as a flag)
and supplies low-level features; a transformer, fed the CNN's stride-16
feature map as tokens, is trained to *recover the CNN representations of
masked cells*:

1. mask: 16^3 cells of view 1 are chosen (``mask_ratio``) and their voxels
   replaced (zeros or noise) *before* the online CNN runs, so visible tokens
   carry nothing of the masked cells;
2. the transformer encodes the visible tokens only (MAE style); a light
   decoder with mask tokens + position embeddings predicts every token;
3. target: the momentum CNN's features of the *unmasked* view 1,
   stop-gradient, per-token LayerNorm (no affine);
4. loss: MSE on masked tokens only.

``L = lambda_contrast * L_contrast + lambda_rec * L_recover`` (joint), or a
two-stage schedule: the CNN alone (contrastive) for ``stage1_steps``, then
the transformer alone (recovery) with the CNN frozen.
"""

import dataclasses

import keras
import tensorflow as tf
from keras import ops

from rr_tf import losses
from rr_tf.data import recipes
from rr_tf.errors import ConfigError
from rr_tf.methods.base import PretrainMethod, param
from rr_tf.methods.contrastive import (SIMCLR_TEMPERATURE, ContrastiveBranch, MoCoConfig,
                                       check_key_bn_groups)
from rr_tf.methods.masking import global_random_masking, global_uniform
from rr_tf.optim import optimizer_step
from rr_tf.models.heads import ProjectionHead
from rr_tf.models.hybrid import HybridEncoder, map_to_tokens
from rr_tf.models.momentum import Queue
from rr_tf.models.parts import CNNPyramid, HybridFeatures


@dataclasses.dataclass
class Config(MoCoConfig):
    """RepRec hyper-parameters (defaults: docs/methods.md; demo flagfiles shrink them)."""

    contrastive: str = param("moco", "Negatives from the queue (moco) or the global batch "
                             "(simclr, tau 0.1).", choices=("moco", "simclr"))
    mask_ratio: float = param(0.6, "Fraction of tokens (16^3 cells) masked.", low=0.0, high=0.95)
    mask_fill: str = param("zeros", "What replaces the voxels of masked cells.",
                           choices=("zeros", "noise"))
    lambda_rec: float = param(1.0, "Weight of the representation-recovery loss.", low=0.0)
    lambda_contrast: float = param(1.0, "Weight of the contrastive loss (0 = ablation).", low=0.0)
    transformer_dim: int = param(384, "Transformer width.", low=8)
    transformer_depth: int = param(6, "Transformer encoder blocks.", low=1)
    transformer_heads: int = param(6, "Attention heads (divides the width).", low=1)
    decoder_dim: int = param(192, "Width of the recovery decoder.", low=8)
    decoder_depth: int = param(2, "Blocks of the recovery decoder.", low=1)
    schedule: str = param("joint", "Joint training, or two_stage: the CNN alone (contrastive) "
                          "then the transformer with the CNN frozen.",
                          choices=("joint", "two_stage"))
    stage1_steps: int = param(0, "two_stage: steps of the CNN-only stage.", low=0)


CELL = 16  # token cell = CNN stride


class RepRec(ContrastiveBranch, PretrainMethod):
    """The RepRec pre-training model; ``train_step`` implements the objective.

    The CNN branch (MoCo v2 or SimCLR: ``contrastive_terms``, the momentum
    CNN ``cnn_ema`` + ``proj_ema``, the queue) is the shared
    :class:`rr_tf.methods.contrastive.ContrastiveBranch`."""

    Config = Config
    metric_names = ("loss", "loss_contrast", "loss_recover", "contrast_acc", "embedding_std",
                    "target_std")
    supports_micle = True

    def __init__(self, config, seed=0, **kwargs):
        super().__init__(config, name="reprec", **kwargs)
        self.encoder = HybridEncoder(
            base_width=config.base_width, levels=config.levels, norm=config.norm,
            dim=config.transformer_dim, depth=config.transformer_depth,
            heads=config.transformer_heads, decoder_dim=config.decoder_dim,
            decoder_depth=config.decoder_depth, decoder_heads=config.transformer_heads,
            name="hybrid_encoder")
        self.proj = ProjectionHead(hidden_dim=4 * config.proj_dim, out_dim=config.proj_dim,
                                   name="projection")
        self.queue = Queue(config.queue_size, config.proj_dim, seed=seed, name="queue")
        self.seed = int(seed)
        self.stage = 1 if config.schedule == "two_stage" else 0  # 0 = joint

    # ------------------------------------------------------------ contrastive branch
    @property
    def contrastive_mode(self):
        return self.config.contrastive

    @property
    def contrastive_temperature(self):
        return self.config.temperature if self.config.contrastive == "moco" else SIMCLR_TEMPERATURE

    def contrastive_features(self, x, training=False):
        return self.encoder.cnn_features(x, training=training)[1]

    # ------------------------------------------------------------ set-up
    @staticmethod
    def recipe(config, crop_size):
        return recipes.contrastive_pair(crop_size)

    @staticmethod
    def check_config(config, run):
        if any(c % CELL for c in run.crop_size):
            raise ConfigError("crop_size", f"RepRec needs multiples of {CELL} (token cells), "
                              f"got {run.crop_size}")
        if config.contrastive not in ("moco", "simclr"):
            raise ConfigError("contrastive", "must be 'moco' or 'simclr'")
        if config.mask_fill not in ("zeros", "noise"):
            raise ConfigError("mask_fill", "must be 'zeros' or 'noise'")
        if config.schedule not in ("joint", "two_stage"):
            raise ConfigError("schedule", "must be 'joint' or 'two_stage'")
        if config.schedule == "two_stage" and not 0 < config.stage1_steps < run.train_steps:
            raise ConfigError("stage1_steps", "two_stage needs 0 < stage1_steps < train_steps")
        if config.transformer_dim % config.transformer_heads:
            raise ConfigError("transformer_heads", "must divide transformer_dim")
        check_key_bn_groups(config, run)
        if config.contrastive == "moco" and config.queue_size < run.batch_size:
            raise ConfigError("queue_size", f"must be >= the batch size ({run.batch_size})")
        if not 0.0 < config.mask_ratio < 1.0:
            raise ConfigError("mask_ratio", "must be in (0, 1)")

    def build_for(self, batch):
        """Creates every variable (online nets, EMA copies, queue) from one batch."""
        v = self.sample_volume(batch)
        self.encoder.build(v.shape)
        _, fmap = self.encoder.cnn_features(v)
        self.proj(fmap)
        self.build_momentum_branch(self.encoder.cnn, self.config.momentum)
        self.queue.build(None)
        # all trainable variables up front: a two-stage run updates subsets
        self.finish_build(v)

    def call(self, x, training=False):
        return self.encoder(x, training=training)

    # ------------------------------------------------------------ objective
    def cell_mask(self, volume):
        """Random cell masking of a batch: (token_mask [B,N] 1=masked,
        ids_keep, ids_restore, voxel mask [B,D,H,W,1], grid).

        The noise is drawn statelessly from (seed, step) for the *global*
        batch and this replica takes its rows, so 1 or N replicas mask the
        same samples the same way (argsort of uniform noise, as MAE)."""
        grid = tuple(int(s) // CELL for s in volume.shape[1:4])
        token_mask, ids_keep, ids_restore = global_random_masking(
            volume, grid[0] * grid[1] * grid[2], self.config.mask_ratio, self.seed,
            optimizer_step(self))
        m = tf.reshape(token_mask, (-1,) + grid + (1,))
        for axis in (1, 2, 3):
            m = tf.repeat(m, CELL, axis=axis)
        return token_mask, ids_keep, ids_restore, m, grid

    def masked_input(self, volume, voxel_mask):
        """Masked cells filled with zeros, or (``mask_fill=noise``) uniform
        noise drawn per sample over the global batch (replica-invariant)."""
        if self.config.mask_fill == "noise":
            fill = global_uniform(volume, self.seed + 1, optimizer_step(self), volume.dtype)
        else:
            fill = ops.zeros_like(volume)
        vm = ops.cast(voxel_mask, volume.dtype)
        return volume * (1.0 - vm) + fill * vm

    def recovery_terms(self, v1, training, frozen_cnn=False):
        """(loss, prediction, target, token_mask, masked input) of the transformer branch."""
        token_mask, ids_keep, ids_restore, voxel_mask, grid = self.cell_mask(v1)
        masked = self.masked_input(v1, voxel_mask)
        _, fmap = self.encoder.cnn_features(masked, training=training and not frozen_cnn)
        if frozen_cnn:
            fmap = ops.stop_gradient(fmap)
        tokens, grid = self.encoder.tokens(fmap)
        latent = self.encoder.encode_tokens(tokens, ids_keep, training=training)
        pred = self.encoder.decode_tokens(latent, ids_restore, grid, training=training)
        # the target needs no shuffled groups: with --norm=sync_batch its BatchNorm
        # normalises by the global batch, so it does not depend on the replica count
        features = self.cnn_ema(v1, batch_stats=self.key_bn_groups > 0, synchronized=True)[-1]
        target = losses.per_token_layernorm(ops.stop_gradient(map_to_tokens(features)))
        loss = losses.masked_mse(pred, target, token_mask)
        return loss, pred, target, token_mask, masked

    def _variables_for_stage(self, stage):
        if stage == 1:   # two-stage, first stage: the CNN and its head only
            return self.encoder.cnn.trainable_variables + self.proj.trainable_variables
        if stage == 2:   # two-stage, second stage: the transformer side only
            cnn = {id(v) for v in self.encoder.cnn.trainable_variables}
            return [v for v in self.encoder.trainable_variables if id(v) not in cnn]
        return self.trainable_variables

    def train_step(self, batch):
        v1, v2 = batch["view1"], batch["view2"]
        cfg, stage = self.config, self.stage
        # The momentum CNN gives the recovery targets (and MoCo's keys); MoCo
        # updates it before computing keys. SimCLR needs no key head.
        self.momentum_update(head=cfg.contrastive == "moco")
        zero = ops.zeros(())
        with tf.GradientTape() as tape:
            if stage in (0, 1):
                l_con, logits, q, k = self.contrastive_terms(v1, v2, training=True)
            else:
                l_con, logits, q, k = zero, None, None, None
            if stage in (0, 2):
                l_rec, _, target, _, _ = self.recovery_terms(v1, training=True,
                                                             frozen_cnn=stage == 2)
                # collapse monitor of the recovery targets (token features of every
                # sample): nothing but the contrastive term keeps them apart
                target_std = losses.embedding_std(ops.reshape(target, (-1, target.shape[-1])))
            else:
                l_rec, target_std = zero, zero
            lam_c = cfg.lambda_contrast if stage != 2 else 0.0
            lam_r = cfg.lambda_rec if stage != 1 else 0.0
            total = lam_c * l_con + lam_r * l_rec
            scaled = self.replica_scaled(total)
        self.backprop(tape, scaled, self._variables_for_stage(stage))
        self.enqueue_keys(k)
        if stage == 2:
            self.cnn_ema.update(0.0)  # frozen CNN: the target follows it exactly
        if cfg.schedule == "joint" or stage == 1:
            acc = losses.contrastive_accuracy(logits)
            spread = losses.embedding_std(q)
        else:
            acc, spread = zero, zero
        return self.report(loss=total, loss_contrast=l_con, loss_recover=l_rec,
                           contrast_acc=acc, embedding_std=spread, target_std=target_std)

    # ------------------------------------------------------------ schedule
    def extra_callbacks(self):
        if self.config.schedule != "two_stage":
            return []
        return [_StageSwitch(self.config.stage1_steps)]

    # ------------------------------------------------------------ monitoring
    def summary_images(self, batch):
        """Middle axial slice of the two views, the masked input, and the
        per-token recovery error (nearest-upsampled to the view)."""
        v1, v2 = batch["view1"][:4], batch["view2"][:4]
        _, pred, target, token_mask, masked = self.recovery_terms(v1, training=False)
        err = ops.mean((pred - target) ** 2, axis=-1) * token_mask          # [B, N]
        grid = tuple(int(s) // CELL for s in v1.shape[1:4])
        err = ops.reshape(err, (-1,) + grid + (1,))
        for axis in (1, 2, 3):
            err = ops.repeat(err, CELL, axis=axis)
        err = err / (ops.max(err) + 1e-6)
        z = v1.shape[3] // 2
        return {"view1": v1[:, :, :, z], "view2": v2[:, :, :, z], "masked_input": masked[:, :, :, z],
                "recovery_error": err[:, :, :, z]}

    # ------------------------------------------------------------ transfer
    def export_parts(self):
        """The CNN pyramid (skips, strides 1-16) and the hybrid features
        (CNN pyramid + transformer output at stride 16), for the segmenter."""
        return {"cnn_encoder": CNNPyramid(self.encoder.cnn),
                "hybrid_encoder": HybridFeatures(self.encoder)}

    def transfer_parts(self):
        """HPT and fine-tuning load the hybrid encoder (CNN + transformer);
        its CNN alone is also offered as a UNet3D encoder."""
        return {"hybrid": self.encoder, "unet": self.encoder.cnn}


class _StageSwitch(keras.callbacks.Callback):
    """Two-stage schedule: stage 1 until ``at`` steps, then stage 2; the
    train function is re-traced so each stage's graph only holds its work."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def _sync(self):
        stage = 1 if int(self.model.optimizer.iterations.numpy()) < self.at else 2
        if stage != self.model.stage:
            self.model.stage = stage
            self.model.make_train_function(force=True)

    def on_train_begin(self, logs=None):
        self._sync()

    def on_train_batch_end(self, batch, logs=None):
        self._sync()
