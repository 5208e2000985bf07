"""Segmentation models for fine-tuning, one per kind of pre-trained encoder.

    unet    UNetSegmenter: the Genesis UNet3D with skips and a ``num_classes``
            head (MoCo, SimCLR, PGL: encoder; Genesis, PCRL: encoder + decoder;
            PCRLv2: encoder, skips added back; RepRec's CNN: enc1..enc4).
    hybrid  HybridSegmenter: RepRec's HybridEncoder; CNN pyramid maps (strides
            1-8) are the skips, the transformer output at stride 16 (all
            tokens, no masking) is the bottleneck; TransUNet/UNETR-style
            U-shaped decoder.
    unetr   UNETRSegmenter: ViT3D encoder (MAE) with the UNETR decoder.
    slice2d SliceSegmenter (rr_tf.models.unet2d): the sequential multi-task
            2D U-Net applied slice by slice (slabs of ``slab_size`` slices).

:func:`build_segmenter` is the one factory (fine-tuning and the tests use
it); :func:`kind_for_parts` and :func:`architecture_from` read the kind and
the constructor arguments from what a pre-trained source declares about its
parts (:func:`rr_tf.runs.source_parts`), so keys and shapes match.

Common API (the fine-tuning engine and sliding-window inference rely on it):

    logits = model(x, training=...)   # [B, D, H, W, 1] -> [B, D, H, W, num_classes], float32
    model.num_classes, model.divisor  # spatial sizes must be multiples of divisor
    model.transfer_parts()            # {part name: layer}, see rr_tf/transfer.py
    model.encoder_variables()         # what "freeze the encoder" freezes (trainable ones)
    model.freeze_encoder(True/False)  # trainable flag of the encoder layers

Freezing: ``freeze_encoder(True)`` sets ``trainable=False`` on the encoder
layers, the standard Keras recipe: their weights leave
``model.trainable_variables`` and their BatchNorm layers run on the moving
statistics. Rebuild the optimizer / re-trace the train function after a
change. A gradient filter works too: train
``[v for v in model.trainable_variables if id(v) not in {id(e) for e in
model.encoder_variables()}]`` (BatchNorm statistics then keep updating).

Logits are computed in the layers' compute dtype (mixed precision) and cast
to float32 at the end. The number of classes includes the background
(softmax logits), so ``num_classes >= 2``; this also guarantees that a
pre-trained 1-channel head (Genesis, PCRL) is a shape mismatch, never loaded.
"""

import inspect

import keras

from rr_tf.errors import ConfigError
from rr_tf.models.hybrid import HybridEncoder
from rr_tf.models.layers import NORMS, ConvBlock, register, as_triple
# the method -> kind map is part of this module's API (re-exported)
from rr_tf.models.segmenter_base import (DeconvPath, UpBlock,  # noqa: F401
                                         _at_stride, _check_choice, _check_divisible,
                                         _check_num_classes, _check_positive, _EncoderView,
                                         _Segmenter, segmenter_kind_for_method, transfers_decoder)
from rr_tf.models.unet3d import UNet3D
from rr_tf.models.vit3d import ViT3D, tokens_to_map

