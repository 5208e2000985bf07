"""A 2D U-Net for axial slices (or short slabs of slices as channels), and
the wrappers that apply it slice by slice to a volume.

Used by the sequential multi-task method (``rr_tf.methods.multitask``) and
by the 2D fine-tuning segmenter. The layout mirrors :class:`UNet3D` in 2D:

Unit = Conv2D 3x3 -> norm -> ReLU. Encoder level ``k`` (1-based) is two units
with ``(b * 2**(k-1), b * 2**k)`` channels (``b`` = ``base_width``), preceded
by a 2x2 max-pool for ``k >= 2``; at ``b = 32`` and 4 levels:
C->32->64, 64->64->128, 128->128->256, 256->256->512 (bottleneck at stride 8).
Up-block ``k`` is ``up{k}`` = Conv2DTranspose(2, stride 2, channels kept)
then ``dec{k}`` = two units with the channels of encoder level ``k``, with the
level-``k`` skip concatenated when ``skips=True``. Head: 1x1 conv (``head``).

The input has ``C = k`` channels: the ``k`` consecutive axial slices of a
slab (``k`` odd, the centre slice is the one the slab stands for; ``k = 1`` is
a plain 2D slice). The channel count is taken from the build shape.

Axis convention (see ``rr_tf.data.preprocess``): stored volumes are in
canonical RAS+ voxel order, so a volume ``[B, D, H, W, 1]`` is indexed
``(x, y, z)`` and axial slices are ``volume[:, :, :, z]``; the in-plane axes
(D, H) = (x, y) are the 2D net's (height, width), and slices run along the
last spatial axis W = z (inferior -> superior).

Layer paths (for transfer by name, below the model's own name):
``enc1/unit1/conv``, ``enc1/unit1/norm``, ..., ``up3``, ``dec3/unit1/conv``,
..., ``head``.
"""

import keras
from keras import ops

from rr_tf.models.segmenter_base import _Segmenter
from rr_tf.models.layers import NORMS, _register, make_norm, with_channels
from rr_tf.models.unet3d import _serialize_activation, unet3d_channels


