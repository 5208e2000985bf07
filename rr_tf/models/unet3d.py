"""The Models Genesis 3D U-Net (also used by PCRL, PCRLv2 and RepRec's CNN).

Unit = Conv3D 3x3x3 -> norm -> ReLU. Encoder level ``k`` (1-based) is two
units with ``(b * 2**(k-1), b * 2**k)`` channels (``b`` = ``base_width``),
preceded by a 2x max-pool for ``k >= 2``; at ``b = 32`` and 4 levels:
1->32->64, 64->64->128, 128->128->256, 256->256->512 (bottleneck at stride 8).
``extra_stride_stage`` adds one more pool + two units (``extra_channels``
wide, default the bottleneck width) so the last map is at stride 16.

The decoder has one up-block per encoder stage but the last: up-block ``k``
is ``up{k}`` = Conv3DTranspose(k2, s2, channels kept) then ``dec{k}`` = two
units with the channels of encoder stage ``k``, with the stage-``k`` skip
concatenated when ``skips=True``. Head: 1x1x1 conv (``head``) to
``out_channels`` with an optional final activation.

Layer paths (for transfer by name): ``enc1/unit1/conv``, ``enc1/unit1/norm``,
..., ``up3``, ``dec3/unit1/conv``, ..., ``head``.
"""

import keras

from rr_tf.models.layers import (CONV, CONV_TRANSPOSE, NORMS, ConvBlock, MaxPool, register,
                                 with_channels)


def unet3d_channels(base_width=32, levels=4, extra_stride_stage=False, extra_channels=None):
    """Per encoder stage ``(mid, out)`` channels, shallow to deep."""
    b = int(base_width)
    stages = [(b * 2 ** (k - 1), b * 2 ** k) for k in range(1, levels + 1)]
    if extra_stride_stage:
        e = int(extra_channels or stages[-1][1])
        stages.append((e, e))
    return stages


class UNetBase(keras.Model):
    """The Genesis U-Net for any ``rank`` (a class attribute: 3 for
    :class:`UNet3D`, 2 for :class:`rr_tf.models.unet2d.UNet2D`); see UNet3D."""

    rank = 3
    input_layout = "(batch, D, H, W, C)"

    def __init__(self, base_width=32, levels=4, norm="batch", skips=True,
                 extra_stride_stage=False, extra_channels=None, out_channels=1,
                 final_activation=None, encoder_only=False, **kwargs):
        super().__init__(**kwargs)
        if int(levels) < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.base_width = int(base_width)
        self.levels = int(levels)
        self.norm_kind = norm
        self.skips = bool(skips)
        self.extra_stride_stage = bool(extra_stride_stage)
        self.extra_channels = None if extra_channels is None else int(extra_channels)
        self.out_channels = int(out_channels)
        self.final_activation = final_activation
        self.encoder_only = bool(encoder_only)
        dt, r = self.dtype_policy, self.rank

        self.stage_filters = unet3d_channels(base_width, levels, extra_stride_stage,
                                             extra_channels)
        self.encoder_channels = [f[1] for f in self.stage_filters]
        n = len(self.stage_filters)
        self.enc_blocks = [ConvBlock(f, norm=norm, rank=r, name=f"enc{k + 1}", dtype=dt)
                           for k, f in enumerate(self.stage_filters)]
        self.pools = [MaxPool(r, name=f"pool{k + 1}", dtype=dt) for k in range(1, n)]
        self.up_convs, self.dec_blocks, self.head = [], [], None
        if not self.encoder_only:
            for k in range(n - 1, 0, -1):  # 1-based stage index of the skip
                c_in = self.encoder_channels[k]  # channels arriving from below
                c_out = self.encoder_channels[k - 1]
                self.up_convs.append(CONV_TRANSPOSE[r](c_in, 2, strides=2, name=f"up{k}",
                                                       dtype=dt))
                self.dec_blocks.append(ConvBlock((c_out, c_out), norm=norm, rank=r,
                                                 name=f"dec{k}", dtype=dt))
            self.head = CONV[r](self.out_channels, 1, activation=final_activation,
                                name="head", dtype=dt)
        self.decoder_channels = [b.filters[-1] for b in self.dec_blocks]
        self.in_channels = None

    @property
    def encoder_layers(self):
        """Encoder blocks ``enc1, enc2, ...`` (pooling has no weights)."""
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
        """Stride of each pyramid map (in-plane for the 2D net)."""
        return [2 ** k for k in range(self.num_stages)]

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        r = self.rank
        if len(input_shape) != r + 2:
            raise ValueError(f"{type(self).__name__} expects {self.input_layout}, got "
                             f"{input_shape}")
        factor = 2 ** (self.num_stages - 1)
        for s in input_shape[1:r + 1]:
            if s is not None and s % factor:
                raise ValueError(f"spatial size {input_shape[1:r + 1]} must be divisible by "
                                 f"{factor} ({self.num_stages} stages)")
        self.in_channels = None if input_shape[-1] is None else int(input_shape[-1])
        shapes, shape = [], input_shape
        for k, block in enumerate(self.enc_blocks):
            if k:
                shape = (shape[0],) + tuple(None if s is None else s // 2
                                            for s in shape[1:r + 1]) + (shape[-1],)
            block.build(shape)
            shape = with_channels(shape, block.filters[-1])
            shapes.append(shape)
        if not self.encoder_only:
            below = shapes[-1]
            for i, (up, dec) in enumerate(zip(self.up_convs, self.dec_blocks)):
                skip = shapes[-2 - i]
                up.build(below)
                c = below[-1] + (skip[-1] if self.skips else 0)
                dec.build(with_channels(skip, c))
                below = with_channels(skip, dec.filters[-1])
            self.head.build(below)
        self.built = True

    def encode(self, x, training=False):
        """Encoder pyramid: list of stage outputs at strides 1, 2, 4, ..."""
        if not self.built:  # encode() may be the first thing called
            self.build(x.shape)
        pyramid = []
        for k, block in enumerate(self.enc_blocks):
            if k:
                x = self.pools[k - 1](x)
            x = block(x, training=training)
            pyramid.append(x)
        return pyramid

    def decode(self, pyramid, training=False):
        """(decoder stage outputs coarse to fine, head output).

        Only ``pyramid[-1]`` is used when ``skips=False``; the skip maps may be
        modified (mixed, gated) by the caller before decoding.
        """
        if self.encoder_only:
            raise ValueError(f"this {type(self).__name__} was built with encoder_only=True")
        x = pyramid[-1]
        stages = []
        for i, (up, dec) in enumerate(zip(self.up_convs, self.dec_blocks)):
            x = up(x)
            if self.skips:
                x = keras.ops.concatenate([x, pyramid[-2 - i]], axis=-1)
            x = dec(x, training=training)
            stages.append(x)
        return stages, self.head(x)

    def call(self, x, training=False):
        pyramid = self.encode(x, training=training)
        if self.encoder_only:
            return pyramid
        return self.decode(pyramid, training=training)[1]

    def get_config(self):
        config = super().get_config()
        config.update(base_width=self.base_width, levels=self.levels, norm=self.norm_kind,
                      skips=self.skips, extra_stride_stage=self.extra_stride_stage,
                      extra_channels=self.extra_channels, out_channels=self.out_channels,
                      final_activation=_serialize_activation(self.final_activation),
                      encoder_only=self.encoder_only)
        return config


