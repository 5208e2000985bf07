"""MAE-3D: masked autoencoding of 3D CT patches (He et al., "Masked
Autoencoders Are Scalable Vision Learners", CVPR 2022, in 3D), the
generative baseline named by RepRec (docs/methods.md, "MAE-3D").

1. ``patchify``: the crop is cut into non-overlapping 16^3 patches, embedded
   by a linear projection (ViT3D's Conv3D, kernel = stride = patch) plus a
   fixed 3D sin-cos position embedding;
2. ``random_masking``: 75 % of the patches of every sample are dropped
   (argsort of uniform noise, exactly ``N - round(N * 0.25)`` per sample;
   drawn statelessly from (seed, step) over the *global* batch, so 1 or N
   replicas mask alike);
3. ``forward_encoder``: the ViT encodes the visible tokens only, so nothing
   of a masked patch reaches it;
4. ``forward_decoder``: a light transformer (paper setting 8 blocks x 384)
   gets the visible latents, a learned mask token at every masked position
   and the position embedding, and predicts every patch's voxels;
5. ``forward_loss``: the target is each patch's voxels normalised by the
   patch's own mean and std (``norm_pix_loss``); MSE on masked patches only.

Config names: the ViT is ``transformer_dim`` / ``transformer_depth`` /
``transformer_heads`` (the names RepRec uses for its transformer, default
ViT-B: 768 / 12 / 12 as UNETR), ``patch_size``, and ``decoder_dim`` /
``decoder_depth`` / ``decoder_heads`` for the decoder.

Transfer: the ViT3D encoder (part ``vit``). Export: ``vit_encoder`` =
:class:`rr_tf.models.parts.ViTFeatures`, the hidden states of a few blocks
(e.g. 3, 6, 9 of 12) and the final output laid on the patch grid, what a
UNETR-style segmenter takes.
"""

import dataclasses

import tensorflow as tf
from keras import ops

from rr_tf import losses
from rr_tf.data import recipes
from rr_tf.data.augment import random_flip
from rr_tf.errors import ConfigError
from rr_tf.methods.base import PretrainMethod, param, zero_volumes
from rr_tf.methods.masking import global_random_masking
from rr_tf.optim import optimizer_step
from rr_tf.models.parts import ViTFeatures
from rr_tf.models.vit3d import (MaskedTokenDecoder, ViT3D, num_visible,
                                patchify, unpatchify)

MASK_GREY = 0.5  # what the "masked_input" image shows in place of a masked patch


@dataclasses.dataclass
class Config:
    """MAE-3D hyper-parameters (defaults: docs/methods.md, MAE and UNETR's ViT-B)."""

    patch_size: int = param(16, "Cubic patch (token) size in voxels.", low=2)
    transformer_dim: int = param(768, "ViT width (ViT-B: 768).", low=8)
    transformer_depth: int = param(12, "ViT blocks (ViT-B: 12).", low=1)
    transformer_heads: int = param(12, "ViT attention heads (divides the width).", low=1)
    decoder_dim: int = param(384, "Width of the MAE decoder (paper setting 384).", low=8)
    decoder_depth: int = param(8, "Blocks of the MAE decoder (paper setting 8).", low=1)
    decoder_heads: int = param(12, "Attention heads of the MAE decoder (divides its width).",
                               low=1)
    mask_ratio: float = param(0.75, "Fraction of patches masked.", low=0.0, high=0.95)
    norm_pix_loss: bool = param(True, "Predict each patch normalised by its own mean and std "
                                "(MAE's norm_pix_loss), else raw voxels.")
    foreground_p: float = param(0.5, "Probability that a crop is centred on a body voxel "
                                "(else uniform).", low=0.0, high=1.0)
    flip_p: float = param(0.5, "Probability of flipping the crop along each axis (0 = no "
                          "augmentation; MAE uses flips only).", low=0.0, high=1.0)


def masked_crop(crop_size, foreground_p=0.5, flip_p=0.5):
    """The MAE-3D recipe: one (foreground-biased) random crop per call,
    each axis flipped with probability ``flip_p``; ``{"image": int16 HU
    crop, "box": its box}`` (the stream scales the batch to network units)."""
    crop = recipes.random_crop(crop_size, foreground_p=foreground_p)

    def fn(image, seed, to_unit):
        s_crop, s_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        out = crop(image, s_crop, to_unit)
        view = out["view"]
        if flip_p > 0:
            view, _ = random_flip(view, s_flip, p=flip_p)
        return {"image": view, "box": out["box"]}

    return fn


