"""Gaussian-weighted sliding-window inference over a whole volume.

A segmentation network is trained on crops; a CT scan is larger. The volume
is covered by overlapping windows of the training crop size, each window is
predicted, and the softmax probabilities are blended into one map:

    P(v) = sum_w g_w(v) * p_w(v) / sum_w g_w(v)

where ``g`` is a Gaussian importance map centred on the window (sigma = 1/8
of the window per axis, as nnU-Net), so a voxel trusts the window in which it
sits most centrally (predictions near a window's border see little context).

Memory is bounded: windows are cut, predicted and accumulated ``window_batch``
at a time into a single float32 [D, H, W, C] sum and a [D, H, W] weight sum;
all windows are never held at once. Volumes smaller than the window are
padded (centred) and the pad is removed from the result.

Test-time augmentation (``tta=True``) mirrors each window batch along every
combination of the chosen spatial axes (8 for three axes, as nnU-Net), flips
each output back, and averages the probabilities.

The module is numpy only; ``predict_fn`` may be any callable (a Keras model,
a ``tf.function``, a JAX function) taking float32 [N, d, h, w, 1] windows and
returning logits [N, d, h, w, C]. :func:`keras_predict_fn` wraps a Keras model.
"""

import itertools

import numpy as np


def window_starts(size, window, overlap):
    """Start indices of windows along one axis of length ``size``.

    The first window starts at 0 and the last ends flush with the end
    (``size - window``); the starts in between are evenly spaced with a step
    of at most ``window * (1 - overlap)`` (and at least one voxel), so
    consecutive windows overlap by at least ``overlap`` of the window. When
    the window is at least as large as the axis there is one start, 0 (the
    caller pads the volume).

    Args:
      size: axis length (> 0).
      window: window length (> 0).
      overlap: fraction in [0, 1).

    Returns:
      Sorted list of distinct ints.
    """
    size, window = int(size), int(window)
    if size < 1 or window < 1:
        raise ValueError(f"size and window must be >= 1, got size={size}, window={window}")
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if window >= size:
        return [0]
    span = size - window
    target_step = max(1.0, window * (1.0 - float(overlap)))
    n = int(np.ceil(span / target_step - 1e-9)) + 1
    step = span / (n - 1)
    # floor(x + 0.5) rather than round(): Python rounds halves to even, which
    # could give two equal starts.
    starts = [int(np.floor(i * step + 0.5)) for i in range(n - 1)] + [span]
    return starts


def window_positions(shape, window, overlap):
    """All window corners (i, j, k) for a volume of ``shape`` (already padded
    to at least ``window``), in C order."""
    per_axis = [window_starts(s, w, overlap) for s, w in zip(shape, window)]
    return list(itertools.product(*per_axis))


def gaussian_importance_map(window, sigma_scale=0.125, min_weight=1e-3):
    """Separable Gaussian over a window, max 1, clipped below at ``min_weight``.

    Centred at ``(w - 1) / 2`` on each axis, so the map is symmetric under
    flips (test-time mirroring then sees the same weights). ``sigma = w *
    sigma_scale``. The floor keeps voxels reached only by window corners from
    being averaged with vanishing (badly conditioned) weights.
    """
    window = tuple(int(w) for w in window)
    profiles = []
    for w in window:
        x = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
        sigma = max(w * float(sigma_scale), 1e-6)
        profiles.append(np.exp(-0.5 * (x / sigma) ** 2))
    g = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    g /= g.max()
    return np.maximum(g, float(min_weight)).astype(np.float32)


def flip_combinations(axes=(0, 1, 2)):
    """Every subset of ``axes`` (spatial axes 0..2): ``()`` first, then the
    single flips, pairs, ... (2**len(axes) in all)."""
    axes = tuple(sorted(set(int(a) for a in axes)))
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"flip axes must be spatial axes 0, 1, 2; got {axes}")
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def softmax(logits, axis=-1):
    """Numerically stable softmax in float32."""
    z = np.asarray(logits, np.float32)
    z = z - z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def _as_spatial(volume):
    """[D,H,W], [D,H,W,1] or [1,D,H,W,1] -> float32 [D,H,W]."""
    v = np.asarray(volume)
    if v.ndim == 5:
        if v.shape[0] != 1 or v.shape[-1] != 1:
            raise ValueError(f"a batched volume must be [1, D, H, W, 1], got {v.shape}")
        v = v[0, ..., 0]
    elif v.ndim == 4:
        if v.shape[-1] != 1:
            raise ValueError(f"a 4D volume must be [D, H, W, 1], got {v.shape}")
        v = v[..., 0]
    elif v.ndim != 3:
        raise ValueError(f"volume must be [D,H,W], [D,H,W,1] or [1,D,H,W,1], got {v.shape}")
    return v.astype(np.float32, copy=False)


