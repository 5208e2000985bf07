"""MoCo v2 (He et al., CVPR 2020; Chen et al., "Improved Baselines with
Momentum Contrastive Learning", 2020) on the Genesis UNet3D encoder: the
contrastive baseline of the sequential multi-task seed (docs/methods.md).

Per step, for two augmented views of one volume:

1. the momentum (key) encoder follows the online one,
   ``w_k = m * w_k + (1 - m) * w_q`` (m 0.999), *before* the keys are computed;
2. query ``q = head(cnn(view1))``, key ``k = head_k(cnn_k(view2))`` (no gradient);
3. InfoNCE with tau 0.2: the positive ``q . k`` against ``q . queue``
   (16384 earlier keys, 128-d, L2-normalised);
4. gradients update the query encoder and its head only;
5. the keys of every replica are gathered and enqueued (FIFO).

The head is docs/methods.md's projection MLP, Dense-BN-ReLU-Dense with hidden =
the encoder width (512 at base 32); ``proj_bn=False`` gives the MoCo v2
code's Dense-ReLU-Dense. The key encoder uses shuffling BN
(``key_bn_groups``; see :mod:`rr_tf.methods.contrastive`).
Transfer: the UNet3D encoder (part ``unet``).
"""

import dataclasses

import tensorflow as tf

from rr_tf.errors import ConfigError
from rr_tf.methods.base import param
from rr_tf.methods.contrastive import ContrastiveEncoderMethod, MoCoConfig, check_key_bn_groups
from rr_tf.models.momentum import Queue


@dataclasses.dataclass
class Config(MoCoConfig):
    """MoCo v2 hyper-parameters (defaults: docs/methods.md and the MoCo v2 paper)."""

    proj_hidden_dim: int = param(512, "Hidden width of the projection MLP (MoCo v2 / SimCLR: "
                                 "the encoder width, 512 at base 32).", low=1)
    proj_bn: bool = param(True, "BatchNorm in the projection MLP (docs/methods.md's Dense-BN-ReLU-"
                          "Dense; the MoCo v2 code's MLP has none).")


class MoCo(ContrastiveEncoderMethod):
    """MoCo v2: query encoder + head, momentum key encoder + head, queue."""

    Config = Config
    contrastive_mode = "moco"

    def __init__(self, config, seed=0, **kwargs):
        super().__init__(config, seed=seed, name="moco", **kwargs)
        self.queue = Queue(config.queue_size, config.proj_dim, seed=seed, name="queue")

    @staticmethod
    def check_config(config, run):
        ContrastiveEncoderMethod.check_config(config, run)
        check_key_bn_groups(config, run)
        if config.queue_size < run.batch_size:
            raise ConfigError("queue_size", f"must be >= the batch size ({run.batch_size})")

    def build_for(self, batch):
        """Online CNN + head, their momentum copies, and the queue."""
        v = self.build_online(batch)
        self.build_momentum_branch(self.cnn, self.config.momentum)
        self.queue.build(None)
        self.finish_build(v)

    def train_step(self, batch):
        v1, v2 = batch["view1"], batch["view2"]
        self.momentum_update()  # the key encoder moves first, then makes the keys
        with tf.GradientTape() as tape:
            loss, logits, q, k = self.contrastive_terms(v1, v2, training=True)
            scaled = self.replica_scaled(loss)
        self.backprop(tape, scaled, self.trainable_variables)  # query encoder + head only
        self.enqueue_keys(k)
        return self.contrastive_report(loss, logits, q)