class MAE(PretrainMethod):
    """MAE-3D: ViT3D encoder on visible patches + light masked-token decoder."""

    Config = Config
    metric_names = ("loss", "embedding_std")

    def __init__(self, config, seed=0, **kwargs):
        super().__init__(config, name="mae", **kwargs)
        self.seed = int(seed)
        p = config.patch_size
        self.vit = ViT3D(patch_size=p, dim=config.transformer_dim,
                         depth=config.transformer_depth, heads=config.transformer_heads,
                         name="vit")
        self.decoder = MaskedTokenDecoder(config.decoder_dim, config.decoder_depth,
                                          config.decoder_heads, out_dim=p ** 3, name="decoder")

    # ------------------------------------------------------------ set-up
    @staticmethod
    def recipe(config, crop_size):
        return masked_crop(crop_size, config.foreground_p, config.flip_p)

    @staticmethod
    def check_config(config, run):
        p = config.patch_size
        if any(c % p for c in run.crop_size):
            raise ConfigError("crop_size", f"MAE needs multiples of patch_size={p}, "
                              f"got {run.crop_size}")
        if config.transformer_dim % config.transformer_heads:
            raise ConfigError("transformer_heads", "must divide transformer_dim")
        if config.decoder_dim % config.decoder_heads:
            raise ConfigError("decoder_heads", "must divide decoder_dim")
        n = 1
        for c in run.crop_size:
            n *= c // p
        keep = num_visible(n, config.mask_ratio)
        if not 0.0 < config.mask_ratio < 1.0 or keep >= n:
            raise ConfigError("mask_ratio", f"must mask at least one of the {n} patches and "
                              f"keep one (got {config.mask_ratio}: {n - keep} masked)")

    @staticmethod
    def example_batch(crop_size, batch_size=2):
        return zero_volumes(crop_size, batch_size, ("image",))

    def build_for(self, batch):
        """Creates the ViT and decoder variables from one batch."""
        v = self.sample_volume(batch)
        self.vit.build(v.shape)
        tokens, grid = self.vit.embed(v)
        self.decoder(self.vit.encode_tokens(tokens), None, grid=grid)
        self.finish_build(v)

    def call(self, x, training=False):
        """Unmasked encoding: tokens ``[B, N, transformer_dim]``."""
        return self.vit(x, training=training)

    # ------------------------------------------------------------ objective
    def random_masking(self, volume):
        """``(token_mask [B, N] 1 = masked, ids_keep, ids_restore, grid)``:
        MAE masking drawn over the global batch from (seed, step)."""
        grid = self.vit.grid(volume.shape[1:4])
        n = grid[0] * grid[1] * grid[2]
        token_mask, ids_keep, ids_restore = global_random_masking(
            volume, n, self.config.mask_ratio, self.seed, optimizer_step(self))
        return token_mask, ids_keep, ids_restore, grid

    def patch_tokens(self, volume):
        """ViT3D's patch embedding + position embedding (``vit.embed``)."""
        return self.vit.embed(volume)[0]

    def forward_encoder(self, volume, ids_keep, training=False):
        """Latents of the visible patches only ``[B, K, dim]``: masked
        patches are dropped before the first block."""
        return self.vit.encode_tokens(self.patch_tokens(volume), ids_keep, training=training)

    def forward_decoder(self, latent, ids_restore, grid, training=False):
        """Predicted voxels of every patch ``[B, N, p^3]``."""
        return self.decoder(latent, ids_restore, grid=grid, training=training)

    def targets(self, volume):
        """Per-patch voxels ``[B, N, p^3]``, normalised per patch (mean 0,
        std 1 over its voxels; eps 1e-6) when ``norm_pix_loss``."""
        patches = patchify(ops.cast(volume, "float32"), self.config.patch_size)
        return losses.per_token_layernorm(patches) if self.config.norm_pix_loss else patches

    def forward_loss(self, volume, pred, token_mask):
        """MSE between prediction and target on the masked patches only."""
        return losses.masked_mse(pred, self.targets(volume), token_mask)

    def forward(self, volume, training=False):
        """``(loss, prediction, token_mask, latent)`` of one batch."""
        token_mask, ids_keep, ids_restore, grid = self.random_masking(volume)
        latent = self.forward_encoder(volume, ids_keep, training=training)
        pred = self.forward_decoder(latent, ids_restore, grid, training=training)
        return self.forward_loss(volume, pred, token_mask), pred, token_mask, latent

    def train_step(self, batch):
        volume = self.sample_volume(batch)
        with tf.GradientTape() as tape:
            loss, _, _, latent = self.forward(volume, training=True)
            scaled = self.replica_scaled(loss)
        self.backprop(tape, scaled, self.trainable_variables)
        return self.report(loss=loss, embedding_std=losses.embedding_std(ops.mean(latent, axis=1)))

    # ------------------------------------------------------------ monitoring
    def reconstruct(self, volume):
        """``(masked input, reconstruction)`` volumes as in the MAE figures:
        masked patches shown grey in the input; the reconstruction has the
        input's visible patches and the predicted masked ones (de-normalised
        with the true patch mean and std when ``norm_pix_loss``)."""
        p = self.config.patch_size
        _, pred, token_mask, _ = self.forward(volume, training=False)
        raw = patchify(ops.cast(volume, "float32"), p)
        pred = ops.cast(pred, "float32")
        if self.config.norm_pix_loss:
            mean = ops.mean(raw, axis=-1, keepdims=True)
            var = ops.mean(ops.square(raw - mean), axis=-1, keepdims=True)
            pred = pred * ops.sqrt(var + 1e-6) + mean
        m = token_mask[:, :, None]
        grid = self.vit.grid(volume.shape[1:4])
        masked = unpatchify(raw * (1.0 - m) + MASK_GREY * m, p, grid)
        recon = unpatchify(raw * (1.0 - m) + pred * m, p, grid)
        return masked, recon

    def summary_images(self, batch):
        """Middle axial slice of the input, the masked input and the
        reconstruction."""
        v = self.sample_volume(batch)[:4]
        masked, recon = self.reconstruct(v)
        z = v.shape[3] // 2
        return {"input": v[:, :, :, z], "masked_input": masked[:, :, :, z],
                "reconstruction": ops.clip(recon[:, :, :, z], 0.0, 1.0)}

    # ------------------------------------------------------------ transfer
    def transfer_parts(self):
        """HPT and fine-tuning load the ViT encoder."""
        return {"vit": self.vit}

    def export_parts(self):
        """The ViT as named token feature maps on the patch grid."""
        return {"vit_encoder": ViTFeatures(self.vit)}
