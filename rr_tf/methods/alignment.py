"""Where the overlap of two crops lies in each view's feature grid, and
resampling of feature maps over it (PGL's "prior-guided" alignment).

Geometry, per axis (all coordinates continuous, in voxels or cells):

* a view is the crop ``box = (start s, size n)`` of the volume, resized to
  ``c`` voxels with half-pixel centres (``tf.image.resize``), then possibly
  flipped. View coordinate ``u`` in ``[0, c]`` sees volume coordinate
  ``x = s + u * n / c``; a flip maps ``u`` to ``c - u``;
* a feature map at stride ``r`` has ``c / r`` cells; cell ``j`` covers view
  coordinates ``[j r, (j + 1) r]`` (its centre is at grid coordinate
  ``j + 0.5``);
* the overlap of the two boxes, ``[max(s1, s2), min(s1 + n1, s2 + n2)]``,
  is therefore the grid interval ``[(lo - s) c / (n r), (hi - s) c / (n r)]``
  of each view, mirrored (``g -> c / r - g``) on flipped axes.

A *region* is the pair ``(from, to)`` of grid coordinates per axis
(``[..., 2, 3]``): sample ``k`` of a ``G``-point grid over it sits at
``from + (k + 0.5) / G * (to - from)``. On a flipped axis ``from > to``, so
the samples run backwards through the map and sample ``k`` of both views
shows the same volume location: the two resampled maps are aligned voxel
by voxel. Pure functions of boxes and flips (TensorFlow ops, batched over
leading axes), tested against hand-computed cases.
"""

import tensorflow as tf


def overlap_regions(box1, box2, flips1, flips2, crop_size, stride):
    """Grid regions ``(region1, region2)`` of the two boxes' overlap.

    Args:
      box1, box2: int boxes ``[..., 2, 3]`` (start, size) in volume voxels.
      flips1, flips2: ``[..., 3]`` 0/1 flip bits of each view (D, H, W).
      crop_size: the views' size ``(D, H, W)`` (static ints).
      stride: the feature map's stride (int, or 3 ints).

    Returns:
      Two float32 ``[..., 2, 3]`` tensors: ``(from, to)`` per axis in each
      view's feature grid coordinates (a grid of ``crop_size / stride``
      cells spans ``[0, crop_size / stride]``). An empty overlap gives a
      zero-length region at the nearer edge.
    """
    box1 = tf.cast(box1, tf.float32)
    box2 = tf.cast(box2, tf.float32)
    lo = tf.maximum(box1[..., 0, :], box2[..., 0, :])
    hi = tf.minimum(box1[..., 0, :] + box1[..., 1, :], box2[..., 0, :] + box2[..., 1, :])
    hi = tf.maximum(hi, lo)
    return (_to_grid(box1, flips1, lo, hi, crop_size, stride),
            _to_grid(box2, flips2, lo, hi, crop_size, stride))


def _to_grid(box, flips, lo, hi, crop_size, stride):
    crop = tf.constant([float(c) for c in crop_size], tf.float32)
    stride = tf.broadcast_to(tf.cast(stride, tf.float32), [3])
    cells = crop / stride                                   # grid extent c / r
    scale = cells / tf.maximum(box[..., 1, :], 1.0)         # grid cells per volume voxel
    g_lo = (lo - box[..., 0, :]) * scale
    g_hi = (hi - box[..., 0, :]) * scale
    flip = tf.cast(flips, tf.bool)
    start = tf.where(flip, cells - g_lo, g_lo)
    end = tf.where(flip, cells - g_hi, g_hi)
    return tf.stack([start, end], axis=-2)


def region_sample_points(region, grid):
    """Grid coordinates of the ``grid`` samples along each axis: a list of
    three float32 tensors ``[B, grid[a]]`` (``region``: ``[B, 2, 3]``)."""
    out = []
    for a in range(3):
        t = (tf.range(grid[a], dtype=tf.float32) + 0.5) / float(grid[a])     # [G]
        start, end = region[:, 0, a:a + 1], region[:, 1, a:a + 1]          # [B, 1]
        out.append(start + t[None] * (end - start))
    return out


def _linear_along(x, coords, axis):
    """Linear interpolation of ``x`` [B, ...] along ``axis`` at per-sample
    grid coordinates ``coords`` [B, G] (cell centres at ``j + 0.5``; edge
    values repeat beyond the outer centres)."""
    n = x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]
    idx = coords - 0.5
    i0 = tf.floor(idx)
    w = idx - i0
    i0 = tf.cast(i0, tf.int32)
    i1 = tf.clip_by_value(i0 + 1, 0, n - 1)
    i0 = tf.clip_by_value(i0, 0, n - 1)
    a = tf.gather(x, i0, axis=axis, batch_dims=1)
    b = tf.gather(x, i1, axis=axis, batch_dims=1)
    shape = [-1] + [1] * (len(x.shape) - 1)
    shape[axis] = tf.shape(coords)[1]
    w = tf.reshape(tf.cast(w, x.dtype), shape)
    return a + w * (b - a)


def sample_region(fmap, region, grid):
    """Trilinear crop-and-resize of feature maps over regions.

    Args:
      fmap: ``[B, d, h, w, C]`` feature maps.
      region: ``[B, 2, 3]`` grid regions (see :func:`overlap_regions`).
      grid: the output size ``(G_d, G_h, G_w)`` (static ints).

    Returns ``[B, G_d, G_h, G_w, C]`` (differentiable in ``fmap``); the
    grid is axis-aligned, so the trilinear interpolation is done as three
    separable linear passes.
    """
    x = fmap
    points = region_sample_points(tf.cast(region, tf.float32), grid)
    for a in range(3):
        x = _linear_along(x, points[a], axis=a + 1)
    return x


def region_mask(region, size):
    """1 inside the cells a region covers (either orientation), 0 outside:
    float32 ``[B, d, h, w, 1]`` for a map of ``size`` cells (for pictures)."""
    m = None
    for a in range(3):
        lo = tf.minimum(region[:, 0, a], region[:, 1, a])[:, None]
        hi = tf.maximum(region[:, 0, a], region[:, 1, a])[:, None]
        centre = tf.range(size[a], dtype=tf.float32)[None] + 0.5
        inside = tf.cast((centre >= lo) & (centre <= hi), tf.float32)     # [B, n_a]
        shape = [-1, 1, 1, 1]
        shape[a + 1] = size[a]
        inside = tf.reshape(inside, shape)
        m = inside if m is None else m * inside
    return m[..., None]
