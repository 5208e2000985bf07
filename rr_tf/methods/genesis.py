"""Models Genesis (Zhou et al., MICCAI 2019 / MedIA 2021): learn by restoring
corrupted crops, as in ``docs/methods.md``.

1. sample: a 64x64x32 crop in [0, 1] (HU window scaled), randomly flipped;
   that crop is the *target* (recipe :func:`rr_tf.data.recipes.genesis_pair`);
2. corrupt it (the *input*): local pixel shuffling (p 0.5), a non-linear
   Bezier intensity map (p 0.9), then painting (p 0.9): out-painting (0.8)
   or in-painting (0.2) (:func:`rr_tf.data.augment.genesis_corrupt`). The
   flips are applied before corrupting, so input and target share them;
3. a UNet3D *with skips* maps the input back to the target; loss: MSE.

The head ends in a sigmoid by default: Genesis' inputs and targets lie in
[0, 1] and its published U-Net has a sigmoid output (``output_activation=
linear`` is a flag). The whole U-Net (encoder + decoder) is what transfers.

Published optimisation: SGD lr 1.0, momentum 0.9, no weight decay, batch 6,
the learning rate halved on a plateau of the validation loss. rr_tf has no
plateau schedule: configs/genesis.flags uses cosine decay instead.
"""

import dataclasses

import tensorflow as tf
from keras import ops

from rr_tf.data import recipes
from rr_tf.errors import ConfigError
from rr_tf.methods.base import CNNConfig, PretrainMethod, param, zero_volumes
from rr_tf.models.layers import NORMS
from rr_tf.models.parts import UNetFeatures

ACTIVATIONS = ("sigmoid", "linear")


def restoration_unet(config):
    """The restoration U-Net of Genesis (and PCRL): UNet3D with skips, one
    output channel, ``config.output_activation`` at the end."""
    return config.unet3d(skips=True, out_channels=1,
                         final_activation=None if config.output_activation == "linear"
                         else config.output_activation, name="unet")


@dataclasses.dataclass
class Config(CNNConfig):
    """Models Genesis hyper-parameters (defaults: the published ones)."""

    output_activation: str = param("sigmoid", "Activation of the restoration head: sigmoid "
                                   "(targets in [0, 1], as published) or linear.",
                                   choices=ACTIVATIONS)
    flip_p: float = param(0.4, "Probability of flipping a crop along each axis (Genesis: "
                          "input and target alike).", low=0.0, high=1.0)
    shuffle_p: float = param(0.5, "Probability of Genesis local pixel shuffling.",
                             low=0.0, high=1.0)
    nonlinear_p: float = param(0.9, "Probability of the Genesis non-linear (Bezier) "
                               "intensity map.", low=0.0, high=1.0)
    paint_p: float = param(0.9, "Probability of Genesis painting (out- or in-painting).",
                           low=0.0, high=1.0)
    outpaint_p: float = param(0.8, "Share of out-painting among paintings (the rest is "
                              "in-painting).", low=0.0, high=1.0)
    foreground_p: float = param(0.5, "Probability that a crop is centred on a body voxel "
                                "(else uniform).", low=0.0, high=1.0)


def mse(pred, target):
    """Mean squared error in float32 (losses stay float32 under mixed precision)."""
    return ops.mean(ops.square(ops.cast(pred, "float32") - ops.cast(target, "float32")))


class ModelsGenesis(PretrainMethod):
    """Models Genesis: a UNet3D restores Genesis-corrupted crops (MSE)."""

    Config = Config
    # loss: restoration MSE; input_mse: the MSE of the corrupted input itself
    # (what doing nothing scores), to see how much the network restores
    metric_names = ("loss", "input_mse")

    def __init__(self, config, seed=0, **kwargs):
        super().__init__(config, name="genesis", **kwargs)
        self.seed = int(seed)
        self.unet = restoration_unet(config)

    # ------------------------------------------------------------ set-up
    @staticmethod
    def recipe(config, crop_size):
        return recipes.genesis_pair(crop_size, flip_p=config.flip_p, shuffle_p=config.shuffle_p,
                                    nonlinear_p=config.nonlinear_p, paint_p=config.paint_p,
                                    outpaint_p=config.outpaint_p,
                                    foreground_p=config.foreground_p)

    @staticmethod
    def check_config(config, run):
        config.check_crop(run.crop_size)
        if any(c < 10 for c in run.crop_size):
            raise ConfigError("crop_size", "Genesis local shuffling needs crops of at least 10 "
                              f"voxels per axis, got {run.crop_size}")
        if config.output_activation not in ACTIVATIONS:
            raise ConfigError("output_activation", f"must be one of {ACTIVATIONS}")
        if config.norm not in NORMS:
            raise ConfigError("norm", f"must be one of {NORMS}")

    @staticmethod
    def example_batch(crop_size, batch_size=2):
        """A zero batch with the structure ``train_step`` expects (to build)."""
        return zero_volumes(crop_size, batch_size, ("input", "target"))

    def build_for(self, batch):
        v = self.sample_volume(batch)
        self.unet.build(tuple(v.shape))
        self.finish_build(v)

    def call(self, x, training=False):
        """The restoration of a (corrupted) crop."""
        return self.unet(x, training=training)

    # ------------------------------------------------------------ objective
    def restoration_loss(self, batch, training=False):
        """(MSE of the restoration against the target, the restoration)."""
        restored = self.unet(batch["input"], training=training)
        return mse(restored, batch["target"]), restored

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            loss, _ = self.restoration_loss(batch, training=True)
            scaled = self.replica_scaled(loss)
        self.backprop(tape, scaled, self.trainable_variables)
        return self.report(loss=loss, input_mse=mse(batch["input"], batch["target"]))

    # ------------------------------------------------------------ monitoring
    def summary_images(self, batch):
        """Middle axial slice of the corrupted input, the target and the
        restoration."""
        batch = {k: batch[k][:4] for k in ("input", "target")}
        _, restored = self.restoration_loss(batch, training=False)
        z = batch["input"].shape[3] // 2
        return {"corrupted_input": batch["input"][:, :, :, z], "target": batch["target"][:, :, :, z],
                "restoration": ops.cast(restored, "float32")[:, :, :, z]}

    # ------------------------------------------------------------ transfer
    def transfer_parts(self):
        """Encoder and decoder: the whole U-Net transfers."""
        return {"unet": self.unet}

    def export_parts(self):
        """The whole U-Net: encoder pyramid, decoder stages and output."""
        return {"unet": UNetFeatures(self.unet)}