def _centred_pad(shape, window):
    pads = []
    for s, w in zip(shape, window):
        extra = max(w - s, 0)
        pads.append((extra // 2, extra - extra // 2))
    return pads


def sliding_window_inference(volume, predict_fn, window, *, overlap=0.5, window_batch=4,
                             gaussian=True, sigma_scale=0.125, tta=False, flip_axes=(0, 1, 2),
                             pad_value=0.0, apply_softmax=True, fixed_batch=True, progress=None):
    """Class probabilities for a whole volume.

    Args:
      volume: [D, H, W], [D, H, W, 1] or [1, D, H, W, 1], already normalised
        the way the network was trained (e.g. HU window mapped to [0, 1]).
      predict_fn: callable, float32 [N, d, h, w, 1] -> logits [N, d, h, w, C]
        (numpy, tf or any array convertible by ``np.asarray``).
      window: (d, h, w) window size (the training crop size).
      overlap: fraction of the window shared by neighbouring windows, [0, 1).
      window_batch: windows per ``predict_fn`` call (bounds memory).
      gaussian: Gaussian importance weighting; False = plain averaging.
      sigma_scale: Gaussian sigma as a fraction of the window (nnU-Net 1/8).
      tta: average over mirrorings along every subset of ``flip_axes``.
      flip_axes: spatial axes (0, 1, 2 of the volume) used by ``tta``.
      pad_value: value of the padding added when the volume is smaller than
        the window (0.0 = air for a [0, 1]-normalised HU window).
      apply_softmax: False when ``predict_fn`` already returns probabilities.
      fixed_batch: pad the last batch with zero windows so every call gets
        exactly ``min(window_batch, number of windows)`` windows (a
        ``tf.function`` is then traced once); padded outputs are discarded.
      progress: optional object with ``update(n)`` (e.g.
        ``rr_tf.utils.progress.Progress``), called once per window batch with
        the number of windows done.

    Returns:
      float32 [D, H, W, C] probabilities (each voxel sums to 1 under softmax).
    """
    vol = _as_spatial(volume)
    window = tuple(int(w) for w in window)
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"window must be 3 positive ints, got {window}")
    if int(window_batch) < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    window_batch = int(window_batch)

    pads = _centred_pad(vol.shape, window)
    if any(p != (0, 0) for p in pads):
        vol = np.pad(vol, pads, mode="constant", constant_values=pad_value)
    shape = vol.shape
    positions = window_positions(shape, window, overlap)
    weights = (gaussian_importance_map(window, sigma_scale) if gaussian
               else np.ones(window, np.float32))
    weights_c = weights[..., None]
    flips = flip_combinations(flip_axes) if tta else [()]
    batch = min(window_batch, len(positions))

    acc = None
    weight_sum = np.zeros(shape, np.float32)
    for first in range(0, len(positions), batch):
        corners = positions[first:first + batch]
        slices = [tuple(slice(c, c + w) for c, w in zip(corner, window)) for corner in corners]
        x = np.zeros((batch if fixed_batch else len(corners),) + window + (1,), np.float32)
        for n, sl in enumerate(slices):
            x[n, ..., 0] = vol[sl]
        probs = None
        for flip in flips:
            batch_axes = tuple(a + 1 for a in flip)
            x_in = np.ascontiguousarray(np.flip(x, batch_axes)) if flip else x
            p = _predict(predict_fn, x_in, window)
            p = softmax(p) if apply_softmax else p
            if flip:
                p = np.flip(p, batch_axes)
            probs = p if probs is None else probs + p
        if len(flips) > 1:
            probs /= len(flips)
        if acc is None:
            acc = np.zeros(shape + (probs.shape[-1],), np.float32)
        for n, sl in enumerate(slices):
            acc[sl] += probs[n] * weights_c
            weight_sum[sl] += weights
        if progress is not None:
            progress.update(len(corners))

    acc /= weight_sum[..., None]
    crop = tuple(slice(lo, s - hi) for (lo, hi), s in zip(pads, shape))
    return np.ascontiguousarray(acc[crop])


def _predict(predict_fn, x, window):
    out = predict_fn(x)
    if hasattr(out, "numpy"):
        out = out.numpy()
    out = np.asarray(out)
    if out.ndim != 5 or out.shape[:4] != x.shape[:4]:
        raise ValueError(f"predict_fn returned shape {out.shape} for windows {x.shape}; "
                         f"expected [N, {window[0]}, {window[1]}, {window[2]}, C]")
    return out.astype(np.float32, copy=False)


def probabilities_to_labels(probs):
    """[..., C] probabilities -> uint8 label map (argmax over classes)."""
    probs = np.asarray(probs)
    if probs.shape[-1] > 256:
        raise ValueError(f"{probs.shape[-1]} classes do not fit a uint8 label map")
    return np.argmax(probs, axis=-1).astype(np.uint8)


def keras_predict_fn(model, jit_compile=False):
    """``predict_fn`` for a Keras segmentation model: ``model(x, training=False)``
    inside one ``tf.function`` (traced once with ``fixed_batch=True``), logits
    cast to float32 (mixed-precision models return float16/bfloat16)."""
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile, reduce_retracing=True)
    def predict(x):
        return tf.cast(model(x, training=False), tf.float32)

    return lambda x: predict(tf.convert_to_tensor(x, tf.float32)).numpy()


