"""Models Genesis corruptions (inputs scaled to [0, 1]).

Local pixel shuffling, non-linear (Bezier) intensity mapping, in-painting and
out-painting, and :func:`genesis_corrupt`, their published composition.
Flips are not part of it: apply :func:`random_flip` to input and target alike
before corrupting.
"""

import tensorflow as tf

from rr_tf.data.augment._common import (
    as_seed, coin, random_apply, randint, static_spatial_shape, sub_seed, uniform)


def _strides(shape):
    return tf.constant([shape[1] * shape[2], shape[2], 1], tf.int32)


def _empty_boxes(n):
    return tf.zeros([n, 6], tf.int32)


# ---------------------------------------------------- local pixel shuffling
def local_pixel_shuffle(x, seed, p=0.5, num_blocks=None, max_block=None,
                        return_blocks=False):
    """Permute the voxels inside many small non-overlapping blocks.

    Each block's size is drawn per axis in [1, max_block] (default: a tenth
    of the crop size on that axis, at least 1), as in Models Genesis. To
    vectorise without overlaps, the crop is tiled by cells of ``max_block``
    (grid offset random per call) and each used cell holds one block of its
    own random size at a random place inside the cell. The cells are cut out
    with a roll + reshape + transpose (no scatter), the voxels of each block
    are permuted by an argsort of random keys (other voxels of the cell stay
    put) with one batched gather, and everything is put back.
    ``num_blocks=None`` uses every cell (about ``voxels / prod(max_block)``
    blocks: 810 on 64x64x32), an int that many random cells. Applied with
    probability ``p``.

    Returns ``x`` or, with ``return_blocks``, ``(x, blocks)``: int32 (K, 6)
    ``[d0, h0, w0, d1, h1, w1)`` (all zero when not applied).
    """
    seed = as_seed(seed)
    x = tf.convert_to_tensor(x)
    shape = static_spatial_shape(x, "local_pixel_shuffle")
    if max_block is None:
        bmax = tuple(max(1, n // 10) for n in shape)
    else:
        bmax = tuple(max(1, min(int(b), n)) for b, n in zip(max_block, shape))
    cells = tuple((n - b + 1) // b for n, b in zip(shape, bmax))
    k_all = cells[0] * cells[1] * cells[2]
    k = k_all if num_blocks is None else max(1, min(int(num_blocks), k_all))
    n_loc = bmax[0] * bmax[1] * bmax[2]
    region = tuple(c * b for c, b in zip(cells, bmax))
    bmax_t = tf.constant(bmax, tf.int32)

    def fn(v, _):
        ch = v.shape[3] if v.shape[3] is not None else tf.shape(v)[3]
        offset = randint(sub_seed(seed, 1), [3], 0, bmax_t - 1)
        size = randint(sub_seed(seed, 3), [k_all, 3], 1, bmax_t)
        shift = randint(sub_seed(seed, 4), [k_all, 3], 0, bmax_t - size)
        if k < k_all:
            order = tf.argsort(tf.random.stateless_uniform([k_all], sub_seed(seed, 2)))
            used = tf.math.invert_permutation(order) < k
            size = tf.where(used[:, None], size, 0)
            ids = order[:k]
        else:
            ids = tf.range(k_all)
        # which local slots (row-major in the cell) belong to the block
        ld, lh, lw = tf.meshgrid(tf.range(bmax[0]), tf.range(bmax[1]), tf.range(bmax[2]),
                                 indexing="ij")
        local = tf.reshape(tf.stack([ld, lh, lw], -1), [1, n_loc, 3])
        valid = tf.reduce_all((local >= shift[:, None]) & (local < (shift + size)[:, None]),
                              axis=-1)                                       # (K, P)
        # src: the block's slots in random order, then the other slots in
        # order; inv puts each back at its own slot, so perm only permutes
        # slots inside the block.
        rank = tf.cast(tf.range(n_loc), tf.float32)[None] / n_loc
        keys = tf.random.stateless_uniform([k_all, n_loc], sub_seed(seed, 5))
        src = tf.argsort(tf.where(valid, keys, 2.0 + rank), axis=-1)
        vi = tf.cast(valid, tf.int32)
        nvalid = tf.reduce_sum(vi, -1, keepdims=True)
        inv = tf.where(valid, tf.cumsum(vi, -1) - 1, nvalid + tf.cumsum(1 - vi, -1) - 1)
        perm = tf.gather(src, inv, batch_dims=1)                             # (K, P)
        # cut the cells out: roll the grid to the origin, reshape to blocks
        rolled = tf.roll(v, -offset, axis=[0, 1, 2])
        reg = rolled[:region[0], :region[1], :region[2]]
        blk = tf.reshape(reg, [cells[0], bmax[0], cells[1], bmax[1], cells[2], bmax[2], ch])
        blk = tf.reshape(tf.transpose(blk, [0, 2, 4, 1, 3, 5, 6]), [k_all, n_loc, ch])
        blk = tf.gather(blk, perm, batch_dims=1)
        blk = tf.reshape(blk, [cells[0], cells[1], cells[2], bmax[0], bmax[1], bmax[2], ch])
        reg = tf.reshape(tf.transpose(blk, [0, 3, 1, 4, 2, 5, 6]), list(region) + [ch])
        reg = tf.concat([reg, rolled[:region[0], :region[1], region[2]:]], 2)
        reg = tf.concat([reg, rolled[:region[0], region[1]:]], 1)
        out = tf.roll(tf.concat([reg, rolled[region[0]:]], 0), offset, axis=[0, 1, 2])
        cell = tf.stack([ids // (cells[1] * cells[2]), (ids // cells[2]) % cells[1],
                         ids % cells[2]], -1)
        start = offset + cell * bmax_t + tf.gather(shift, ids)
        return out, tf.concat([start, start + tf.gather(size, ids)], -1)

    out, blocks = random_apply(fn, p, sub_seed(seed, 0), x, _empty_boxes(k))
    out = tf.ensure_shape(out, x.shape)
    return (out, blocks) if return_blocks else out


# ------------------------------------------------------- non-linear (Bezier)
def bezier_lut(seed, invert_p=0.5, size=1024, samples=2048):
    """A random monotone intensity map of [0, 1] as a (size,) lookup table.

    A cubic Bezier curve through (0, 0) and (1, 1) with two control points
    uniform in the unit square, sampled at ``samples`` values of t; its x and
    y samples are each sorted (so the map is monotone even when the curve is
    not a function), then resampled on a uniform grid. With probability
    ``invert_p`` the y values are reversed (decreasing map, 0 -> 1, 1 -> 0),
    as the published code does half of the time.
    """
    seed = as_seed(seed)
    cp = uniform(sub_seed(seed, 1), [2, 2], 0.0, 1.0)
    t = tf.linspace(0.0, 1.0, samples)
    b1 = 3.0 * t * tf.square(1.0 - t)
    b2 = 3.0 * tf.square(t) * (1.0 - t)
    b3 = t * t * t
    xs = tf.sort(b1 * cp[0, 0] + b2 * cp[1, 0] + b3)
    ys = tf.sort(b1 * cp[0, 1] + b2 * cp[1, 1] + b3)
    ys = tf.where(coin(sub_seed(seed, 2), invert_p), tf.reverse(ys, [0]), ys)
    grid = tf.linspace(0.0, 1.0, size)
    i1 = tf.clip_by_value(tf.searchsorted(xs, grid, side="right"), 1, samples - 1)
    x0, x1 = tf.gather(xs, i1 - 1), tf.gather(xs, i1)
    y0, y1 = tf.gather(ys, i1 - 1), tf.gather(ys, i1)
    w = tf.clip_by_value((grid - x0) / tf.maximum(x1 - x0, 1e-12), 0.0, 1.0)
    return y0 + w * (y1 - y0)


def apply_lut(x, lut):
    """Map values of ``x`` (clipped to [0, 1]) through a uniform-grid table."""
    x = tf.convert_to_tensor(x)
    n = lut.shape[0]
    v = tf.clip_by_value(tf.cast(x, tf.float32), 0.0, 1.0) * float(n - 1)
    i0 = tf.minimum(tf.cast(tf.floor(v), tf.int32), n - 2)
    f = v - tf.cast(i0, tf.float32)
    lo = tf.gather(lut, i0)
    hi = tf.gather(lut, i0 + 1)
    return tf.cast(lo + f * (hi - lo), x.dtype)


def nonlinear_bezier(x, seed, p=0.9, invert_p=0.5):
    """Models Genesis non-linear transformation (see :func:`bezier_lut`),
    applied with probability ``p``. Output stays in [0, 1]."""
    seed = as_seed(seed)

    def fn(v):
        return apply_lut(v, bezier_lut(sub_seed(seed, 1), invert_p))

    return random_apply(fn, p, sub_seed(seed, 0), tf.convert_to_tensor(x))


# ----------------------------------------------------------------- painting
def _paint_boxes(seed, shape, max_boxes, frac, continue_p, first_always):
    """(max_boxes, 6) boxes ``[d0, h0, w0, d1, h1, w1)``; box j is used when
    the first j+1 draws (j for ``first_always``) are < continue_p, else it is
    empty (d1 = d0, ...). Sizes per axis in [floor(lo n), floor(hi n)],
    placed at least 3 voxels from the border when the crop allows it."""
    lo_s = [max(1, int(frac[0] * n)) for n in shape]
    hi_s = [max(l, min(n, int(frac[1] * n))) for l, n in zip(lo_s, shape)]
    margin = [max(0, min(3, (n - h) // 2)) for n, h in zip(shape, hi_s)]
    size = randint(sub_seed(seed, 1), [max_boxes, 3], tf.constant(lo_s), tf.constant(hi_s))
    n_t = tf.constant(shape, tf.int32)
    m_t = tf.constant(margin, tf.int32)
    start = randint(sub_seed(seed, 2), [max_boxes, 3], m_t, n_t - size - m_t)
    go = tf.random.stateless_uniform([max_boxes], sub_seed(seed, 3)) < continue_p
    if first_always:
        go = tf.concat([[True], go[1:]], 0)
    active = tf.cast(tf.math.cumprod(tf.cast(go, tf.int32)), tf.bool)
    size = tf.where(active[:, None], size, 0)
    return tf.concat([start, start + size], -1)


def boxes_mask(boxes, shape):
    """Bool (D, H, W) union of ``[start, end)`` boxes (K, 6)."""
    masks = []
    for ax in range(3):
        r = tf.range(shape[ax])[None]
        masks.append((r >= boxes[:, ax, None]) & (r < boxes[:, ax + 3, None]))
    m = masks[0][:, :, None, None] & masks[1][:, None, :, None] & masks[2][:, None, None, :]
    return tf.reduce_any(m, axis=0)


def _noise(seed, x):
    shape = tf.concat([tf.shape(x)[:3], [1]], 0)
    return tf.cast(tf.random.stateless_uniform(shape, seed), x.dtype)


def inpaint(x, seed, p=1.0, max_boxes=5, size=(1.0 / 6.0, 1.0 / 3.0), continue_p=0.95,
            return_boxes=False):
    """Models Genesis in-painting: up to ``max_boxes`` boxes (each side a
    ``size`` fraction of the crop's) are filled with U(0, 1) noise (same
    noise on every channel); box j+1 is drawn only if box j was, each with
    probability ``continue_p``. Applied with probability ``p``. Returns ``x``
    or ``(x, boxes)`` (see :func:`_paint_boxes`; all zero when not applied)."""
    return _paint(x, seed, p, max_boxes, size, continue_p, return_boxes, keep_boxes=False)


def outpaint(x, seed, p=1.0, max_boxes=5, size=(3.0 / 7.0, 4.0 / 7.0), continue_p=0.95,
             return_boxes=False):
    """Models Genesis out-painting: everything becomes U(0, 1) noise except
    1 to ``max_boxes`` inner boxes (each side a ``size`` fraction of the
    crop's) that keep the original; the first box always, each further one
    with probability ``continue_p`` if the previous one was drawn. Applied
    with probability ``p``. Returns ``x`` or ``(x, boxes)``."""
    return _paint(x, seed, p, max_boxes, size, continue_p, return_boxes, keep_boxes=True)


def _paint(x, seed, p, max_boxes, size, continue_p, return_boxes, keep_boxes):
    """In-painting (``keep_boxes=False``: noise inside the boxes) or
    out-painting (``keep_boxes=True``: noise outside them)."""
    seed = as_seed(seed)
    x = tf.convert_to_tensor(x)
    shape = static_spatial_shape(x, "outpaint" if keep_boxes else "inpaint")

    def fn(v, _):
        boxes = _paint_boxes(sub_seed(seed, 1), shape, max_boxes, size, continue_p, keep_boxes)
        inside = boxes_mask(boxes, shape)[..., None]
        noise = _noise(sub_seed(seed, 2), v)
        return (tf.where(inside, v, noise) if keep_boxes else tf.where(inside, noise, v)), boxes

    out, boxes = random_apply(fn, p, sub_seed(seed, 0), x, _empty_boxes(max_boxes))
    out = tf.ensure_shape(out, x.shape)
    return (out, boxes) if return_boxes else out


# -------------------------------------------------------------- composition
def genesis_corrupt(x, seed, shuffle_p=0.5, nonlinear_p=0.9, paint_p=0.9, outpaint_p=0.8):
    """The published Models Genesis input corruption, in order: local pixel
    shuffling (p 0.5), non-linear Bezier mapping (p 0.9), painting (p 0.9):
    out-painting with probability 0.8 else in-painting. Flips are left to
    the caller (they apply to the target too). Returns the corrupted x."""
    seed = as_seed(seed)
    x = tf.convert_to_tensor(x)
    x = local_pixel_shuffle(x, sub_seed(seed, 1), p=shuffle_p)
    x = nonlinear_bezier(x, sub_seed(seed, 2), p=nonlinear_p)
    paint = tf.random.stateless_uniform([2], sub_seed(seed, 3))
    branch = tf.where(paint[0] < paint_p, tf.where(paint[1] < outpaint_p, 2, 1), 0)
    s = sub_seed(seed, 4)
    out = tf.switch_case(branch, [lambda: x, lambda: inpaint(x, s), lambda: outpaint(x, s)])
    return tf.ensure_shape(out, x.shape)
