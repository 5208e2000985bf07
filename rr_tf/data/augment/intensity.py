"""torchio-like intensity augmentations (images only), as used by PCRL/PCRLv2.

The ops' defaults follow torchio's (each transform applied with p = 1):
blur sigma in [0, 2] per axis, noise std in [0, 0.25], log-gamma in
[-0.3, 0.3], swap of 100 patch pairs. Values are not clipped. The recipes
(``rr_tf.data.recipes``) choose the probabilities: PCRL and PCRLv2 use
torchio's p = 1 as their reference code does (PCRLv2 then z-normalises every
input); the two-view recipes of MoCo, SimCLR, RepRec, PGL and the multi-task
method keep p = 0.5 (an rr_tf choice; no reference code prescribes theirs).
"""

import math

import tensorflow as tf

from rr_tf.data.augment._common import (
    as_seed, random_apply, randint, static_spatial_shape, sub_seed, uniform)


# --------------------------------------------------------------------- blur
def _reflect(i, n):
    """scipy 'reflect' (d c b a | a b c d | d c b a) for |overshoot| <= n."""
    i = tf.where(i < 0, -i - 1, i)
    return tf.where(i >= n, 2 * n - 1 - i, i)


def gaussian_matrix(n, sigma, radius):
    """(n, n) matrix applying a normalised 1D Gaussian (truncated at
    ``radius``) with reflected borders: ``out = M @ in`` along one axis.
    sigma 0 gives the identity."""
    offs = tf.range(-radius, radius + 1)
    d = tf.cast(offs, tf.float32) / tf.maximum(tf.cast(sigma, tf.float32), 1e-6)
    w = tf.exp(-0.5 * tf.square(d))
    w = w / tf.reduce_sum(w)
    src = _reflect(tf.range(n)[:, None] + offs[None, :], n)            # (n, taps)
    return tf.reduce_sum(tf.one_hot(src, n, dtype=tf.float32) * w[None, :, None], axis=1)


def blur(x, sigmas, truncate=3.0, max_sigma=2.0):
    """Separable Gaussian blur of (D, H, W, C) ``x`` with per-axis ``sigmas``
    (float tensor [3], each <= ``max_sigma``): three small dense matmuls
    (one banded (n, n) matrix per axis), much faster on CPU than 1-channel
    Conv3D."""
    x = tf.convert_to_tensor(x)
    shape = static_spatial_shape(x, "gaussian_blur")
    dtype = x.dtype
    r = int(math.ceil(truncate * float(max_sigma)))
    m = [gaussian_matrix(n, sigmas[ax], min(r, n - 1)) for ax, n in enumerate(shape)]
    out = tf.einsum("ad,dhwc->ahwc", m[0], tf.cast(x, tf.float32))
    out = tf.einsum("bh,ahwc->abwc", m[1], out)
    out = tf.einsum("cw,ahwk->ahck", m[2], out)
    return tf.ensure_shape(tf.cast(out, dtype), x.shape)


def gaussian_blur(x, seed, sigma=(0.0, 2.0), p=1.0, truncate=3.0):
    """Blur with per-axis sigma ~ U(sigma) (voxels), as torchio ``RandomBlur``.

    Kernel truncated at ``truncate`` sigmas, 'reflect' borders (a constant
    volume stays constant). Applied with probability ``p``.
    """
    seed = as_seed(seed)
    lo, hi = float(sigma[0]), float(sigma[1])

    def fn(v):
        return blur(v, uniform(sub_seed(seed, 1), [3], lo, hi), truncate, max_sigma=hi)

    return random_apply(fn, p, sub_seed(seed, 0), tf.convert_to_tensor(x))


# -------------------------------------------------------------------- noise
def gaussian_noise(x, seed, std=(0.0, 0.25), mean=0.0, p=1.0):
    """Add N(mean, s^2) noise with s ~ U(std), as torchio ``RandomNoise``."""
    seed = as_seed(seed)
    x = tf.convert_to_tensor(x)

    def fn(v):
        s = uniform(sub_seed(seed, 1), [], float(std[0]), float(std[1]))
        n = tf.random.stateless_normal(tf.shape(v), sub_seed(seed, 2), dtype=tf.float32)
        return v + tf.cast(mean + s * n, v.dtype)

    return random_apply(fn, p, sub_seed(seed, 0), x)


# -------------------------------------------------------------------- gamma
def gamma(x, g):
    """``x ** g`` on the volume's own [min, max] range (mapped to [0, 1] and
    back), so min and max are kept exactly; a constant volume is unchanged."""
    x = tf.convert_to_tensor(x)
    lo = tf.reduce_min(x)
    hi = tf.reduce_max(x)
    span = hi - lo
    safe = tf.where(span > 0, span, tf.ones_like(span))
    y = lo + span * tf.pow((x - lo) / safe, tf.cast(g, x.dtype))
    y = tf.where(x >= hi, hi, y)
    return tf.where(x <= lo, lo, y)


def random_gamma(x, seed, log_gamma=(-0.3, 0.3), p=1.0):
    """Gamma with ``log(gamma) ~ U(log_gamma)``, as torchio ``RandomGamma``."""
    seed = as_seed(seed)

    def fn(v):
        return gamma(v, tf.exp(uniform(sub_seed(seed, 1), [], float(log_gamma[0]),
                                       float(log_gamma[1]))))

    return random_apply(fn, p, sub_seed(seed, 0), tf.convert_to_tensor(x))


