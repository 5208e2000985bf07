"""Crop samplers that return the crop *and its box* (TensorFlow graph ops).

A box is an int32 tensor of shape [2, 3]: ``box[0]`` = start voxel,
``box[1]`` = size, in the stored (canonical RAS) voxel grid of the volume.
Boxes are what PGL needs to map the overlap of two views, and what PCRLv2
needs to draw local crops inside the union of its two global crops.

All randomness is stateless: every sampler takes ``seed`` (int32/int64
tensor of shape [2]) so a stream is reproducible under a seed.
"""

import tensorflow as tf

_MAX_PAIR_TRIES = 64
PAD_HU = -1000  # what HU crops read outside the volume: air


def _split(seed, n):
    return tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), n))


def _uniform_int(seed, lo, hi_exclusive):
    """Per-axis uniform integers in [lo, hi) (int32 tensors of shape [3])."""
    lo = tf.cast(lo, tf.int32)
    hi = tf.maximum(tf.cast(hi_exclusive, tf.int32), lo + 1)
    u = tf.random.stateless_uniform([3], seed, dtype=tf.float32)
    return lo + tf.minimum(tf.cast(u * tf.cast(hi - lo, tf.float32), tf.int32), hi - lo - 1)


def make_box(start, size):
    return tf.stack([tf.cast(start, tf.int32), tf.cast(size, tf.int32)])


def box_volume(box):
    """Voxel count of a box [..., 2, 3] (float32 [...])."""
    return tf.reduce_prod(tf.cast(box[..., 1, :], tf.float32), axis=-1)


def box_intersection(a, b):
    """Intersection of boxes [..., 2, 3] (broadcasting); empty -> size 0."""
    lo = tf.maximum(a[..., 0, :], b[..., 0, :])
    hi = tf.minimum(a[..., 0, :] + a[..., 1, :], b[..., 0, :] + b[..., 1, :])
    return tf.stack([lo, tf.maximum(hi - lo, 0)], axis=-2)


def union_box(a, b):
    """Smallest box containing both boxes."""
    lo = tf.minimum(a[..., 0, :], b[..., 0, :])
    hi = tf.maximum(a[..., 0, :] + a[..., 1, :], b[..., 0, :] + b[..., 1, :])
    return tf.stack([lo, hi - lo], axis=-2)


def iou3d(a, b):
    """Intersection over union of boxes [..., 2, 3] (broadcasting, float32)."""
    inter = box_volume(box_intersection(a, b))
    return inter / (box_volume(a) + box_volume(b) - inter)


def random_box(volume_shape, size, seed, within=None):
    """A box of ``size`` at a uniform position inside ``within`` (default:
    the whole volume). If the region is smaller than ``size`` along an axis
    the box starts at the region's start (crop() pads)."""
    volume_shape = tf.cast(volume_shape, tf.int32)
    size = tf.cast(size, tf.int32)
    within = make_box(tf.zeros([3], tf.int32), volume_shape) if within is None else within
    room = tf.maximum(within[1] - size + 1, 1)
    start = within[0] + _uniform_int(seed, tf.zeros([3], tf.int32), room)
    return make_box(start, size)