@register
class UNetSegmenter(_Segmenter):
    """Genesis UNet3D (``unet``, skips on) whose 1x1x1 head gives ``num_classes``
    logits. Layer paths below ``unet`` are those of a pre-training UNet3D
    (``enc1/unit1/conv/kernel``, ``up3``, ``dec3/...``, ``head``), so every
    pre-trained UNet3D loads by key: an encoder-only one fills ``enc*``; a
    skip U-Net (Genesis, PCRL) fills ``enc*``, ``up*`` and ``dec*`` while its
    1-channel ``head`` is a shape mismatch; a non-skip U-Net (PCRLv2) differs
    in the first unit after each concatenation; RepRec's CNN has one more
    stage (``enc5``, unused).

    Args: ``num_classes`` (>= 2), ``base_width``, ``levels``, ``norm`` as UNet3D;
    ``deep_supervision``: extra 1x1x1 heads ``ds_head1``, ``ds_head2``, ...
    on the decoder outputs at strides 2, 4, ... (nnU-Net's deep supervision;
    0 to ``levels - 2``). They only feed the training loss
    (:meth:`deep_outputs`); ``call``, inference and the export use the main
    head alone.
    """

    def __init__(self, num_classes, base_width=32, levels=4, norm="batch", deep_supervision=0,
                 **kwargs):
        kwargs.setdefault("name", "unet_segmenter")
        super().__init__(**kwargs)
        self._set_cnn_args(num_classes, base_width, levels, norm)
        ds = int(deep_supervision)
        if not 0 <= ds <= self.levels - 2:
            raise ConfigError("deep_supervision", f"must be in [0, {self.levels - 2}] for a U-Net "
                              f"of {self.levels} levels (heads at strides 2..."
                              f"{2 ** (self.levels - 2)}), got {deep_supervision}")
        self.deep_supervision = ds
        self.divisor = 2 ** (self.levels - 1)
        self.unet = UNet3D(base_width=self.base_width, levels=self.levels, norm=norm, skips=True,
                           out_channels=self.num_classes, name="unet3d", dtype=self.dtype_policy)
        self.ds_heads = [keras.layers.Conv3D(self.num_classes, 1, name=f"ds_head{k}",
                                             dtype=self.dtype_policy) for k in range(1, ds + 1)]

    def _encoder_layers(self):
        return self.unet.encoder_layers

    def build(self, input_shape):
        _check_divisible(input_shape, self.divisor, self.name)
        self.unet.build(input_shape)
        for k, head in enumerate(self.ds_heads, 1):
            # the decoder output at stride 2**k has the channels of encoder stage k + 1
            head.build((None,) * 4 + (self.unet.decoder_channels[-1 - k],))
        self._record_encoder()
        self.built = True

    def call(self, x, training=False):
        return self._logits(self.unet(x, training=training))

    def deep_outputs(self, x, training=False):
        """``[logits at stride 1, 2, 4, ...]``: the main head's (what ``call``
        returns) then one per deep-supervision head, float32."""
        if not self.built:
            self.build(tuple(x.shape))
        stages, out = self.unet.decode(self.unet.encode(x, training=training), training=training)
        return [self._logits(out)] + [self._logits(head(stages[-1 - k]))
                                      for k, head in enumerate(self.ds_heads, 1)]

    def transfer_parts(self, decoder=True):
        """``{"unet": UNet3D}``; with ``decoder=False`` only its encoder is
        offered (PCRLv2, whose published transfer is the encoder alone: its
        non-skip decoder's ``up*`` and second units would otherwise match)."""
        return {"unet": self.unet if decoder else _EncoderView(self.unet)}

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, base_width=self.base_width,
                      levels=self.levels, norm=self.norm_kind,
                      deep_supervision=self.deep_supervision)
        return config


# ---------------------------------------------------------------------------
# Hybrid (RepRec)
# ---------------------------------------------------------------------------

@register
class SegmentationHybridEncoder(HybridEncoder):
    """HybridEncoder whose feature-recovery decoder is never built (no
    weights): segmentation uses the CNN and the transformer only. Variable
    keys of ``cnn``, ``proj`` and ``transformer`` are those of HybridEncoder,
    so a RepRec checkpoint loads by key and its ``decoder/*`` is reported unused."""

    def build(self, input_shape):
        self.cnn.build(input_shape)
        b = input_shape[0]
        self.proj.build((b, None, self.cnn_channels))
        self.transformer.build((b, None, self.dim))
        self.built = True

    def call(self, x, training=False):
        """Unmasked features: dict with ``pyramid`` (skips, strides 1 ..
        stride/2), ``feature_map`` (CNN, stride 16) and ``latent`` [B, N, dim]."""
        pyramid, fmap = self.cnn_features(x, training=training)
        tokens, _ = self.tokens(fmap)
        latent = self.encode_tokens(tokens, training=training)
        return {"pyramid": pyramid, "feature_map": fmap, "latent": latent}