# ------------------------------------------------------- contrast, tissue
def random_contrast(x, seed, factor=(0.75, 1.25), p=1.0):
    """Scale the deviation from the crop's mean by ``f ~ U(factor)`` (the
    mean is kept), as nnU-Net's contrast augmentation."""
    seed = as_seed(seed)

    def fn(v):
        mean = tf.reduce_mean(v)
        return mean + (v - mean) * uniform(sub_seed(seed, 1), [], float(factor[0]),
                                           float(factor[1]))

    return random_apply(fn, p, sub_seed(seed, 0), tf.convert_to_tensor(x))


def label_offsets(x, label, seed, max_shift, num_values=256, p=1.0):
    """Add one offset ``~ U(-max_shift, max_shift)`` per label value to the
    voxels of that value (background, 0, is never shifted): the organs'
    intensities move independently of each other, as they do between
    contrast phases (a kidney is about 30 HU native, 165 HU portal-venous),
    so a segmenter trained on one phase must rely on shape and context.
    ``x`` (D, H, W, C) and ``label`` (D, H, W) integer values in
    [0, num_values)."""
    seed = as_seed(seed)
    x = tf.convert_to_tensor(x)

    def fn(v):
        shifts = uniform(sub_seed(seed, 1), [num_values], -float(max_shift), float(max_shift))
        shifts = tf.concat([tf.zeros([1]), shifts[1:]], 0)
        return v + tf.cast(tf.gather(shifts, tf.cast(label, tf.int32)), v.dtype)[..., None]

    return random_apply(fn, p, sub_seed(seed, 0), x)


# --------------------------------------------------------------- patch swap
_SWAP_UNROLL = 10


def patch_swap(x, seed, patch=(8, 4, 4), num_swaps=100, p=1.0):
    """Swap ``num_swaps`` pairs of random ``patch``-sized boxes, one pair after
    the other (torchio ``RandomSwap``). A pair whose two boxes overlap is
    skipped, so the output is always a permutation of the input voxels.

    Implemented on an int32 index map (a while loop over chunks of 10
    unrolled swaps, each two small gathers and one scatter), followed by one
    gather of the image.
    """
    seed = as_seed(seed)
    x = tf.convert_to_tensor(x)
    shape = static_spatial_shape(x, "patch_swap")
    patch = tuple(min(int(a), n) for a, n in zip(patch, shape))
    num_swaps = int(num_swaps)
    if num_swaps <= 0:
        return x

    chunk = min(num_swaps, _SWAP_UNROLL)
    steps = -(-num_swaps // chunk)

    def fn(v):
        n_vox = shape[0] * shape[1] * shape[2]
        strides = tf.constant([shape[1] * shape[2], shape[2], 1], tf.int32)
        pd, ph, pw = tf.meshgrid(tf.range(patch[0]), tf.range(patch[1]), tf.range(patch[2]),
                                 indexing="ij")
        offs = tf.reshape(pd * strides[0] + ph * strides[1] + pw, [-1])
        top = tf.constant([n - a for n, a in zip(shape, patch)], tf.int32)
        s1 = randint(sub_seed(seed, 1), [num_swaps, 3], 0, top)
        s2 = randint(sub_seed(seed, 2), [num_swaps, 3], 0, top)
        overlap = tf.reduce_all(tf.abs(s1 - s2) < tf.constant(patch, tf.int32), axis=-1)
        b1 = tf.reduce_sum(s1 * strides, -1)
        # an overlapping pair (and the padding up to a whole number of
        # chunks) swaps a patch with itself: a no-op
        b2 = tf.where(overlap, b1, tf.reduce_sum(s2 * strides, -1))
        pad = [[0, steps * chunk - num_swaps]]
        b1 = tf.reshape(tf.pad(b1, pad), [steps, chunk])
        b2 = tf.reshape(tf.pad(b2, pad), [steps, chunk])

        def body(i, idx):
            # ``chunk`` swaps unrolled per loop step (loop steps are costly)
            for j in range(chunk):
                l1 = b1[i, j] + offs
                l2 = b2[i, j] + offs
                v1 = tf.gather(idx, l1)
                v2 = tf.gather(idx, l2)
                idx = tf.tensor_scatter_nd_update(idx, tf.concat([l1, l2], 0)[:, None],
                                                  tf.concat([v2, v1], 0))
            return i + 1, idx

        _, perm = tf.while_loop(lambda i, _: i < steps, body,
                                (tf.constant(0), tf.range(n_vox)))
        flat = tf.reshape(v, [n_vox, -1])
        return tf.reshape(tf.gather(flat, perm), tf.shape(v))

    out = random_apply(fn, p, sub_seed(seed, 0), x)
    return tf.ensure_shape(out, x.shape)


# ---------------------------------------------------------------- z-norm
def z_normalize(x, eps=1e-6):
    """``(x - mean) / std`` over the whole crop (std floored at ``eps``)."""
    x = tf.convert_to_tensor(x)
    mean, var = tf.nn.moments(x, axes=list(range(x.shape.rank)))
    return (x - mean) / tf.maximum(tf.sqrt(var), eps)