def sliding_window_graph(volume, predict_fn, window, num_classes, overlap=0.5, sigma_scale=0.125,
                         pad_value=0.0):
    """TensorFlow-graph twin of :func:`sliding_window_inference` (one window
    per iteration, no TTA) for serving signatures whose input size is only
    known at run time. ``volume``: float32 [D, H, W]; returns probabilities
    [D, H, W, num_classes]. The same window starts (:func:`window_starts`)
    and Gaussian weights are used, so both give the same result.

    Each window's weighted probabilities are scatter-added at its corner:
    memory stays O(volume x classes), the windows are never all held at
    once, and every shape inside the loop is the window's, so the function
    also compiles under XLA (``jit_compile``; tested on the exported
    signature)."""
    import tensorflow as tf

    window_t = tf.constant(window, tf.int32)
    shape = tf.shape(volume)
    size = tf.maximum(shape, window_t)
    before = (size - shape) // 2
    pads = tf.stack([before, size - shape - before], axis=1)
    vol = tf.pad(volume, pads, constant_values=pad_value)

    def starts(n, w):
        span = n - w
        target = tf.maximum(1.0, tf.cast(w, tf.float32) * (1.0 - overlap))
        count = tf.cast(tf.math.ceil(tf.cast(span, tf.float32) / target - 1e-9), tf.int32) + 1
        step = tf.cast(span, tf.float32) / tf.cast(tf.maximum(count - 1, 1), tf.float32)
        inner = tf.cast(tf.floor(tf.cast(tf.range(count - 1), tf.float32) * step + 0.5), tf.int32)
        return tf.concat([inner, [span]], 0)

    axes = [starts(size[i], window[i]) for i in range(3)]
    grid = tf.meshgrid(*axes, indexing="ij")
    corners = tf.reshape(tf.stack(grid, axis=-1), [-1, 3])
    weights = tf.constant(gaussian_importance_map(window, sigma_scale))[..., None]
    offsets = tf.stack(tf.meshgrid(*[tf.range(w) for w in window], indexing="ij"), axis=-1)

    def body(i, acc, norm):
        c = corners[i]
        patch = tf.slice(vol, c, window_t)[None, ..., None]
        probs = tf.nn.softmax(tf.cast(predict_fn(patch), tf.float32), axis=-1)[0] * weights
        where = offsets + c  # [w0, w1, w2, 3] voxel indices of the window
        return (i + 1, tf.tensor_scatter_nd_add(acc, where, probs),
                tf.tensor_scatter_nd_add(norm, where, weights))

    acc0 = tf.zeros(tf.concat([size, [num_classes]], 0), tf.float32)
    norm0 = tf.zeros(tf.concat([size, [1]], 0), tf.float32)
    _, acc, norm = tf.while_loop(lambda i, *_: i < tf.shape(corners)[0], body,
                                 (tf.constant(0), acc0, norm0))
    probs = acc / norm
    return tf.slice(probs, tf.concat([before, [0]], 0), tf.concat([shape, [num_classes]], 0))
