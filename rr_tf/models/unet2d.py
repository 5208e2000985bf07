"""A 2D U-Net for axial slices (or short slabs of slices as channels), and
the wrappers that apply it slice by slice to a volume.

Used by the sequential multi-task method (``rr_tf.methods.multitask``) and
by the 2D fine-tuning segmenter. The layout mirrors :class:`UNet3D` in 2D:

Unit = Conv2D 3x3 -> norm -> ReLU (:class:`rr_tf.models.layers.ConvUnit`
with ``rank=2``). Encoder level ``k`` (1-based) is two units
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
from rr_tf.models.layers import register
from rr_tf.models.unet3d import UNetBase, unet3d_param_count


@register
class UNet2D(UNetBase):
    """Configurable 2D U-Net (the Genesis U-Net's plan in 2D; the layers
    are :class:`UNetBase`'s with ``rank = 2``).

    Args:
        base_width: channels of the first unit.
        levels: encoder levels (>= 2); the bottleneck is at stride 2**(levels-1).
        norm: "batch" (eps 1e-5, momentum 0.9), "sync_batch", "group" (8
            groups), "instance" or "none".
        skips: concatenate the same-resolution encoder map in each up-block.
        out_channels: channels of the 1x1 head.
        final_activation: activation of the head (None = linear).

    Input ``[B, H, W, C]`` with ``C`` = slices of a slab (``in_channels``
    after build). Methods: ``encode(x)`` -> pyramid (list, strides 1, 2, 4,
    ...); ``decode(pyramid)`` -> (decoder stage outputs coarse to fine, head
    output); ``call(x)`` -> head output.
    """

    rank = 2
    input_layout = "(batch, H, W, C)"

    def __init__(self, base_width=32, levels=4, norm="batch", skips=True, out_channels=1,
                 final_activation=None, **kwargs):
        kwargs.setdefault("name", "unet2d")
        super().__init__(base_width=base_width, levels=levels, norm=norm, skips=skips,
                         out_channels=out_channels, final_activation=final_activation, **kwargs)

    def get_config(self):
        config = super().get_config()
        for key in ("extra_stride_stage", "extra_channels", "encoder_only"):
            config.pop(key)
        return config


def unet2d_param_count(base_width=32, levels=4, norm="batch", skips=True, in_channels=1,
                       out_channels=1):
    """Closed-form parameter count of :class:`UNet2D` (trainable + BN statistics)."""
    return unet3d_param_count(base_width, levels, norm, skips, in_channels=in_channels,
                              out_channels=out_channels, rank=2)


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


@register
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


@register
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


__all__ = ["UNet2D", "unet2d_param_count", "volume_to_slabs",
           "slabs_to_volume", "SliceFeatures", "SliceSegmenter"]
