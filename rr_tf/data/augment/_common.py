"""Seeds, coin flips and shape helpers shared by the augment ops.

Every op takes ``seed``: an int32/int64 tensor of shape [2] (or anything
convertible to one). Sub-seeds are derived with
``tf.random.experimental.stateless_fold_in`` using a fixed integer per
random draw, so an op's draws never depend on one another's order.
"""

import tensorflow as tf


def as_seed(seed):
    """``seed`` as an int32/int64 tensor of shape [2]."""
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        seed = tf.cast(seed, tf.int64)
    seed.shape.assert_is_compatible_with([2])
    return seed


def sub_seed(seed, i):
    """A sub-seed of ``seed`` for the draw numbered ``i`` (a Python int)."""
    return tf.random.experimental.stateless_fold_in(seed, i)


def coin(seed, p):
    """A scalar bool tensor, True with probability ``p``."""
    return tf.random.stateless_uniform([], seed) < p


def random_apply(fn, p, seed, *args):
    """``fn(*args)`` with probability ``p``, else ``args`` unchanged.

    Graph friendly: a ``tf.cond`` on a stateless uniform draw from ``seed``,
    so only the chosen branch runs. ``fn`` must return the same structure
    (and dtypes/shapes) as ``args`` (a single tensor when one arg is given).
    A Python ``p`` of 0 or 1 is resolved at trace time (no cond).
    """
    identity = args[0] if len(args) == 1 else tuple(args)
    if isinstance(p, (int, float)):
        if p >= 1.0:
            return fn(*args)
        if p <= 0.0:
            return identity
    return tf.cond(coin(as_seed(seed), p), lambda: fn(*args), lambda: identity)


def uniform(seed, shape, lo, hi):
    """Stateless float32 uniform in [lo, hi)."""
    return tf.random.stateless_uniform(shape, seed, minval=lo, maxval=hi, dtype=tf.float32)


def randint(seed, shape, lo, hi):
    """Stateless int32 uniform in [lo, hi] (both inclusive, tensors allowed)."""
    lo = tf.cast(lo, tf.int32)
    hi = tf.cast(hi, tf.int32)
    u = tf.random.stateless_uniform(shape, seed, dtype=tf.float32)
    span = tf.cast(hi - lo + 1, tf.float32)
    # floor(u * span) is in [0, span-1]; the min guards float rounding.
    k = tf.minimum(tf.cast(tf.floor(u * span), tf.int32), hi - lo)
    return lo + k


def static_spatial_shape(x, op):
    """The static (D, H, W) of a (D, H, W, C) tensor, or a ValueError."""
    if x.shape.rank != 4:
        raise ValueError(f"{op}: expected a (D, H, W, C) tensor, got shape {x.shape}")
    dims = x.shape[:3]
    if any(d is None for d in dims):
        raise ValueError(f"{op}: needs a static crop shape, got {x.shape} "
                         "(use tf.ensure_shape before the op)")
    return tuple(int(d) for d in dims)


def prepare_label(label):
    """(label as (D, H, W, 1), whether the caller gave (D, H, W))."""
    label = tf.convert_to_tensor(label)
    squeeze = label.shape.rank == 3
    if squeeze:
        label = label[..., None]
    return label, squeeze


def finish_label(label, squeeze):
    return label[..., 0] if squeeze else label