@register
class HybridSegmenter(_Segmenter):
    """RepRec's hybrid encoder (``hybrid``) with a U-shaped decoder.

    Encoder: the CNN (UNet3D encoder + extra stride-2 stage) gives skips at
    strides 1 .. 2**(levels-1) and the stride-2**levels map; its tokens (all
    of them: no masking) go through the transformer, whose output, laid back
    on the token grid, is the bottleneck. Decoder (TransUNet/UNETR style):
    per skip, coarse to fine, ``up{s}`` = :class:`UpBlock` (x2 transposed conv,
    concat the CNN map of stride ``s``, two conv units of ``decoder_width * s``
    channels), then a 1x1x1 ``head``.

    Args: ``num_classes``; ``base_width``, ``levels``, ``norm``,
    ``extra_channels``, ``dim``, ``depth``, ``heads``, ``mlp_ratio``,
    ``dropout``, ``attention_dropout`` as :class:`HybridEncoder` (use the
    pre-training values so keys and shapes match; the defaults are RepRec's
    Config defaults); ``decoder_width`` (default ``2 * base_width``: the
    decoder at stride ``s`` is as wide as the CNN's skip there, as in the
    Genesis U-Net decoder; half that starved the decoder: a base-4 hybrid
    ended at 4 channels for 11 classes and fine-tuned far slower than the
    U-Net). The decoder uses ``norm`` too.
    """

    def __init__(self, num_classes, base_width=32, levels=4, norm="batch", extra_channels=None,
                 dim=384, depth=6, heads=6, mlp_ratio=4.0, dropout=0.0, attention_dropout=0.0,
                 decoder_width=None, **kwargs):
        kwargs.setdefault("name", "hybrid_segmenter")
        super().__init__(**kwargs)
        self._set_cnn_args(num_classes, base_width, levels, norm)
        self.extra_channels = None if extra_channels is None else _check_positive(
            "extra_channels", extra_channels)
        self._set_transformer_args(dim, depth, heads, mlp_ratio, dropout, attention_dropout)
        self.decoder_width = _check_positive("decoder_width", decoder_width or 2 * self.base_width)
        dt = self.dtype_policy
        self.hybrid = SegmentationHybridEncoder(
            base_width=self.base_width, levels=self.levels, norm=norm,
            extra_channels=self.extra_channels, dim=self.dim, depth=self.depth,
            heads=self.heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout_rate,
            attention_dropout=self.attention_dropout, decoder_depth=0, decoder_heads=1,
            name="hybrid_encoder", dtype=dt)
        self.divisor = self.hybrid.stride
        self.skip_strides = list(self.hybrid.cnn.strides[:-1])  # 1, 2, 4, 8
        self.skip_channels = list(self.hybrid.cnn.encoder_channels[:-1])
        self.ups = [UpBlock(self.decoder_width * s, norm=norm, name=f"up{s}", dtype=dt)
                    for s in reversed(self.skip_strides)]
        self.head = keras.layers.Conv3D(self.num_classes, 1, name="head", dtype=dt)

    def _encoder_layers(self):
        return [self.hybrid]  # cnn, proj, transformer (the decoder has no weights)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        _check_divisible(input_shape, self.divisor, self.name)
        self.hybrid.build(input_shape)
        below = _at_stride(input_shape, self.divisor, self.dim)
        for up, s, c in zip(self.ups, reversed(self.skip_strides), reversed(self.skip_channels)):
            up.build(below, _at_stride(input_shape, s, c))
            below = _at_stride(input_shape, s, up.filters)
        self._finish_build(below)

    def call(self, x, training=False):
        skips, fmap = self.hybrid.cnn_features(x, training=training)
        tokens, grid = self.hybrid.tokens(fmap)
        latent = self.hybrid.encode_tokens(tokens, training=training)
        y = tokens_to_map(latent, grid)
        for up, skip in zip(self.ups, reversed(skips)):
            y = up(y, skip, training=training)
        return self._logits(self.head(y))

    def transfer_parts(self):
        return {"hybrid": self.hybrid, "unet": self.hybrid.cnn}

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, base_width=self.base_width,
                      levels=self.levels, norm=self.norm_kind,
                      extra_channels=self.extra_channels, dim=self.dim, depth=self.depth,
                      heads=self.heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout_rate,
                      attention_dropout=self.attention_dropout,
                      decoder_width=self.decoder_width)
        return config


# ---------------------------------------------------------------------------
# UNETR (MAE's ViT)
# ---------------------------------------------------------------------------

