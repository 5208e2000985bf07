"""3D Vision Transformer pieces: ViT3D, MAE-style random token masking,
patchify / unpatchify for voxel targets, and the light masked-token decoder
shared by MAE-3D and RepRec.

Token order everywhere is (d, h, w) row-major over the patch grid.
"""

import math

import keras
from keras import ops

from rr_tf.models.layers import (PatchEmbedding3D, TransformerEncoder, register, as_triple,
                                 patchify, sincos_position_embedding_3d)  # noqa: F401 (patchify:
# re-exported next to unpatchify)


# ---------------------------------------------------------------------------
# Token utilities
# ---------------------------------------------------------------------------

def num_visible(num_tokens, mask_ratio):
    """Tokens kept by :func:`random_masking`: ``round(N * (1 - ratio))``
    (halves round up), at least 1 when ``ratio < 1``."""
    keep = int(math.floor(num_tokens * (1.0 - float(mask_ratio)) + 0.5 + 1e-9))
    if mask_ratio < 1.0:
        keep = max(keep, 1)
    return min(keep, num_tokens)


def gather_tokens(tokens, ids):
    """``tokens[b, ids[b, k], :]`` -> ``[B, K, C]``."""
    shape = ops.shape(tokens)
    ids = ops.cast(ids, "int32")
    idx = ops.broadcast_to(ops.expand_dims(ids, -1),
                           (ops.shape(ids)[0], ops.shape(ids)[1], shape[-1]))
    return ops.take_along_axis(tokens, idx, axis=1)


def random_masking(tokens, mask_ratio, seed=None):
    """MAE random masking by argsort of uniform noise.

    Args:
        tokens: ``[B, N, C]``.
        mask_ratio: fraction of tokens to mask (Python float).
        seed: an int (stateless: same draw every call) or a
            ``keras.random.SeedGenerator`` (advances; keep it as an attribute of
            the model so it is tracked inside ``train_step``).

    Returns:
        ``(visible [B, K, C], token_mask [B, N] float32 with 1 = masked,
        ids_restore [B, N], ids_keep [B, K])`` where ``K = num_visible(N, ratio)``
        and ``gather_tokens(concat([visible, masked_in_shuffle_order]), ids_restore)``
        puts tokens back in their original order.
    """
    shape = ops.shape(tokens)
    b = shape[0]
    n_static = tokens.shape[1]
    if n_static is not None:
        n = int(n_static)
        keep = num_visible(n, mask_ratio)
    else:
        n = shape[1]
        keep = ops.cast(ops.floor(ops.cast(n, "float32") * (1.0 - mask_ratio) + 0.5), "int32")
        keep = ops.clip(keep, 1, n)
    noise = keras.random.uniform((b, n), seed=seed)
    ids_shuffle = ops.cast(ops.argsort(noise, axis=1), "int32")
    ids_restore = ops.cast(ops.argsort(ids_shuffle, axis=1), "int32")
    ids_keep = ids_shuffle[:, :keep]
    visible = gather_tokens(tokens, ids_keep)
    ranks = ops.broadcast_to(ops.arange(n, dtype="int32")[None, :], (b, n))
    shuffled_mask = ops.cast(ranks >= keep, "float32")
    token_mask = ops.take_along_axis(shuffled_mask, ids_restore, axis=1)
    return visible, token_mask, ids_restore, ids_keep


def unpatchify(patches, patch_size, grid, channels=1):
    """Inverse of :func:`patchify`: ``[B, N, p^3*C]`` -> ``[B, D, H, W, C]``."""
    pd, ph, pw = as_triple(patch_size, "patch_size")
    gd, gh, gw = grid
    b = ops.shape(patches)[0]
    x = ops.reshape(patches, (b, gd, gh, gw, pd, ph, pw, channels))
    x = ops.transpose(x, (0, 1, 4, 2, 5, 3, 6, 7))
    return ops.reshape(x, (b, gd * pd, gh * ph, gw * pw, channels))


def tokens_to_map(tokens, grid):
    """``[B, N, C]`` -> ``[B, gd, gh, gw, C]`` (for UNETR-style decoders)."""
    gd, gh, gw = grid
    return ops.reshape(tokens, (ops.shape(tokens)[0], gd, gh, gw, ops.shape(tokens)[-1]))


