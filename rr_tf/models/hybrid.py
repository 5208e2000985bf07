"""RepRec's hybrid encoder: a CNN (UNet3D encoder + one extra stride-2 stage)
whose stride-16 map becomes transformer tokens, and a light decoder that
predicts the CNN feature vector of every token.

The masking policy belongs to the method (RepRec masks voxels at the input
and drops the masked tokens before the transformer); this module provides
the pieces it needs:

    pyramid, fmap = enc.cnn_features(x_masked, training=True)
    tokens, grid = enc.tokens(fmap)                  # [B, N, dim] + position
    visible, token_mask, ids_restore, ids_keep = random_masking(tokens, r, seed)
    latent = enc.encode_tokens(tokens, ids_keep, training=True)
    pred = enc.decode_tokens(latent, ids_restore, grid, training=True)  # [B, N, C_cnn]
    target = map_to_tokens(momentum_fmap)            # [B, N, C_cnn]

Layer paths: ``cnn/enc1..enc5/...``, ``proj``, ``transformer/block{i}/...``,
``transformer/norm``, ``decoder/{embed,mask_token,transformer,pred}``.
"""

import keras
from keras import ops

from rr_tf.models.layers import TransformerEncoder, register
from rr_tf.models.unet3d import UNet3D
from rr_tf.models.vit3d import (MaskedTokenDecoder, add_position_embedding, gather_tokens,
                                static_grid)


def map_to_tokens(feature_map):
    """``[B, gd, gh, gw, C]`` -> ``[B, gd*gh*gw, C]`` in (d, h, w) row-major order."""
    shape = ops.shape(feature_map)
    return ops.reshape(feature_map, (shape[0], -1, feature_map.shape[-1]))


@register
class HybridEncoder(keras.Model):
    """CNN -> tokens -> transformer, plus a feature-recovery decoder.

    Args:
        base_width, levels, norm, extra_channels: of the CNN (a
            ``UNet3D(encoder_only=True, extra_stride_stage=True)`` named ``cnn``;
            tokens come from its last map at stride ``2**levels``).
        dim, depth, heads, mlp_ratio, dropout, attention_dropout: transformer.
        decoder_dim, decoder_depth, decoder_heads: light decoder; it predicts
            ``cnn_channels`` (the width of the stride-16 map) per token.

    Attributes: ``cnn``, ``proj`` (Dense to ``dim``), ``transformer``
    (:class:`TransformerEncoder`), ``decoder`` (:class:`MaskedTokenDecoder`),
    ``cnn_channels``, ``stride``.
    """

    def __init__(self, base_width=32, levels=4, norm="batch", extra_channels=None, dim=384,
                 depth=8, heads=6, mlp_ratio=4.0, dropout=0.0, attention_dropout=0.0,
                 decoder_dim=256, decoder_depth=2, decoder_heads=8, **kwargs):
        kwargs.setdefault("name", "hybrid_encoder")
        super().__init__(**kwargs)
        self.base_width, self.levels, self.norm_kind = int(base_width), int(levels), norm
        self.extra_channels = None if extra_channels is None else int(extra_channels)
        self.dim, self.depth, self.heads = int(dim), int(depth), int(heads)
        self.mlp_ratio = float(mlp_ratio)
        self.dropout_rate = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.decoder_dim, self.decoder_depth = int(decoder_dim), int(decoder_depth)
        self.decoder_heads = int(decoder_heads)
        dt = self.dtype_policy
        self.cnn = UNet3D(base_width=base_width, levels=levels, norm=norm,
                          extra_stride_stage=True, extra_channels=extra_channels,
                          encoder_only=True, name="cnn", dtype=dt)
        self.cnn_channels = self.cnn.encoder_channels[-1]
        self.stride = self.cnn.strides[-1]
        self.proj = keras.layers.Dense(self.dim, name="proj", dtype=dt)
        self.transformer = TransformerEncoder(self.dim, self.depth, self.heads, self.mlp_ratio,
                                              dropout, attention_dropout, name="transformer",
                                              dtype=dt)
        self.decoder = MaskedTokenDecoder(self.decoder_dim, self.decoder_depth,
                                          self.decoder_heads, self.cnn_channels,
                                          self.mlp_ratio, dropout, attention_dropout,
                                          name="decoder", dtype=dt)

    def build(self, input_shape):
        self.cnn.build(input_shape)
        b = input_shape[0]
        self.proj.build((b, None, self.cnn_channels))
        self.transformer.build((b, None, self.dim))
        self.decoder.build((b, None, self.dim))
        self.built = True

    def cnn_features(self, x, training=False):
        """(pyramid at strides 1 .. stride/2 (the skips), map at ``stride``)."""
        if not self.built:
            self.build(x.shape)
        pyramid = self.cnn.encode(x, training=training)
        return pyramid[:-1], pyramid[-1]

    def tokens(self, feature_map):
        """Stride-16 map -> (projected tokens + 3D sin-cos position, grid)."""
        grid = static_grid(feature_map, 1)
        return add_position_embedding(self.proj(map_to_tokens(feature_map)), grid), grid

    def encode_tokens(self, tokens, ids_keep=None, training=False, return_hidden_states=False):
        """Transformer on ``tokens`` (only those at ``ids_keep`` when given)."""
        if ids_keep is not None:
            tokens = gather_tokens(tokens, ids_keep)
        return self.transformer(tokens, training=training,
                                return_hidden_states=return_hidden_states)

    def decode_tokens(self, latent, ids_restore, grid, training=False):
        """Predicted CNN features ``[B, N, cnn_channels]`` for every token."""
        return self.decoder(latent, ids_restore, grid=grid, training=training)

    def call(self, x, training=False):
        """Unmasked forward pass: dict with ``pyramid`` (skips), ``feature_map``,
        ``latent`` ``[B, N, dim]`` and ``prediction`` ``[B, N, cnn_channels]``."""
        pyramid, fmap = self.cnn_features(x, training=training)
        tokens, grid = self.tokens(fmap)
        latent = self.encode_tokens(tokens, training=training)
        pred = self.decode_tokens(latent, None, grid, training=training)
        return {"pyramid": pyramid, "feature_map": fmap, "latent": latent, "prediction": pred}

    def get_config(self):
        config = super().get_config()
        config.update(base_width=self.base_width, levels=self.levels, norm=self.norm_kind,
                      extra_channels=self.extra_channels, dim=self.dim, depth=self.depth,
                      heads=self.heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout_rate,
                      attention_dropout=self.attention_dropout, decoder_dim=self.decoder_dim,
                      decoder_depth=self.decoder_depth, decoder_heads=self.decoder_heads)
        return config
