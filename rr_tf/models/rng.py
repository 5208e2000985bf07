"""Portable stateless random draws for code inside a train step.

TensorFlow's ``tf.random.stateless_*`` ops do not give the same numbers in
a plain graph and under XLA, even with the algorithm pinned: with the same
Philox key and counter, ``StatelessRandomUniformV2`` and its XLA kernel
return other values on CPU (measured with TF 2.21: up to 0.66 apart for
uniforms in [0, 1)). Masks, key shuffles, mixup weights and decoder-stage
choices drawn that way made a step compiled with ``jit_compile`` (the
default on a GPU or TPU) train on other random choices than the same step
uncompiled, and made "same seed, same run" depend on the compiler.

These draws are a counter-based hash of (seed, index) in plain integer
arithmetic (int64 holding 32-bit words, multiplications split into 16-bit
halves so nothing overflows), which every backend and XLA evaluate bit for
bit alike. The mixer is the "lowbias32" integer hash (a published 32-bit
finaliser with low bias); statistical quality is ample for masks, shuffles
and mixup weights, and no cryptographic claim is made.

``seed``: an int32/int64 pair ``[2]`` (a tensor or a sequence of ints or
scalar tensors), e.g. ``(method seed, optimizer step)``.
"""

import tensorflow as tf

_M32 = 0xFFFFFFFF


def _mul32(x, c):
    """``(x * c) mod 2^32`` for int64 ``x`` in [0, 2^32) and a constant ``c``."""
    lo, hi = tf.bitwise.bitwise_and(x, 0xFFFF), tf.bitwise.right_shift(x, 16)
    part = tf.bitwise.left_shift(hi * (c & 0xFFFF), 16)
    return tf.bitwise.bitwise_and(lo * c + part, _M32)


def _xorshift(x, n):
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, n))


def mix32(x):
    """The lowbias32 integer hash of 32-bit words held in int64."""
    x = _xorshift(tf.bitwise.bitwise_and(x, _M32), 16)
    x = _xorshift(_mul32(x, 0x7FEB352D), 15)
    x = _xorshift(_mul32(x, 0x846CA68B), 16)
    return x


def _keys(seed):
    seed = tf.cast(tf.convert_to_tensor(seed) if not isinstance(seed, (list, tuple))
                   else tf.stack([tf.cast(s, tf.int64) for s in seed]), tf.int64)
    s = tf.bitwise.bitwise_and(seed, _M32)
    k0 = mix32(tf.bitwise.bitwise_xor(s[0], 0x9E3779B9))
    k1 = mix32(tf.bitwise.bitwise_xor(s[1], 0x85EBCA6B) + k0)
    return k0, k1


def bits(shape, seed):
    """int64 tensor of ``shape`` holding uniformly distributed 32-bit words."""
    shape = tf.cast(shape, tf.int64)
    k0, k1 = _keys(seed)
    index = tf.range(tf.reduce_prod(shape), dtype=tf.int64)
    words = mix32(tf.bitwise.bitwise_xor(mix32(tf.bitwise.bitwise_xor(index, k0)), k1))
    return tf.reshape(words, shape)


def uniform(shape, seed, minval=0.0, maxval=1.0, dtype=tf.float32):
    """Floats in ``[minval, maxval)`` (24 random bits, exact in float32)."""
    u = tf.cast(tf.bitwise.right_shift(bits(shape, seed), 8), tf.float32) * (1.0 / (1 << 24))
    return tf.cast(minval + (maxval - minval) * u, dtype)


def uniform_int(shape, seed, minval, maxval):
    """int32 in ``[minval, maxval)`` (``maxval - minval`` well below 2^24)."""
    span = tf.cast(maxval - minval, tf.float32)
    k = tf.cast(tf.floor(uniform(shape, seed) * span), tf.int32)
    return minval + tf.minimum(k, tf.cast(span, tf.int32) - 1)


def fold_in(seed, data):
    """A new seed pair derived from ``seed`` and the integer ``data``."""
    k0, k1 = _keys(seed)
    d = tf.bitwise.bitwise_and(tf.cast(data, tf.int64), _M32)
    return tf.cast(tf.stack([mix32(tf.bitwise.bitwise_xor(k0, d)),
                             mix32(k1 + mix32(d + 0x632BE5AB))]) - (1 << 31), tf.int32)


def normal(shape, seed, stddev=1.0, dtype=tf.float32):
    """Gaussian draws by Box-Muller from two portable uniforms (the same
    uniforms everywhere; log/cos may differ in the last bit between
    backends)."""
    u1 = uniform(shape, fold_in(seed, 1))
    u2 = uniform(shape, fold_in(seed, 2))
    r = tf.sqrt(-2.0 * tf.math.log(1.0 - u1))  # 1 - u1 in (0, 1]
    return tf.cast(stddev * r * tf.cos(6.283185307179586 * u2), dtype)
