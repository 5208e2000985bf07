"""Shared building blocks: norm factory, conv units, patch embedding,
3D sin-cos position embedding, MLP and pre-LN transformer blocks.

Backend-agnostic (``keras.layers`` / ``keras.ops`` only), channels-last
5D tensors ``(batch, D, H, W, C)``. Every layer builds its sublayers
explicitly in ``build`` so that a ``.keras`` file restores all weights, and
passes its dtype policy down so mixed precision reaches every sublayer.
"""

import keras
import numpy as np
from keras import ops

NORMS = ("batch", "sync_batch", "group", "instance", "none")
# PyTorch defaults, so that published hyper-parameters transfer:
# BatchNorm eps 1e-5, momentum 0.1 (Keras counts the other way: 0.9).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
GN_EPSILON = 1e-5
MAX_GROUPS = 8


def register(cls):
    """Class decorator: registers a Keras layer or model of rr_tf for
    serialization (``.keras`` files find it by ``rr_tf>ClassName``)."""
    return keras.saving.register_keras_serializable(package="rr_tf")(cls)


def as_triple(value, what="size"):
    """``value`` (int or length-3 sequence) as a tuple of three ints."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * 3
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{what} must be an int or a 3-tuple, got {value}")
    return value


def group_count(channels, max_groups=MAX_GROUPS):
    """Largest number of groups <= ``max_groups`` that divides ``channels``."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def make_norm(kind, channels, name="norm", dtype=None):
    """A normalisation layer for a ``channels``-wide channels-last map.

    ``batch``: BatchNormalization (eps 1e-5, momentum 0.9 = PyTorch's 0.1);
    ``sync_batch``: the same with statistics over the global batch under
    tf.distribute (``synchronized=True``);
    ``group``: GroupNormalization with 8 groups (fewer when 8 does not divide
    ``channels``); ``instance``: GroupNormalization with one group per channel;
    ``none``: identity.
    """
    if kind in ("batch", "sync_batch"):
        return keras.layers.BatchNormalization(
            epsilon=BN_EPSILON, momentum=BN_MOMENTUM, synchronized=kind == "sync_batch",
            name=name, dtype=dtype)
    if kind == "group":
        return keras.layers.GroupNormalization(
            groups=group_count(channels), epsilon=GN_EPSILON, name=name, dtype=dtype)
    if kind == "instance":
        return keras.layers.GroupNormalization(
            groups=-1, epsilon=GN_EPSILON, name=name, dtype=dtype)
    if kind in ("none", None):
        return keras.layers.Identity(name=name, dtype=dtype)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def with_channels(shape, channels):
    return tuple(shape[:-1]) + (channels,)


CONV = {2: keras.layers.Conv2D, 3: keras.layers.Conv3D}
CONV_TRANSPOSE = {2: keras.layers.Conv2DTranspose, 3: keras.layers.Conv3DTranspose}


