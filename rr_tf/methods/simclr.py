"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020) on the Genesis UNet3D encoder.

Per step, for a global batch of ``N`` volumes, each seen as two augmented
views:

1. both views go through the same online encoder and projection head
   (Dense-BN-ReLU-Dense), ``z = head(cnn(view))``, as one batch of 2N (as
   the SimCLR code: BatchNorm statistics over all views);
2. NT-Xent with tau 0.1: each of the ``2N`` views has its pair as positive
   and the other ``2N - 2`` views of the *global* batch as negatives; under
   tf.distribute the projections are gathered from every replica (gradients
   flow back through the gather) and each replica scores its own anchors;
3. no momentum encoder, no queue.

The paper's "global BN" (statistics over all devices, so a sample's
positive cannot be found through batch statistics of one device) is the
default ``norm=sync_batch``; the head's BN is synchronised too.
Transfer: the UNet3D encoder (part ``unet``).
"""

import dataclasses

import tensorflow as tf

from rr_tf.errors import ConfigError
from rr_tf.methods.base import CNNConfig, param
from rr_tf.methods.contrastive import SIMCLR_TEMPERATURE, ContrastiveEncoderMethod


@dataclasses.dataclass
class Config(CNNConfig):
    """SimCLR hyper-parameters (defaults: docs/methods.md and the SimCLR paper)."""

    norm: str = CNNConfig.field("norm", "sync_batch")  # SimCLR's global BatchNorm
    proj_dim: int = param(128, "Contrastive embedding size.", low=1)
    proj_hidden_dim: int = param(512, "Hidden width of the projection MLP (the encoder width).",
                                 low=1)
    proj_bn: bool = param(True, "BatchNorm in the projection MLP.")
    temperature: float = param(SIMCLR_TEMPERATURE, "NT-Xent temperature.", low=1e-4)


class SimCLR(ContrastiveEncoderMethod):
    """SimCLR: one encoder + head, NT-Xent over the global batch."""

    Config = Config
    contrastive_mode = "simclr"

    def __init__(self, config, seed=0, **kwargs):
        super().__init__(config, seed=seed, name="simclr", **kwargs)

    @staticmethod
    def check_config(config, run):
        ContrastiveEncoderMethod.check_config(config, run)
        if run.batch_size < 2:
            raise ConfigError("batch_size", "SimCLR needs >= 2 volumes per batch (negatives)")

    def build_for(self, batch):
        """Online CNN + head (no momentum copy, no queue)."""
        self.finish_build(self.build_online(batch))

    def train_step(self, batch):
        v1, v2 = batch["view1"], batch["view2"]
        with tf.GradientTape() as tape:
            loss, logits, z1, _ = self.contrastive_terms(v1, v2, training=True)
            scaled = self.replica_scaled(loss)
        self.backprop(tape, scaled, self.trainable_variables)
        return self.contrastive_report(loss, logits, z1)