def foreground_box(volume, size, seed, threshold, stride=4):
    """A box of ``size`` centred (where possible) on a random voxel whose
    value exceeds ``threshold`` (e.g. the body rather than air), sampled on
    a ``stride``-subsampled grid; uniform when no voxel qualifies."""
    volume = tf.convert_to_tensor(volume)
    shape = tf.shape(volume)[:3]
    size = tf.cast(size, tf.int32)
    s_pick, s_fallback = _split(seed, 2)
    coarse = volume[::stride, ::stride, ::stride]
    if coarse.shape.rank == 4:
        coarse = coarse[..., 0]
    idx = tf.cast(tf.where(coarse > threshold), tf.int32) * stride
    n = tf.shape(idx)[0]

    def centred():
        k = tf.random.stateless_uniform([], s_pick, 0, n, dtype=tf.int32)
        start = tf.clip_by_value(idx[k] - size // 2, 0, tf.maximum(shape - size, 0))
        return make_box(start, size)

    return tf.cond(n > 0, centred, lambda: random_box(shape, size, s_fallback))


def crop(volume, box, pad_value=0.0):
    """The voxels of ``box`` from ``volume`` ([D,H,W] or [D,H,W,C]); parts of
    the box outside the volume are filled with ``pad_value``."""
    volume = tf.convert_to_tensor(volume)
    shape = tf.shape(volume)
    rank = volume.shape.rank
    lo = tf.maximum(box[0], 0)
    hi = tf.minimum(box[0] + box[1], shape[:3])
    size = tf.maximum(hi - lo, 0)
    begin = tf.concat([lo, tf.zeros([rank - 3], tf.int32)], 0)
    extent = tf.concat([size, shape[3:]], 0)
    part = tf.slice(volume, begin, extent)
    before = lo - box[0]
    after = box[1] - size - before
    pads = tf.stack([before, after], axis=1)
    pads = tf.concat([pads, tf.zeros([rank - 3, 2], tf.int32)], 0)
    out = tf.pad(part, pads, constant_values=tf.cast(pad_value, volume.dtype))
    static = [None] * rank
    return tf.ensure_shape(out, static)


def resize3d(x, out_size, method="bilinear"):
    """Resizes [D,H,W,C] to ``out_size`` (D',H',W') with separable
    (bi/tri)linear or nearest interpolation (two tf.image.resize passes)."""
    d, h, w = out_size
    x = tf.image.resize(x, [h, w], method=method)            # [D, h, w, C]
    x = tf.transpose(x, [1, 0, 2, 3])                        # [h, D, w, C]
    x = tf.image.resize(x, [d, w], method=method)            # [h, d, w, C]
    return tf.transpose(x, [1, 0, 2, 3])                     # [d, h, w, C]


def crop_resize(volume, box, out_size, method="bilinear", pad_value=0.0, scale=None):
    """Crop ``box``, apply ``scale`` (e.g. the stream's HU -> network units,
    on the crop rather than the whole volume) or cast to float32, then
    resize to ``out_size`` (static ints)."""
    x = crop(volume, box, pad_value)
    if x.shape.rank == 3:
        x = x[..., None]
    x = scale(x) if scale is not None else tf.cast(x, tf.float32)
    x = resize3d(x, out_size, method)
    return tf.ensure_shape(x, list(out_size) + [x.shape[-1]])


def global_pair_boxes(volume_shape, sizes, min_iou, seed):
    """Two boxes whose 3D IoU is at least ``min_iou``.

    Each box's size is drawn from ``sizes`` (int tensor [N, 3]); ``_MAX_PAIR_TRIES``
    candidates for the second box are drawn at once and the first one above
    ``min_iou`` is taken (the best one if none is; if even that is below,
    the second box is the first one, IoU 1, so the guarantee always holds).
    """
    volume_shape = tf.cast(volume_shape, tf.int32)
    sizes = tf.convert_to_tensor(sizes, tf.int32)
    s_size1, s_box1, s_size2, s_box2 = _split(seed, 4)
    n = tf.shape(sizes)[0]
    size1 = sizes[tf.random.stateless_uniform([], s_size1, 0, n, dtype=tf.int32)]
    size1 = tf.minimum(size1, volume_shape)
    box1 = random_box(volume_shape, size1, s_box1)
    k = tf.random.stateless_uniform([_MAX_PAIR_TRIES], s_size2, 0, n, dtype=tf.int32)
    cand_sizes = tf.minimum(tf.gather(sizes, k), volume_shape[None])
    # second boxes: positioned so they overlap box1 (start within +-size of box1)
    lo = tf.maximum(box1[0][None] - cand_sizes + 1, 0)
    hi = tf.minimum(box1[0][None] + box1[1][None], volume_shape[None] - cand_sizes + 1)
    u = tf.random.stateless_uniform([_MAX_PAIR_TRIES, 3], s_box2)
    starts = lo + tf.cast(u * tf.cast(tf.maximum(hi - lo, 1), tf.float32), tf.int32)
    starts = tf.minimum(starts, tf.maximum(hi - 1, lo))
    cands = tf.stack([starts, cand_sizes], axis=1)  # [T, 2, 3]
    ious = iou3d(box1[None], cands)
    ok = ious >= min_iou
    first_ok = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
    best = tf.argmax(ious, output_type=tf.int32)
    pick = tf.where(tf.reduce_any(ok), first_ok, best)
    box2 = tf.where(ious[pick] >= min_iou, cands[pick], box1)
    return box1, box2


def local_boxes(container, num, sizes, seed):
    """``num`` boxes, each fully inside ``container`` (when it fits), sizes
    drawn from ``sizes`` ([N, 3]). Returns int32 [num, 2, 3]."""
    sizes = tf.convert_to_tensor(sizes, tf.int32)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num)

    def one(s):
        s_size, s_pos = tf.unstack(tf.random.experimental.stateless_split(s, 2))
        size = sizes[tf.random.stateless_uniform([], s_size, 0, tf.shape(sizes)[0], dtype=tf.int32)]
        size = tf.minimum(size, container[1])
        return random_box(container[0] + container[1], size, s_pos, within=container)

    return tf.map_fn(one, seeds, fn_output_signature=tf.int32)