@register
class MaxPool(keras.layers.Layer):
    """Max pooling by 2 along every spatial axis (stride 2, 'valid': an odd
    trailing voxel is dropped) whose gradient is split equally among tied
    maxima, the same in every backend, with and without XLA.

    Why not ``keras.layers.MaxPooling3D``: TensorFlow's own MaxPool3D
    gradient gives the *whole* gradient to every tied maximum (x8 in a
    constant 2x2x2 window), XLA's (GPU, TPU, ``jit_compile``) and JAX's to
    one of them, so the same step trained differently with and without
    XLA wherever CT is constant (air clipped to the window, padding). Here
    the window maximum is taken one axis at a time (reshape + max), whose
    gradient is the mean over ties in every backend (tests/test_models.py).
    Without ties it equals max pooling exactly, forward and backward."""

    def __init__(self, rank=3, **kwargs):
        super().__init__(**kwargs)
        self.rank = check_rank(rank)
        # no weights: built from the start. A pool that is never called (those
        # of a momentum encoder, which only copies weights) would otherwise
        # leave its model "unbuilt", and ``fit`` under tf.distribute then
        # rebuilds the model symbolically from the dict batch and fails
        self.built = True

    def call(self, x):
        r = self.rank
        shape = ops.shape(x)
        sizes = [shape[1 + a] // 2 for a in range(r)]
        x = x[(slice(None),) + tuple(slice(0, 2 * n) for n in sizes)]
        channels = shape[-1]
        inner = channels
        for n in sizes:
            inner = inner * (2 * n)
        for a in range(r):  # pool axis a: the (already pooled) leading axes go to -1
            inner = inner // (2 * sizes[a])
            x = ops.max(ops.reshape(x, (-1, 2, inner)), axis=1)
        return ops.reshape(x, (-1, *sizes, channels))

    def compute_output_shape(self, input_shape):
        spatial = [None if n is None else n // 2 for n in input_shape[1:1 + self.rank]]
        return (input_shape[0], *spatial, input_shape[-1])

    def get_config(self):
        return dict(super().get_config(), rank=self.rank)


def check_rank(rank):
    if int(rank) not in CONV:
        raise ValueError(f"rank must be 2 or 3, got {rank}")
    return int(rank)


@register
class ConvUnit(keras.layers.Layer):
    """Conv (k^rank, 'same', with bias) -> norm -> ReLU: the Genesis U-Net
    unit, 3D (``rank=3``) or 2D (``rank=2``, the slice U-Net)."""

    def __init__(self, filters, norm="batch", kernel_size=3, rank=3, **kwargs):
        super().__init__(**kwargs)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.filters = int(filters)
        self.norm_kind = norm
        self.kernel_size = kernel_size
        self.rank = check_rank(rank)
        self.conv = CONV[self.rank](
            self.filters, kernel_size, padding="same", name="conv", dtype=self.dtype_policy)
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
        config.update(filters=self.filters, norm=self.norm_kind, kernel_size=self.kernel_size,
                      rank=self.rank)
        return config


@register
class ConvBlock(keras.layers.Layer):
    """A stack of :class:`ConvUnit` s (``unit1``, ``unit2``, ...)."""

    def __init__(self, filters, norm="batch", rank=3, **kwargs):
        super().__init__(**kwargs)
        self.filters = [int(f) for f in filters]
        self.norm_kind = norm
        self.rank = check_rank(rank)
        self.units = [ConvUnit(f, norm=norm, rank=self.rank, name=f"unit{i + 1}",
                               dtype=self.dtype_policy)
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
        config.update(filters=list(self.filters), norm=self.norm_kind, rank=self.rank)
        return config


def patchify(volumes, patch_size):
    """``[B, D, H, W, C]`` -> ``[B, N, pd*ph*pw*C]`` (voxels in (pd, ph, pw, C)
    order, the order of a Conv3D kernel's (pd, ph, pw, C) axes; tokens in
    (d, h, w) row-major order). The sizes must be multiples of the patch."""
    pd, ph, pw = as_triple(patch_size, "patch_size")
    shape = ops.shape(volumes)
    b, c = shape[0], shape[4]
    gd, gh, gw = shape[1] // pd, shape[2] // ph, shape[3] // pw
    x = ops.reshape(volumes, (b, gd, pd, gh, ph, gw, pw, c))
    x = ops.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7))
    return ops.reshape(x, (b, gd * gh * gw, pd * ph * pw * c))


@register
class PatchEmbedding3D(keras.layers.Layer):
    """Non-overlapping 3D patches -> tokens: Conv3D with kernel = stride = patch
    (its weights, ``proj``), computed as a matmul of the patchified volume.

    ``call(x)`` returns tokens ``[B, N, dim]`` in (d, h, w) row-major order;
    ``grid(spatial_shape)`` gives the token grid for a volume size.
    """

    def __init__(self, patch_size=16, dim=192, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = as_triple(patch_size, "patch_size")
        self.dim = int(dim)
        self.proj = keras.layers.Conv3D(self.dim, self.patch_size, strides=self.patch_size,
                                        padding="valid", name="proj", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.proj.build(input_shape)
        self.built = True

    def grid(self, spatial_shape):
        return tuple(s // p for s, p in zip(spatial_shape, self.patch_size))

    def call(self, x):
        # ``patchify(x) @ kernel + bias``: the same values as the Conv3D
        # (kernel = stride = patch, valid padding: a remainder is dropped),
        # but on CPU TensorFlow's Conv3D gradient for a 16^3 stride-16 kernel
        # takes minutes per step where this matmul takes milliseconds.
        pd, ph, pw = self.patch_size
        shape = ops.shape(x)
        gd, gh, gw = shape[1] // pd, shape[2] // ph, shape[3] // pw
        x = x[:, :gd * pd, :gh * ph, :gw * pw]
        kernel = ops.reshape(ops.cast(self.proj.kernel, self.compute_dtype), (-1, self.dim))
        tokens = ops.matmul(patchify(ops.cast(x, self.compute_dtype), self.patch_size), kernel)
        return tokens + ops.cast(self.proj.bias, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        spatial = input_shape[1:4]
        n = None if any(s is None for s in spatial) else int(np.prod(self.grid(spatial)))
        return (input_shape[0], n, self.dim)

    def get_config(self):
        config = super().get_config()
        config.update(patch_size=list(self.patch_size), dim=self.dim)
        return config


def _axis_dims(dim):
    """Channels per axis (even) for a 3D sin-cos embedding of width ``dim``."""
    per_axis = 2 * (dim // 6)
    if per_axis == 0:
        raise ValueError(f"position embedding width must be >= 6, got {dim}")
    return per_axis, dim - 3 * per_axis


def sincos_position_embedding_3d(grid, dim, temperature=10000.0, dtype="float32"):
    """Fixed 3D sin-cos position embedding ``[N, dim]`` for a token ``grid``.

    ``grid`` is (gd, gh, gw), ints or scalar tensors, so the same model runs
    at any grid size. Each axis gets ``2 * (dim // 6)`` channels:
    ``[sin(p * w_0..w_{k-1}), cos(p * w_0..w_{k-1})]`` with
    ``w_i = temperature ** (-i / k)``, ``k = dim // 6``, and ``p`` the integer
    position along that axis. Channels are ordered (depth, height, width);
    ``dim % 6`` leftover channels are zeros. Tokens are in (d, h, w)
    row-major order, as produced by :class:`PatchEmbedding3D`.
    """
    dim = int(dim)
    per_axis, pad = _axis_dims(dim)
    half = per_axis // 2
    omega = ops.power(temperature, -ops.arange(half, dtype="float32") / float(half))
    gd, gh, gw = grid
    zd = ops.cast(ops.arange(gd), "float32")
    zh = ops.cast(ops.arange(gh), "float32")
    zw = ops.cast(ops.arange(gw), "float32")
    pd, ph, pw = ops.meshgrid(zd, zh, zw, indexing="ij")
    parts = []
    for p in (pd, ph, pw):
        angle = ops.reshape(p, (-1, 1)) * omega[None, :]
        parts += [ops.sin(angle), ops.cos(angle)]
    emb = ops.concatenate(parts, axis=-1)
    if pad:
        emb = ops.pad(emb, [[0, 0], [0, pad]])
    return ops.cast(emb, dtype)


def sincos_position_embedding_3d_numpy(grid, dim, temperature=10000.0):
    """NumPy twin of :func:`sincos_position_embedding_3d` (for checks, export)."""
    per_axis, pad = _axis_dims(int(dim))
    half = per_axis // 2
    omega = temperature ** (-np.arange(half, dtype=np.float64) / half)
    coords = np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij")
    parts = []
    for p in coords:
        angle = p.reshape(-1, 1) * omega[None, :]
        parts += [np.sin(angle), np.cos(angle)]
    emb = np.concatenate(parts + [np.zeros((angle.shape[0], pad))], axis=-1)
    return emb.astype(np.float32)


def interpolate_pos_embed(table, old_grid, new_grid):
    """Trilinearly resample a learned position table ``[N_old, C]`` to ``new_grid``.

    NumPy, for weight transfer between grid sizes (half-pixel centres, as
    PyTorch ``align_corners=False``). Returns ``[prod(new_grid), C]``.
    """
    table = np.asarray(table, dtype=np.float64)
    vol = table.reshape(tuple(old_grid) + (table.shape[-1],))
    for axis, (n_old, n_new) in enumerate(zip(old_grid, new_grid)):
        if n_old == n_new:
            continue
        src = (np.arange(n_new) + 0.5) * (n_old / n_new) - 0.5
        src = np.clip(src, 0, n_old - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_old - 1)
        w = (src - lo).reshape([-1 if a == axis else 1 for a in range(vol.ndim)])
        vol = np.take(vol, lo, axis=axis) * (1 - w) + np.take(vol, hi, axis=axis) * w
    return vol.reshape(-1, table.shape[-1]).astype(np.float32)


def resize3d(x, size, method="trilinear"):
    """Resize a ``[B, D, H, W, C]`` map to spatial ``size`` (3 static ints).

    ``trilinear`` is separable (H, W bilinear, then D linear), half-pixel
    centres without antialiasing (= PyTorch ``align_corners=False``).
    """
    d, h, w = size
    mode = {"trilinear": "bilinear", "nearest": "nearest"}[method]
    shape = ops.shape(x)
    b, d0, c = shape[0], shape[1], shape[4]
    y = ops.reshape(x, (-1, shape[2], shape[3], c))
    y = ops.image.resize(y, (h, w), interpolation=mode, antialias=False)
    y = ops.reshape(y, (b, d0, h * w, c))
    y = ops.image.resize(y, (d, h * w), interpolation=mode, antialias=False)
    return ops.reshape(y, (b, d, h, w, c))


def _upsample_axis(x, axis, factor):
    """Linear x``factor`` upsampling along one axis, half-pixel centres, edges
    clamped (= PyTorch ``align_corners=False``); dynamic shapes are fine."""
    def part(start, stop):
        index = [slice(None)] * 5
        index[axis] = slice(start, stop)
        return x[tuple(index)]

    prev = ops.concatenate([part(0, 1), part(None, -1)], axis=axis)
    nxt = ops.concatenate([part(1, None), part(-1, None)], axis=axis)
    phases = []
    for r in range(factor):
        offset = (2 * r + 1 - factor) / (2 * factor)  # source position minus j
        if offset < 0:
            phases.append(x * (1 + offset) + prev * (-offset))
        else:
            phases.append(x * (1 - offset) + nxt * offset)
    y = ops.stack(phases, axis=axis + 1)
    shape = ops.shape(x)
    new = [shape[i] for i in range(5)]
    new[axis] = shape[axis] * factor
    return ops.reshape(y, new)


def upsample3d(x, factor, method="trilinear"):
    """Upsample a ``[B, D, H, W, C]`` map by integer ``factor`` (int or 3-tuple).

    ``trilinear``: separable linear, half-pixel centres (PyTorch
    ``align_corners=False``); ``nearest``: repeat. Works with unknown
    spatial sizes (unlike :func:`resize3d`).
    """
    if method not in ("trilinear", "nearest"):
        raise ValueError(f"method must be trilinear or nearest, got {method!r}")
    for axis, f in zip((1, 2, 3), as_triple(factor, "factor")):
        if f == 1:
            continue
        x = ops.repeat(x, f, axis=axis) if method == "nearest" else _upsample_axis(x, axis, f)
    return x


@register
class MLP(keras.layers.Layer):
    """Dense(hidden, GELU) -> dropout -> Dense(out) -> dropout (``fc1``, ``fc2``)."""

    def __init__(self, hidden_dim, out_dim=None, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.out_dim = None if out_dim is None else int(out_dim)
        self.dropout_rate = float(dropout)
        self.fc1 = keras.layers.Dense(self.hidden_dim, name="fc1", dtype=self.dtype_policy)
        self.fc2 = None
        self.drop = keras.layers.Dropout(self.dropout_rate, name="drop", dtype=self.dtype_policy)

    def build(self, input_shape):
        out_dim = self.out_dim or input_shape[-1]
        self.fc2 = keras.layers.Dense(out_dim, name="fc2", dtype=self.dtype_policy)
        self.fc1.build(input_shape)
        self.fc2.build(with_channels(input_shape, self.hidden_dim))
        self.built = True

    def call(self, x, training=False):
        x = keras.activations.gelu(self.fc1(x), approximate=False)
        x = self.drop(x, training=training)
        return self.drop(self.fc2(x), training=training)

    def compute_output_shape(self, input_shape):
        return with_channels(input_shape, self.out_dim or input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim, out_dim=self.out_dim, dropout=self.dropout_rate)
        return config


@register
class TransformerBlock(keras.layers.Layer):
    """Pre-LN block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim, heads, mlp_ratio=4.0, dropout=0.0, attention_dropout=0.0,
                 layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.heads = int(heads)
        if self.dim % self.heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.mlp_ratio = float(mlp_ratio)
        self.dropout_rate = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        dt = self.dtype_policy
        self.norm1 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="norm1",
                                                     dtype=dt)
        self.attn = keras.layers.MultiHeadAttention(
            self.heads, self.dim // self.heads, dropout=self.attention_dropout, name="attn",
            dtype=dt)
        self.attn_drop = keras.layers.Dropout(self.dropout_rate, name="attn_drop", dtype=dt)
        self.norm2 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="norm2",
                                                     dtype=dt)
        self.mlp = MLP(int(round(self.dim * self.mlp_ratio)), self.dim, dropout=dropout,
                       name="mlp", dtype=dt)

    def build(self, input_shape):
        self.norm1.build(input_shape)
        self.attn.build(input_shape, input_shape)
        self.norm2.build(input_shape)
        self.mlp.build(input_shape)
        self.built = True

    def call(self, x, training=False):
        h = self.norm1(x)
        h = self.attn(h, h, training=training)
        x = x + self.attn_drop(h, training=training)
        return x + self.mlp(self.norm2(x), training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, heads=self.heads, mlp_ratio=self.mlp_ratio,
                      dropout=self.dropout_rate, attention_dropout=self.attention_dropout,
                      layer_norm_epsilon=self.layer_norm_epsilon)
        return config


@register
class TransformerEncoder(keras.layers.Layer):
    """``depth`` pre-LN blocks (``block1`` ..) and a final LayerNorm (``norm``)."""

    def __init__(self, dim, depth, heads, mlp_ratio=4.0, dropout=0.0, attention_dropout=0.0,
                 layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.depth, self.heads = int(dim), int(depth), int(heads)
        self.mlp_ratio = float(mlp_ratio)
        self.dropout_rate = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.blocks = [
            TransformerBlock(self.dim, self.heads, self.mlp_ratio, dropout, attention_dropout,
                             layer_norm_epsilon, name=f"block{i + 1}", dtype=self.dtype_policy)
            for i in range(self.depth)]
        self.norm = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="norm",
                                                    dtype=self.dtype_policy)

    def build(self, input_shape):
        for block in self.blocks:
            block.build(input_shape)
        self.norm.build(input_shape)
        self.built = True

    def call(self, x, training=False, return_hidden_states=False):
        """Tokens ``[B, N, dim]`` -> normed tokens; with ``return_hidden_states``
        also the list of every block's (un-normed) output, for UNETR-style skips."""
        hidden = []
        for block in self.blocks:
            x = block(x, training=training)
            hidden.append(x)
        x = self.norm(x)
        return (x, hidden) if return_hidden_states else x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, depth=self.depth, heads=self.heads,
                      mlp_ratio=self.mlp_ratio, dropout=self.dropout_rate,
                      attention_dropout=self.attention_dropout,
                      layer_norm_epsilon=self.layer_norm_epsilon)
        return config


__all__ = [
    "NORMS", "BN_EPSILON", "BN_MOMENTUM", "as_triple", "group_count", "make_norm",
    "ConvUnit", "ConvBlock", "PatchEmbedding3D", "sincos_position_embedding_3d",
    "sincos_position_embedding_3d_numpy", "interpolate_pos_embed", "resize3d", "upsample3d",
    "MLP",
    "TransformerBlock", "TransformerEncoder",
]