def static_grid(x, factor):
    """Token grid of a ``[B, D, H, W, C]`` tensor at stride ``factor`` (ints when
    the spatial shape is static, else scalar tensors)."""
    factor = as_triple(factor)
    dyn = None
    grid = []
    for axis, f in zip((1, 2, 3), factor):
        s = x.shape[axis]
        if s is None:
            dyn = ops.shape(x) if dyn is None else dyn
            grid.append(dyn[axis] // f)
        else:
            grid.append(int(s) // f)
    return tuple(grid)


def add_position_embedding(tokens, grid):
    """``tokens + sincos_position_embedding_3d(grid, C)`` (broadcast over batch)."""
    dtype = keras.backend.standardize_dtype(tokens.dtype)
    pos = sincos_position_embedding_3d(grid, tokens.shape[-1], dtype=dtype)
    return tokens + pos[None]


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

@register
class ViT3D(keras.Model):
    """Plain 3D ViT: ``patch_embed`` -> fixed 3D sin-cos position embedding ->
    ``encoder`` (pre-LN blocks + final LayerNorm). No class token.

    Args: ``patch_size`` (int or 3-tuple), ``dim``, ``depth``, ``heads``,
    ``mlp_ratio``, ``dropout``, ``attention_dropout``, ``layer_norm_epsilon``.

    Methods: ``embed(x)`` -> (tokens with position embedding, grid);
    ``encode_tokens(tokens, ids_keep=None)`` -> latent (visible tokens only when
    ``ids_keep`` is given); ``call(x, ids_keep=None)`` = both.
    """

    def __init__(self, patch_size=16, dim=192, depth=4, heads=3, mlp_ratio=4.0, dropout=0.0,
                 attention_dropout=0.0, layer_norm_epsilon=1e-6, **kwargs):
        kwargs.setdefault("name", "vit3d")
        super().__init__(**kwargs)
        self.patch_size = as_triple(patch_size, "patch_size")
        self.dim, self.depth, self.heads = int(dim), int(depth), int(heads)
        self.mlp_ratio = float(mlp_ratio)
        self.dropout_rate = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.patch_embed = PatchEmbedding3D(self.patch_size, self.dim, name="patch_embed",
                                            dtype=self.dtype_policy)
        self.encoder = TransformerEncoder(self.dim, self.depth, self.heads, self.mlp_ratio,
                                          dropout, attention_dropout, layer_norm_epsilon,
                                          name="encoder", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.patch_embed.build(input_shape)
        self.encoder.build((input_shape[0], None, self.dim))
        self.built = True

    def grid(self, spatial_shape):
        return tuple(int(s) // p for s, p in zip(spatial_shape, self.patch_size))

    def embed(self, x):
        """Patch tokens plus position embedding, and the token grid."""
        if not self.built:
            self.build(x.shape)
        grid = static_grid(x, self.patch_size)
        return add_position_embedding(self.patch_embed(x), grid), grid

    def encode_tokens(self, tokens, ids_keep=None, training=False, return_hidden_states=False):
        if ids_keep is not None:
            tokens = gather_tokens(tokens, ids_keep)
        return self.encoder(tokens, training=training, return_hidden_states=return_hidden_states)

    def call(self, x, ids_keep=None, training=False):
        tokens, _ = self.embed(x)
        return self.encode_tokens(tokens, ids_keep, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(patch_size=list(self.patch_size), dim=self.dim, depth=self.depth,
                      heads=self.heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout_rate,
                      attention_dropout=self.attention_dropout,
                      layer_norm_epsilon=self.layer_norm_epsilon)
        return config


@register
class MaskedTokenDecoder(keras.layers.Layer):
    """MAE-style light decoder: ``embed`` (Dense to ``dim``), a learned
    ``mask_token`` for every masked position, un-shuffle, fixed 3D sin-cos
    position embedding, ``transformer`` (blocks + LayerNorm), ``pred`` (Dense to
    ``out_dim``).

    ``call(latent, ids_restore, grid)``: ``latent`` ``[B, K, C]`` holds the
    visible tokens in ``ids_keep`` order; ``ids_restore`` ``[B, N]`` from
    :func:`random_masking` (None when nothing was masked). Returns ``[B, N, out_dim]``.
    """

    def __init__(self, dim, depth, heads, out_dim, mlp_ratio=4.0, dropout=0.0,
                 attention_dropout=0.0, layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.depth, self.heads = int(dim), int(depth), int(heads)
        self.out_dim = int(out_dim)
        self.mlp_ratio = float(mlp_ratio)
        self.dropout_rate = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        dt = self.dtype_policy
        self.embed = keras.layers.Dense(self.dim, name="embed", dtype=dt)
        self.transformer = TransformerEncoder(self.dim, self.depth, self.heads, self.mlp_ratio,
                                              dropout, attention_dropout, layer_norm_epsilon,
                                              name="transformer", dtype=dt)
        self.pred = keras.layers.Dense(self.out_dim, name="pred", dtype=dt)

    def build(self, input_shape):
        self.embed.build(input_shape)
        self.mask_token = self.add_weight(
            shape=(self.dim,), initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="mask_token")
        shape = (input_shape[0], None, self.dim)
        self.transformer.build(shape)
        self.pred.build(shape)
        self.built = True

    def call(self, latent, ids_restore=None, grid=None, training=False):
        if grid is None:
            raise ValueError("MaskedTokenDecoder needs the token grid (gd, gh, gw)")
        x = self.embed(latent)
        if ids_restore is not None:
            b, k = ops.shape(x)[0], ops.shape(x)[1]
            n = ops.shape(ids_restore)[1]
            fill = ops.cast(self.mask_token, x.dtype)[None, None, :]
            fill = ops.broadcast_to(fill, (b, n - k, self.dim))
            x = gather_tokens(ops.concatenate([x, fill], axis=1), ids_restore)
        x = add_position_embedding(x, grid)
        x = self.transformer(x, training=training)
        return self.pred(x)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, depth=self.depth, heads=self.heads, out_dim=self.out_dim,
                      mlp_ratio=self.mlp_ratio, dropout=self.dropout_rate,
                      attention_dropout=self.attention_dropout,
                      layer_norm_epsilon=self.layer_norm_epsilon)
        return config
