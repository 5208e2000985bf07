"""What every segmenter shares (see :mod:`rr_tf.models.segmenters` for the
models and their common API): the pre-training method -> segmenter kind map,
argument checks, the :class:`_Segmenter` base class and the decoder blocks
(:class:`UpBlock`, :class:`DeconvPath`)."""

import keras
from keras import ops

from rr_tf.errors import ConfigError
from rr_tf.models.layers import NORMS, ConvBlock, ConvUnit, register, with_channels

# Pre-training method -> the segmenter its weights initialise ("slice2d" is
# rr_tf.models.unet2d.SliceSegmenter, the 2D U-Net applied slice by slice).
_KIND_FOR_METHOD = {
    "reprec": "hybrid", "mae": "unetr", "moco": "unet", "simclr": "unet", "genesis": "unet",
    "pcrl": "unet", "pcrlv2": "unet", "pgl": "unet", "multitask": "slice2d",
}
# Methods whose published transfer is the encoder alone although their
# pre-trained network has a decoder: PCRLv2 (non-skip decoder; skips are
# added back for segmentation, docs/methods.md "Transfer"). Genesis and PCRL
# transfer encoder + decoder; MoCo, SimCLR, PGL export an encoder only.
_ENCODER_ONLY_TRANSFER = ("pcrlv2",)


def segmenter_kind_for_method(method_name):
    """``"unet"``, ``"hybrid"``, ``"unetr"`` or ``"slice2d"`` for a pre-training method name."""
    name = str(method_name).lower()
    if name not in _KIND_FOR_METHOD:
        raise ConfigError("method", f"no segmenter for method {method_name!r}; known: "
                          f"{', '.join(sorted(_KIND_FOR_METHOD))}")
    return _KIND_FOR_METHOD[name]


def transfers_decoder(method_name):
    """Whether fine-tuning should load the method's pre-trained decoder
    (``UNetSegmenter.transfer_parts(decoder=...)``)."""
    segmenter_kind_for_method(method_name)  # validates the name
    return str(method_name).lower() not in _ENCODER_ONLY_TRANSFER


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def _check_num_classes(num_classes):
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ConfigError("num_classes", f"must be an int >= 2 (background included, softmax "
                          f"logits), got {num_classes!r}")
    return int(num_classes)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(name, f"must be one of {choices}, got {value!r}")


def _check_positive(name, value):
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ConfigError(name, f"must be a positive int, got {value!r}")
    return int(value)