@register
class UNet3D(UNetBase):
    """Configurable Genesis 3D U-Net.

    Args:
        base_width: channels of the first unit (32 in the papers).
        levels: encoder levels (>= 2); the bottleneck is at stride 2**(levels-1).
        norm: "batch" (eps 1e-5, momentum 0.9), "group" (8 groups), "instance"
            or "none".
        skips: concatenate the same-resolution encoder map in each up-block.
        extra_stride_stage: one more pool + two units (stride-16 map at 4 levels).
        extra_channels: width of the extra stage (default: bottleneck width).
        out_channels: channels of the 1x1x1 head.
        final_activation: activation of the head (None = linear).
        encoder_only: build no decoder/head; ``call`` returns the pyramid.

    Methods: ``encode(x)`` -> pyramid (list, strides 1, 2, 4, ...);
    ``decode(pyramid)`` -> (decoder stage outputs coarse to fine, head output);
    ``call(x)`` -> head output (or the pyramid when ``encoder_only``).
    """

    rank = 3

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("name", "unet3d")
        super().__init__(*args, **kwargs)


def _serialize_activation(act):
    if act is None or isinstance(act, (str, dict)):
        return act
    return keras.activations.serialize(act)


def unet3d_param_count(base_width=32, levels=4, norm="batch", skips=True,
                       extra_stride_stage=False, extra_channels=None, in_channels=1,
                       out_channels=1, encoder_only=False, rank=3):
    """Closed-form parameter count of :class:`UNet3D` (``rank=2``: UNet2D)
    (trainable + BN statistics)."""
    norm_per_channel = {"batch": 4, "sync_batch": 4, "group": 2, "instance": 2, "none": 0}[norm]
    kernel, up = 3 ** rank, 2 ** rank

    def unit(cin, cout):
        return kernel * cin * cout + cout + norm_per_channel * cout

    stages = unet3d_channels(base_width, levels, extra_stride_stage, extra_channels)
    total, cin = 0, in_channels
    for mid, out in stages:
        total += unit(cin, mid) + unit(mid, out)
        cin = out
    if encoder_only:
        return total
    outs = [s[1] for s in stages]
    for k in range(len(stages) - 1, 0, -1):
        c_in, c_out = outs[k], outs[k - 1]
        total += up * c_in * c_in + c_in
        total += unit(c_in + (c_out if skips else 0), c_out) + unit(c_out, c_out)
    return total + outs[0] * out_channels + out_channels
