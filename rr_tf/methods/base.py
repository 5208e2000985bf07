"""What every pre-training method shares: hyper-parameter declarations,
metric trackers, loss scaling for tf.distribute, HPT initialisation and the
hooks the training loop and export use."""

import dataclasses

import keras

from rr_tf import optim
from rr_tf.distribute import DistributedFitMixin
from rr_tf.models.layers import NORMS


def param(default, help, choices=None, low=None, high=None):
    """A Config field with what the launcher needs to make a validated flag
    of the same name: ``help``, and ``choices`` or bounds ``low``/``high``
    (inclusive). Tuples are given on the command line as ``a,b,c``."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "low": low, "high": high}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def zero_volumes(crop_size, batch_size, keys):
    """{key: zeros [batch_size, *crop_size, 1] float32}: the volume entries
    of a method's ``example_batch``."""
    import tensorflow as tf

    shape = (batch_size,) + tuple(crop_size) + (1,)
    return {k: tf.zeros(shape) for k in keys}


@dataclasses.dataclass
class CNNConfig:
    """The convolutional network's fields, declared once for every method
    whose network is a U-Net (UNet3D; UNet2D for the sequential multi-task
    method): each method's ``Config`` extends it, so these come first, are
    one flag each and have one help text. A method with another published
    default re-declares the field with :meth:`field` (same help and checks)."""

    base_width: int = param(32, "U-Net base width (channels of the first level).", low=1)
    levels: int = param(4, "U-Net encoder levels: the bottleneck is at stride 2**(levels-1) and "
                        "the decoder has levels - 1 stages (RepRec adds one stride-2 stage).",
                        low=2)
    norm: str = param("batch", "CNN normalisation (sync_batch: statistics over the global batch "
                      "under tf.distribute).", choices=NORMS)

    def unet3d(self, **kwargs):
        """A UNet3D with these ``base_width``, ``levels`` and ``norm``
        (``kwargs``: its other arguments)."""
        from rr_tf.models.unet3d import UNet3D

        return UNet3D(base_width=self.base_width, levels=self.levels, norm=self.norm, **kwargs)

    def check_crop(self, crop_size):
        """ConfigError naming ``crop_size`` unless every axis is a multiple
        of the U-Net's largest stride, 2**(levels-1)."""
        from rr_tf.errors import ConfigError

        factor = 2 ** (self.levels - 1)
        if any(int(c) % factor for c in crop_size):
            raise ConfigError("crop_size", f"must be multiples of {factor} ({self.levels} "
                              f"U-Net levels), got {tuple(crop_size)}")

    @classmethod
    def field(cls, name, default):
        """The field ``name`` as declared here (help, choices, bounds) with
        another default."""
        return dataclasses.field(default=default, metadata=cls.__dataclass_fields__[name].metadata)


class PretrainMethod(DistributedFitMixin, keras.Model):
    """Base class: a keras.Model whose ``train_step`` implements a pretext task.

    Subclasses define:
      - ``Config``: a dataclass of hyper-parameters (``param`` fields; the
        defaults are the published values);
      - ``recipe(config, crop_size)``: the data recipe feeding ``train_step``;
      - ``check_config(config, run)``: raise ConfigError on bad combinations;
      - ``example_batch(crop_size, batch_size)``: a zero batch of the recipe's
        structure; ``sample_volume(batch)``: one [B, D, H, W, 1] tensor of it;
      - ``build_for(batch)``: create every variable from one batch;
      - ``train_step(batch)``: returns ``self.report(...)``;
      - ``summary_images(batch)``: name -> images [N, H, W, C] in [0, 1];
      - ``transfer_parts()``: part name -> layer, what HPT and fine-tuning
        load (names: see ``rr_tf.transfer``);
      - ``export_parts()``: name -> keras model of each exported part.
    """

    metric_names = ("loss",)
    # MICLe: True for methods whose batch is a contrastive pair view1/view2
    supports_micle = False

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self._trackers = {n: keras.metrics.Mean(name=n) for n in self.metric_names}

    @property
    def metrics(self):
        return list(self._trackers.values())

    def report(self, **values):
        """Updates the trackers (mean since the epoch start) and returns
        their results, which Keras logs and TensorBoard records."""
        for name, value in values.items():
            self._trackers[name].update_state(value)
        return self.replica_logs({n: t.result() for n, t in self._trackers.items()})

    @staticmethod
    def replica_scaled(loss):
        """Divides by the number of replicas (:func:`rr_tf.optim.replica_scaled`)."""
        return optim.replica_scaled(loss)

    def backprop(self, tape, loss, variables):
        """Backprop ``loss`` (already replica-scaled) into ``variables``
        (:func:`rr_tf.optim.backprop`: float16 loss scaling)."""
        return optim.backprop(self.optimizer, tape, loss, variables)

    def finish_build(self, volume):
        """The last step of ``build_for``: call the model once (marks it
        built) and build the optimizer over every trainable variable."""
        self(volume)
        self.built = True
        if self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)

    @staticmethod
    def sample_volume(batch):
        """One volume batch [B, D, H, W, 1] of a recipe batch (builds parts)."""
        if isinstance(batch, dict):
            for key in ("view1", "image", "global1", "input"):
                if key in batch:
                    return batch[key]
            return next(iter(batch.values()))
        return batch

    @classmethod
    def pair_recipe(cls, config, crop_size):
        """MICLe (``--pairing=patient``): the two views come from two scans
        of one patient when the manifest links several, else from one scan;
        both are augmented as the method's own pairs are."""
        from rr_tf.data import recipes
        from rr_tf.errors import ConfigError

        if not cls.supports_micle:
            raise ConfigError("pairing", f"{cls.__name__} has no two-view contrastive term, so "
                              "patient pairing (MICLe) does not apply to it")
        return recipes.patient_pair(crop_size, augment=True)

    # ------------------------------------------------------------ HPT
    def momentum_encoders(self):
        """The method's MomentumEncoder attributes (re-synced after HPT)."""
        from rr_tf.models.momentum import MomentumEncoder

        return [v for v in vars(self).values() if isinstance(v, MomentumEncoder)]

    def init_from(self, path):
        """HPT: load every matching variable of the transferable parts from
        a run directory, an export directory or a ``.keras`` file. Heads,
        queues and the optimizer start fresh; momentum copies restart as
        copies of the loaded online networks. Returns the TransferReport."""
        from rr_tf.runs import source_parts
        from rr_tf.transfer import transfer

        src, _ = source_parts(path)
        report = transfer(self.transfer_parts(), src, source=path)
        for ema in self.momentum_encoders():
            ema.update(0.0)
        return report