def default_skip_blocks(depth, num_skips):
    """1-based transformer blocks whose outputs feed the skips, shallow to deep:
    ``ceil(depth * j / (num_skips + 1))`` (UNETR: blocks 3, 6, 9 of 12)."""
    return [max(1, -(-depth * j // (num_skips + 1))) for j in range(1, num_skips + 1)]


@register
class UNETRSegmenter(_Segmenter):
    """UNETR (Hatamizadeh et al. 2022) on a :class:`ViT3D` encoder (``vit``).

    With patch size ``p = 2**m``: the final (normed) tokens on the patch grid
    are the bottleneck at stride ``p``; the outputs of ``m - 1`` blocks
    (``skip_blocks``, default evenly spaced: 3, 6, 9 of 12) become skips at
    strides ``p/2, ..., 2`` through ``skip{s}`` (:class:`DeconvPath`: one x2
    transposed conv + conv unit per halving, deepest block -> coarsest skip);
    ``input_block`` (two conv units on the input) is the stride-1 skip. The
    decoder fuses them coarse to fine with ``up{s}`` (:class:`UpBlock`), then
    a 1x1x1 ``head``. Channels at stride ``s``: ``decoder_width * s`` (UNETR's
    feature size 16: 16, 32, 64, 128).

    Args: ``num_classes``; ``patch_size`` (power of two, isotropic), ``dim``,
    ``depth``, ``heads``, ``mlp_ratio``, ``dropout``, ``attention_dropout``,
    ``layer_norm_epsilon`` as :class:`ViT3D` (use the pre-training values);
    ``decoder_width``; ``norm`` of the decoder (UNETR: instance);
    ``skip_blocks``.
    """

    def __init__(self, num_classes, patch_size=16, dim=192, depth=4, heads=3, mlp_ratio=4.0,
                 dropout=0.0, attention_dropout=0.0, layer_norm_epsilon=1e-6, decoder_width=16,
                 norm="instance", skip_blocks=None, **kwargs):
        kwargs.setdefault("name", "unetr_segmenter")
        super().__init__(**kwargs)
        self.num_classes = _check_num_classes(num_classes)
        try:
            patch = as_triple(patch_size, "patch_size")
        except (TypeError, ValueError) as e:
            raise ConfigError("patch_size", str(e)) from None
        p = patch[0]
        if len(set(patch)) != 1 or p < 2 or p & (p - 1):
            raise ConfigError("patch_size", f"must be an isotropic power of two >= 2, got "
                              f"{patch_size!r}")
        self.patch_size = p
        self._set_transformer_args(dim, depth, heads, mlp_ratio, dropout, attention_dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.decoder_width = _check_positive("decoder_width", decoder_width)
        _check_choice("norm", norm, NORMS)
        self.norm_kind = norm
        num_skips = p.bit_length() - 2  # strides p/2 .. 2
        if skip_blocks is None:
            skip_blocks = default_skip_blocks(self.depth, num_skips)
        skip_blocks = [int(b) for b in skip_blocks]
        if len(skip_blocks) != num_skips or not all(1 <= b <= self.depth for b in skip_blocks):
            raise ConfigError("skip_blocks", f"need {num_skips} block numbers in 1..{self.depth} "
                              f"for patch size {p}, got {skip_blocks}")
        self.skip_blocks = skip_blocks
        self.divisor = p
        dt = self.dtype_policy
        self.vit = ViT3D(patch_size=p, dim=self.dim, depth=self.depth, heads=self.heads,
                         mlp_ratio=self.mlp_ratio, dropout=self.dropout_rate,
                         attention_dropout=self.attention_dropout,
                         layer_norm_epsilon=self.layer_norm_epsilon, name="vit3d", dtype=dt)
        # deepest block -> coarsest skip (stride p/2), shallowest -> stride 2
        self.skip_strides = [p >> j for j in range(num_skips, 0, -1)]  # 2, 4, .., p/2
        self.input_block = ConvBlock((self.decoder_width,) * 2, norm=norm, name="input_block",
                                     dtype=dt)
        self.skip_paths = [DeconvPath(self.decoder_width * s, steps=(p // s).bit_length() - 1,
                                      norm=norm, name=f"skip{s}", dtype=dt)
                           for s in self.skip_strides]
        self.ups = [UpBlock(self.decoder_width * s, norm=norm, name=f"up{s}", dtype=dt)
                    for s in [p >> j for j in range(1, num_skips + 2)]]  # p/2 .. 1
        self.head = keras.layers.Conv3D(self.num_classes, 1, name="head", dtype=dt)

    def _encoder_layers(self):
        return [self.vit]

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        _check_divisible(input_shape, self.divisor, self.name)
        p = self.patch_size
        self.vit.build(input_shape)
        self.input_block.build(input_shape)
        for path in self.skip_paths:
            path.build(_at_stride(input_shape, p, self.dim))
        below = _at_stride(input_shape, p, self.dim)
        for up in self.ups:
            s = up.filters // self.decoder_width
            skip_c = self.decoder_width * s  # input_block (s = 1) and skip paths alike
            up.build(below, _at_stride(input_shape, s, skip_c))
            below = _at_stride(input_shape, s, up.filters)
        self._finish_build(below)

    def call(self, x, training=False):
        tokens, grid = self.vit.embed(x)
        latent, hidden = self.vit.encode_tokens(tokens, training=training,
                                                return_hidden_states=True)
        skips = {1: self.input_block(x, training=training)}
        for s, block, path in zip(self.skip_strides, self.skip_blocks, self.skip_paths):
            skips[s] = path(tokens_to_map(hidden[block - 1], grid), training=training)
        y = tokens_to_map(latent, grid)
        for up in self.ups:
            y = up(y, skips[up.filters // self.decoder_width], training=training)
        return self._logits(self.head(y))

    def transfer_parts(self):
        return {"vit": self.vit}

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, patch_size=self.patch_size, dim=self.dim,
                      depth=self.depth, heads=self.heads, mlp_ratio=self.mlp_ratio,
                      dropout=self.dropout_rate, attention_dropout=self.attention_dropout,
                      layer_norm_epsilon=self.layer_norm_epsilon,
                      decoder_width=self.decoder_width, norm=self.norm_kind,
                      skip_blocks=list(self.skip_blocks))
        return config


# ---------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------

# the part each kind is initialised from (rr_tf.transfer's part names), in the
# order kind_for_parts prefers them
PART_FOR_KIND = {"hybrid": "hybrid", "unetr": "vit", "slice2d": "unet2d", "unet": "unet"}
# constructor arguments named differently in the pre-trained part's config
_RENAMES = {"transformer_dim": "dim", "transformer_depth": "depth", "transformer_heads": "heads"}


def segmenter_class(kind):
    """The segmenter class of ``kind`` (``unet``, ``hybrid``, ``unetr``,
    ``slice2d``); ConfigError on an unknown kind."""
    from rr_tf.models.unet2d import SliceSegmenter

    classes = {"unet": UNetSegmenter, "hybrid": HybridSegmenter, "unetr": UNETRSegmenter,
               "slice2d": SliceSegmenter}
    if kind not in classes:
        raise ConfigError("segmenter", f"unknown kind {kind!r}; available: "
                          f"{', '.join(classes)}")
    return classes[kind]


def build_segmenter(kind, num_classes, **kwargs):
    """The segmenter of ``kind`` (:func:`segmenter_class`) with
    ``num_classes`` and the constructor arguments ``kwargs``; ConfigError
    on an unknown kind or argument, or an invalid value."""
    cls = segmenter_class(kind)
    try:
        return cls(num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError("segmenter", f"{kind}: {e}") from None


def kind_for_parts(parts):
    """The segmenter kind a pre-trained source's parts initialise (``auto``)."""
    for kind, key in PART_FOR_KIND.items():
        if key in parts:
            return kind
    raise ConfigError("pretrained", f"no part a segmenter can use (parts: {sorted(parts)})")


def architecture_from(parts, kind):
    """Segmenter constructor arguments read from the pre-trained part's
    config (so keys and shapes match), for ``kind``."""
    key = PART_FOR_KIND[kind]
    if key not in parts:
        raise ConfigError("segmenter", f"{kind} needs a pre-trained {key!r} part; the source has "
                          f"{sorted(parts)}")
    config = parts[key].get_config()
    cls = segmenter_class(kind)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "num_classes", "kwargs"}
    args = {}
    for name, value in config.items():
        name = _RENAMES.get(name, name)
        if name in accepted and name not in ("name", "dtype", "trainable"):
            args[name] = value
    if kind == "slice2d":  # slices per slab = input channels of the first convolution
        first = next(v for v in parts[key].weights if v.path.endswith("kernel"))
        args["slab_size"] = int(first.shape[-2])
    return args


__all__ = [
    "DeconvPath", "HybridSegmenter", "SegmentationHybridEncoder",
    "UNETRSegmenter", "UNetSegmenter", "UpBlock", "architecture_from", "build_segmenter",
    "default_skip_blocks", "kind_for_parts", "segmenter_class", "segmenter_kind_for_method",
    "transfers_decoder",
]