def _at_stride(shape, stride, channels):
    """Shape of a ``[B, D, H, W, C]`` map at ``stride`` with ``channels``."""
    return ((shape[0],) + tuple(None if s is None else s // stride for s in shape[1:4])
            + (channels,))


def _check_divisible(shape, divisor, what):
    if len(shape) != 5:
        raise ValueError(f"{what} expects (batch, D, H, W, C), got {tuple(shape)}")
    for s in shape[1:4]:
        if s is not None and s % divisor:
            raise ValueError(f"{what}: spatial size {tuple(shape[1:4])} must be a multiple "
                             f"of {divisor}")


class _Segmenter(keras.Model):
    """Shared API. Subclasses set ``num_classes``, ``divisor``, implement
    ``_encoder_layers()`` and ``transfer_parts()``, and call
    ``_record_encoder()`` at the end of ``build``."""

    def _encoder_layers(self):
        raise NotImplementedError

    def _set_transformer_args(self, dim, depth, heads, mlp_ratio, dropout, attention_dropout):
        """Checks and keeps the transformer arguments of a segmenter."""
        self.dim = _check_positive("dim", dim)
        self.depth = _check_positive("depth", depth)
        self.heads = _check_positive("heads", heads)
        if self.dim % self.heads:
            raise ConfigError("heads", f"must divide dim {self.dim}, got {heads}")
        self.mlp_ratio, self.dropout_rate = float(mlp_ratio), float(dropout)
        self.attention_dropout = float(attention_dropout)

    def _set_cnn_args(self, num_classes, base_width, levels, norm):
        """Checks and keeps the U-Net arguments of a CNN-based segmenter."""
        self.num_classes = _check_num_classes(num_classes)
        self.base_width = _check_positive("base_width", base_width)
        self.levels = _check_positive("levels", levels)
        if self.levels < 2:
            raise ConfigError("levels", f"must be >= 2, got {levels}")
        _check_choice("norm", norm, NORMS)
        self.norm_kind = norm

    def _finish_build(self, below):
        """The end of a U-shaped segmenter's ``build``: the head on the last
        decoder output's shape ``below``, the encoder's weights recorded."""
        self.head.build(below)
        self._record_encoder()
        self.built = True

    def _record_encoder(self):
        # Paths of the encoder's trainable-by-design weights (BN statistics
        # excluded), fixed at build time so the answer does not depend on
        # whether the encoder is frozen.
        self._encoder_paths = frozenset(
            v.path for layer in self._encoder_layers() for v in layer.weights if v.trainable)

    def encoder_variables(self):
        """The pre-trained encoder's trainable weights (what "freeze the
        encoder" freezes), in ``model.weights`` order, frozen or not."""
        if not self.built:
            raise ValueError(f"{self.name}: build the model (call it once) first")
        return [v for v in self.weights if v.path in self._encoder_paths]

    def freeze_encoder(self, frozen=True):
        """``trainable = not frozen`` on the encoder layers (BatchNorm there
        then uses its moving statistics). Re-trace the train step after."""
        for layer in self._encoder_layers():
            layer.trainable = not frozen

    @property
    def encoder_frozen(self):
        return not all(layer.trainable for layer in self._encoder_layers())

    def _logits(self, x):
        return ops.cast(x, "float32")


@register
class UpBlock(keras.layers.Layer):
    """Decoder step: ``up`` (Conv3DTranspose k2 s2 to ``filters``), concat the
    same-resolution ``skip``, ``block`` (two conv units of ``filters``)."""

    def __init__(self, filters, norm="batch", **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.norm_kind = norm
        dt = self.dtype_policy
        self.up = keras.layers.Conv3DTranspose(self.filters, 2, strides=2, name="up", dtype=dt)
        self.block = ConvBlock((self.filters, self.filters), norm=norm, name="block", dtype=dt)

    def build(self, input_shape, skip_shape=None):
        input_shape = tuple(input_shape)
        self.up.build(input_shape)
        up_shape = _at_stride(input_shape, 1, self.filters)
        up_shape = up_shape[:1] + tuple(None if s is None else 2 * s
                                        for s in up_shape[1:4]) + up_shape[4:]
        skip_c = 0 if skip_shape is None else skip_shape[-1]
        self.block.build(with_channels(up_shape, self.filters + skip_c))
        self.built = True

    def call(self, x, skip=None, training=False):
        x = self.up(x)
        if skip is not None:
            x = ops.concatenate([x, skip], axis=-1)
        return self.block(x, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, norm=self.norm_kind)
        return config


@register
class DeconvPath(keras.layers.Layer):
    """UNETR skip projection: ``steps`` x (Conv3DTranspose k2 s2 -> conv unit),
    taking a token map at the patch stride to ``stride / 2**steps``."""

    def __init__(self, filters, steps, norm="instance", **kwargs):
        super().__init__(**kwargs)
        self.filters, self.steps, self.norm_kind = int(filters), int(steps), norm
        dt = self.dtype_policy
        self.ups = [keras.layers.Conv3DTranspose(self.filters, 2, strides=2, name=f"up{i + 1}",
                                                 dtype=dt) for i in range(self.steps)]
        self.units = [ConvUnit(self.filters, norm=norm, name=f"unit{i + 1}", dtype=dt)
                      for i in range(self.steps)]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for up, unit in zip(self.ups, self.units):
            up.build(shape)
            shape = shape[:1] + tuple(None if s is None else 2 * s
                                      for s in shape[1:4]) + (self.filters,)
            unit.build(shape)
        self.built = True

    def call(self, x, training=False):
        for up, unit in zip(self.ups, self.units):
            x = unit(up(x), training=training)
        return x

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, steps=self.steps, norm=self.norm_kind)
        return config


# ---------------------------------------------------------------------------
# UNet (Genesis U-Net with skips)
# ---------------------------------------------------------------------------

class _EncoderView:
    """A UNet3D seen as its encoder only, for ``transfer`` (which needs just
    ``name`` and ``weights``): the pre-trained decoder is then reported as
    unused instead of being partly loaded."""

    def __init__(self, unet):
        self.name = unet.name
        self._unet = unet

    @property
    def weights(self):
        return [v for layer in self._unet.encoder_layers for v in layer.weights]