@_register
class ConvUnit2D(keras.layers.Layer):
    """Conv2D (k x k, 'same', with bias) -> norm -> ReLU."""

    def __init__(self, filters, norm="batch", kernel_size=3, **kwargs):
        super().__init__(**kwargs)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.filters = int(filters)
        self.norm_kind = norm
        self.kernel_size = kernel_size
        self.conv = keras.layers.Conv2D(self.filters, kernel_size, padding="same", name="conv",
                                        dtype=self.dtype_policy)
        self.norm = make_norm(norm, self.filters, name="norm", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.norm.build(with_channels(input_shape, self.filters))
        self.built = True

    def call(self, x, training=False):
        return ops.relu(self.norm(self.conv(x), training=training))

    def compute_output_shape(self, input_shape):
        return with_channels(input_shape, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, norm=self.norm_kind, kernel_size=self.kernel_size)
        return config


@_register
class ConvBlock2D(keras.layers.Layer):
    """A stack of :class:`ConvUnit2D` s (``unit1``, ``unit2``, ...)."""

    def __init__(self, filters, norm="batch", **kwargs):
        super().__init__(**kwargs)
        self.filters = [int(f) for f in filters]
        self.norm_kind = norm
        self.units = [ConvUnit2D(f, norm=norm, name=f"unit{i + 1}", dtype=self.dtype_policy)
                      for i, f in enumerate(self.filters)]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for unit in self.units:
            unit.build(shape)
            shape = with_channels(shape, unit.filters)
        self.built = True

    def call(self, x, training=False):
        for unit in self.units:
            x = unit(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        return with_channels(input_shape, self.filters[-1])

    def get_config(self):
        config = super().get_config()
        config.update(filters=list(self.filters), norm=self.norm_kind)
        return config


@_register
class UNet2D(keras.Model):
    """Configurable 2D U-Net (the Genesis U-Net's plan in 2D).

    Args:
        base_width: channels of the first unit.
        levels: encoder levels (>= 2); the bottleneck is at stride 2**(levels-1).
        norm: "batch" (eps 1e-5, momentum 0.9), "sync_batch", "group" (8
            groups), "instance" or "none".
        skips: concatenate the same-resolution encoder map in each up-block.
        out_channels: channels of the 1x1 head.
        final_activation: activation of the head (None = linear).

    Input ``[B, H, W, C]`` with ``C`` = slices of a slab. Methods:
    ``encode(x)`` -> pyramid (list, strides 1, 2, 4, ...);
    ``decode(pyramid)`` -> (decoder stage outputs coarse to fine, head output);
    ``call(x)`` -> head output.
    """

    def __init__(self, base_width=32, levels=4, norm="batch", skips=True, out_channels=1,
                 final_activation=None, **kwargs):
        kwargs.setdefault("name", "unet2d")
        super().__init__(**kwargs)
        if int(levels) < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.base_width = int(base_width)
        self.levels = int(levels)
        self.norm_kind = norm
        self.skips = bool(skips)
        self.out_channels = int(out_channels)
        self.final_activation = final_activation
        dt = self.dtype_policy

        self.stage_filters = unet3d_channels(base_width, levels)
        self.encoder_channels = [f[1] for f in self.stage_filters]
        n = len(self.stage_filters)
        self.enc_blocks = [ConvBlock2D(f, norm=norm, name=f"enc{k + 1}", dtype=dt)
                           for k, f in enumerate(self.stage_filters)]
        self.pools = [keras.layers.MaxPooling2D(2, name=f"pool{k + 1}", dtype=dt)
                      for k in range(1, n)]
        self.up_convs, self.dec_blocks = [], []
        for k in range(n - 1, 0, -1):  # 1-based level index of the skip
            c_in, c_out = self.encoder_channels[k], self.encoder_channels[k - 1]
            self.up_convs.append(keras.layers.Conv2DTranspose(c_in, 2, strides=2, name=f"up{k}",
                                                              dtype=dt))
            self.dec_blocks.append(ConvBlock2D((c_out, c_out), norm=norm, name=f"dec{k}",
                                               dtype=dt))
        self.head = keras.layers.Conv2D(self.out_channels, 1, activation=final_activation,
                                        name="head", dtype=dt)
        self.decoder_channels = [b.filters[-1] for b in self.dec_blocks]
        self.in_channels = None

    # -- parts ----------------------------------------------------------------
    @property
    def encoder_layers(self):
        return list(self.enc_blocks)

    @property
    def decoder_layers(self):
        """Decoder layers coarse to fine: ``up{k}, dec{k}, ...`` (head excluded)."""
        out = []
        for up, dec in zip(self.up_convs, self.dec_blocks):
            out += [up, dec]
        return out

    @property
    def num_stages(self):
        return len(self.enc_blocks)

    @property
    def strides(self):
        """In-plane stride of each pyramid map."""
        return [2 ** k for k in range(self.num_stages)]

    # -- build ----------------------------------------------------------------
    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 4:
            raise ValueError(f"UNet2D expects (batch, H, W, C), got {input_shape}")
        factor = 2 ** (self.num_stages - 1)
        for s in input_shape[1:3]:
            if s is not None and s % factor:
                raise ValueError(f"spatial size {input_shape[1:3]} must be divisible by "
                                 f"{factor} ({self.num_stages} levels)")
        self.in_channels = None if input_shape[3] is None else int(input_shape[3])
        shapes, shape = [], input_shape
        for k, block in enumerate(self.enc_blocks):
            if k:
                shape = (shape[0],) + tuple(None if s is None else s // 2
                                            for s in shape[1:3]) + (shape[3],)
            block.build(shape)
            shape = with_channels(shape, block.filters[-1])
            shapes.append(shape)
        below = shapes[-1]
        for i, (up, dec) in enumerate(zip(self.up_convs, self.dec_blocks)):
            skip = shapes[-2 - i]
            up.build(below)
            c = below[-1] + (skip[-1] if self.skips else 0)
            dec.build(with_channels(skip, c))
            below = with_channels(skip, dec.filters[-1])
        self.head.build(below)
        self.built = True

    # -- forward ----------------------------------------------------------------
    def encode(self, x, training=False):
        """Encoder pyramid: list of level outputs at strides 1, 2, 4, ..."""
        if not self.built:
            self.build(x.shape)
        pyramid = []
        for k, block in enumerate(self.enc_blocks):
            if k:
                x = self.pools[k - 1](x)
            x = block(x, training=training)
            pyramid.append(x)
        return pyramid

    def decode(self, pyramid, training=False):
        """(decoder stage outputs coarse to fine, head output); only
        ``pyramid[-1]`` is used when ``skips=False``."""
        x = pyramid[-1]
        stages = []
        for i, (up, dec) in enumerate(zip(self.up_convs, self.dec_blocks)):
            x = up(x)
            if self.skips:
                x = ops.concatenate([x, pyramid[-2 - i]], axis=-1)
            x = dec(x, training=training)
            stages.append(x)
        return stages, self.head(x)

    def call(self, x, training=False):
        return self.decode(self.encode(x, training=training), training=training)[1]

    def get_config(self):
        config = super().get_config()
        config.update(base_width=self.base_width, levels=self.levels, norm=self.norm_kind,
                      skips=self.skips, out_channels=self.out_channels,
                      final_activation=_serialize_activation(self.final_activation))
        return config


def unet2d_param_count(base_width=32, levels=4, norm="batch", skips=True, in_channels=1,
                       out_channels=1):
    """Closed-form parameter count of :class:`UNet2D` (trainable + BN statistics)."""
    norm_per_channel = {"batch": 4, "sync_batch": 4, "group": 2, "instance": 2, "none": 0}[norm]

    def unit(cin, cout):
        return 9 * cin * cout + cout + norm_per_channel * cout

    stages = unet3d_channels(base_width, levels)
    total, cin = 0, in_channels
    for mid, out in stages:
        total += unit(cin, mid) + unit(mid, out)
        cin = out
    outs = [s[1] for s in stages]
    for k in range(len(stages) - 1, 0, -1):
        c_in, c_out = outs[k], outs[k - 1]
        total += 4 * c_in * c_in + c_in
        total += unit(c_in + (c_out if skips else 0), c_out) + unit(c_out, c_out)
    return total + outs[0] * out_channels + out_channels


# ---------------------------------------------------------------------------
# Slice-by-slice application to volumes


def volume_to_slabs(volume, slab_size):
    """``[B, D, H, W, 1]`` -> ``[B * W, D, H, k]``: for every axial slice
    ``z`` (row ``b * W + z``), the slab of slices ``z - k//2 .. z + k//2`` as
    channels; indices beyond the volume repeat the first / last slice (edge
    padding). Works with unknown D, H, W."""
    k = int(slab_size)
    r = k // 2
    x = volume[..., 0]
    shape = ops.shape(x)
    b, d, h, w = shape[0], shape[1], shape[2], shape[3]
    idx = ops.arange(w, dtype="int32")[:, None] + ops.arange(-r, r + 1, dtype="int32")[None, :]
    idx = ops.clip(idx, 0, ops.cast(w, "int32") - 1)                         # [W, k]
    slabs = ops.take(x, ops.reshape(idx, (-1,)), axis=3)                      # [B, D, H, W*k]
    slabs = ops.reshape(slabs, (b, d, h, w, k))
    slabs = ops.transpose(slabs, (0, 3, 1, 2, 4))                            # [B, W, D, H, k]
    return ops.reshape(slabs, (b * w, d, h, k))


def slabs_to_volume(maps, batch, depth):
    """``[B * W, d, h, C]`` (per-slice maps, ``W = depth``) -> ``[B, d, h, W, C]``."""
    shape = ops.shape(maps)
    y = ops.reshape(maps, (batch, depth, shape[1], shape[2], shape[3]))
    return ops.transpose(y, (0, 2, 3, 1, 4))


def _unet_from(unet):
    return unet if isinstance(unet, keras.Layer) else keras.saving.deserialize_keras_object(unet)


@_register
class SliceFeatures(keras.Model):
    """A pre-trained :class:`UNet2D` applied slice by slice to a volume: the
    export wrapper of the sequential multi-task method.

    ``call(volume [B, D, H, W, 1])`` -> dict of maps stacked along the slice
    axis W (never downsampled): ``stride_1`` .. ``stride_{2**(L-1)}`` (the
    encoder pyramid, in-plane stride s: ``[B, D/s, H/s, W, C_s]``) and
    ``decoder_stride_1`` (the last decoder stage, ``[B, D, H, W, b]``).
    D and H must be multiples of the bottleneck stride.
    """

    def __init__(self, unet, slab_size=1, **kwargs):
        kwargs.setdefault("name", "slice_features")
        super().__init__(**kwargs)
        self.unet = _unet_from(unet)
        self.slab_size = int(slab_size)

    def call(self, x, training=False):
        shape = ops.shape(x)
        slabs = volume_to_slabs(x, self.slab_size)
        pyramid = self.unet.encode(slabs, training=training)
        stages, _ = self.unet.decode(pyramid, training=training)
        out = {f"stride_{s}": slabs_to_volume(f, shape[0], shape[3])
               for s, f in zip(self.unet.strides, pyramid)}
        out["decoder_stride_1"] = slabs_to_volume(stages[-1], shape[0], shape[3])
        return out

    def transfer_parts(self):
        return {"unet2d": self.unet}

    def get_config(self):
        config = super().get_config()
        config.update(unet=keras.saving.serialize_keras_object(self.unet),
                      slab_size=self.slab_size)
        return config


@_register
class SliceSegmenter(_Segmenter):
    """2D segmenter for volumes: a :class:`UNet2D` (``unet2d``, head =
    ``num_classes`` logits) applied to every axial slice of a volume, with
    the slab of ``slab_size`` neighbouring slices as channels (edge-padded
    at the volume's ends).

    ``call(volume [B, D, H, W, 1])`` -> logits ``[B, D, H, W, num_classes]``;
    the logits of slice ``z`` depend only on slices ``z - k//2 .. z + k//2``
    (in inference mode; in training mode BatchNorm statistics are taken over
    all slices of the batch, as for any 2D network). All ``B * W`` slices go
    through the 2D net as one batch. ``transfer_parts()`` -> ``{"unet2d":
    ...}``: pre-trained weights load into everything but the head.
    """

    def __init__(self, num_classes, slab_size=1, base_width=32, levels=4, norm="batch",
                 skips=True, **kwargs):
        kwargs.setdefault("name", "slice_segmenter")
        super().__init__(**kwargs)
        if int(slab_size) < 1 or int(slab_size) % 2 == 0:
            raise ValueError(f"slab_size must be odd and >= 1, got {slab_size}")
        self.num_classes = int(num_classes)
        self.slab_size = int(slab_size)
        self.divisor = 2 ** (int(levels) - 1)  # in-plane; any number of slices
        self.unet = UNet2D(base_width=base_width, levels=levels, norm=norm, skips=skips,
                           out_channels=self.num_classes, name="unet2d", dtype=self.dtype_policy)

    def _encoder_layers(self):
        return self.unet.encoder_layers

    def build(self, input_shape):
        self.unet.build((None, input_shape[1], input_shape[2], self.slab_size))
        self.built = True
        self._record_encoder()

    def call(self, x, training=False):
        shape = ops.shape(x)
        logits = self.unet(volume_to_slabs(x, self.slab_size), training=training)
        return self._logits(slabs_to_volume(logits, shape[0], shape[3]))

    def transfer_parts(self):
        return {"unet2d": self.unet}

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, slab_size=self.slab_size,
                      base_width=self.unet.base_width, levels=self.unet.levels,
                      norm=self.unet.norm_kind, skips=self.unet.skips)
        return config


__all__ = ["ConvUnit2D", "ConvBlock2D", "UNet2D", "unet2d_param_count", "volume_to_slabs",
           "slabs_to_volume", "SliceFeatures", "SliceSegmenter"]
