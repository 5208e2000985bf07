"""Models Genesis corruptions (inputs scaled to [0, 1]).

Local pixel shuffling, non-linear (Bezier) intensity mapping, in-painting and
out-painting, and :func:`genesis_corrupt`, their published composition.
Flips are not part of it: apply :func:`random_flip` to input and target alike
before corrupting.
"""

import numpy as np
import tensorflow as tf

from rr_tf.data.augment._common import (
    as_seed, coin, random_apply, randint, static_spatial_shape, sub_seed, uniform)


def _strides(shape):
    return tf.constant([shape[1] * shape[2], shape[2], 1], tf.int32)


def _empty_boxes(n):
    return tf.zeros([n, 6], tf.int32)


# ---------------------------------------------------- local pixel shuffling
REFERENCE_WINDOWS = 10000  # windows the Models Genesis code draws per crop


def local_pixel_shuffle(x, seed, p=0.5, num_windows=REFERENCE_WINDOWS, max_block=None,
                        return_blocks=False):
    """Models Genesis local pixel shuffling: ``num_windows`` small windows,
    each of a random size per axis in [1, max_block] (default: a tenth of
    the crop on that axis, at least 1) at a random place; the voxels of each
    window are replaced by the *original* voxels of that window in random
    order, later windows overwriting earlier ones where they overlap (as the
    reference code, which shuffles 10 000 windows of the unchanged input
    into a copy: about 82 % of a 64x64x32 crop ends up inside a window).

    Vectorised in rounds: a round tiles the crop with cells of ``max_block``
    (grid offset random per round) and holds one window of random size at a
    random place in each cell it uses, so a round's windows never overlap
    and are cut out with a roll + reshape + transpose (no scatter); the
    voxels of each window are permuted by an argsort of random keys (other
    voxels of the cell stay put) with one batched gather. ``num_windows``
    stand for as many rounds as give the same expected coverage as
    ``num_windows`` reference windows (:func:`rounds_matching`: 18 rounds of
    810 windows on 64x64x32, 82 % covered); every round reads the original
    crop, and a voxel takes the value of the last round whose window covers
    it. All rounds are computed at once by index arithmetic and the crop is
    gathered once. Applied with probability ``p``.

    Returns ``x`` or, with ``return_blocks``, ``(x, blocks)``: int32 (K, 6)
    ``[d0, h0, w0, d1, h1, w1)`` in round order (all zero when not applied).
    """
    seed = as_seed(seed)
    x = tf.convert_to_tensor(x)
    shape = static_spatial_shape(x, "local_pixel_shuffle")
    if max_block is None:
        bmax = tuple(max(1, n // 10) for n in shape)
    else:
        bmax = tuple(max(1, min(int(b), n)) for b, n in zip(max_block, shape))
    cells = _cells(shape, bmax)
    rounds, k = rounds_matching(shape, bmax, int(num_windows)), cells[0] * cells[1] * cells[2]

    def fn(v, _):
        src, blocks = _shuffle_sources(seed, shape, bmax, cells, rounds)
        flat = tf.reshape(v, [shape[0] * shape[1] * shape[2], -1])
        return tf.reshape(tf.gather(flat, src), tf.shape(v)), blocks

    out, blocks = random_apply(fn, p, sub_seed(seed, 0), x, _empty_boxes(rounds * k))
    out = tf.ensure_shape(out, x.shape)
    return (out, blocks) if return_blocks else out


def reference_coverage(shape, bmax, num_windows):
    """Expected fraction of a ``shape`` crop inside at least one of
    ``num_windows`` windows placed as the reference code places them (size
    per axis uniform in [1, bmax], start uniform where the window fits)."""
    q = []
    for n, b in zip(shape, bmax):
        x = np.arange(n)[:, None]
        s = np.arange(1, b + 1)[None]
        hits = np.clip(np.minimum(x, n - s) - np.maximum(0, x - s + 1) + 1, 0, None)
        q.append((hits / (n - s + 1)).mean(1))
    p = q[0][:, None, None] * q[1][None, :, None] * q[2][None, None, :]
    return float(np.mean(1.0 - (1.0 - p) ** num_windows))


def _cells(shape, bmax):
    """Cells per axis of a round's grid: enough to cover the crop whatever
    the grid offset (0 .. bmax - 1)."""
    return tuple(-(-(n + b - 1) // b) for n, b in zip(shape, bmax))


def round_coverage(shape, bmax):
    """Probability per voxel [D, H, W] that one round of
    :func:`local_pixel_shuffle` covers it (the same everywhere: the grid
    offset is uniform, windows are only clipped to the crop)."""
    g = []
    for n, b in zip(shape, bmax):
        loc = (np.arange(n)[:, None] + np.arange(b)[None]) % b    # per grid offset
        cover = np.zeros((n, b))
        for size in range(1, b + 1):
            for t in range(b - size + 1):
                cover += ((loc >= t) & (loc < t + size)) / (b * (b - size + 1))
        g.append(cover.mean(1))
    return g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]


def rounds_matching(shape, bmax, num_windows, max_rounds=64):
    """The fewest rounds whose expected coverage reaches the reference's
    with ``num_windows`` windows (:func:`reference_coverage`)."""
    target = reference_coverage(shape, bmax, num_windows)
    p = round_coverage(shape, bmax)
    for r in range(1, max_rounds + 1):
        if np.mean(1.0 - (1.0 - p) ** r) >= target:
            return r
    return max_rounds


def _shuffle_sources(seed, shape, bmax, cells, rounds):
    """Where each voxel of :func:`local_pixel_shuffle` reads from: (flat
    source index per voxel [D*H*W], windows (rounds*k, 6)). All rounds at
    once, by index arithmetic: in round r the grid of ``bmax`` cells starts
    at ``-offset_r``; each cell holds one window of random size at a random
    place in it, clipped to the crop; a voxel lies in cell
    ``(x + offset_r) // bmax`` and is covered when it is inside that cell's
    window; its row-major slot j in the window reads slot ``perm[j]``
    (perm: an argsort of random keys over the window's slots). The last
    covering round wins."""
    r_n, k_all = rounds, cells[0] * cells[1] * cells[2]
    n_loc = bmax[0] * bmax[1] * bmax[2]
    b = tf.constant(bmax, tf.int32)
    offset = randint(sub_seed(seed, 1), [r_n, 3], 0, b - 1)
    size = randint(sub_seed(seed, 3), [r_n, k_all, 3], 1, b)
    shift = randint(sub_seed(seed, 4), [r_n, k_all, 3], 0, b - size)
    # windows in crop coordinates (grid origin at -offset), clipped to the crop
    cell_pos = tf.stack(tf.meshgrid(*[tf.range(c) for c in cells], indexing="ij"), -1)
    lo = tf.reshape(cell_pos, [1, k_all, 3]) * b - offset[:, None] + shift      # [R, K, 3]
    hi = tf.minimum(lo + size, tf.constant(shape, tf.int32))
    lo = tf.maximum(lo, 0)
    size = tf.where(tf.reduce_all(hi > lo, -1, keepdims=True), hi - lo, 0)
    # per axis: the cell of every coordinate, per round [R, n]
    grids = [(tf.range(n)[None] + offset[:, a:a + 1]) // bmax[a] for a, n in enumerate(shape)]

    def spread(t, a):  # [R, n_a] -> broadcastable [R, D, H, W]
        return tf.reshape(t, [r_n] + [shape[i] if i == a else 1 for i in range(3)])

    full = [r_n] + list(shape)
    cell_id = (spread(grids[0], 0) * (cells[1] * cells[2]) + spread(grids[1], 1) * cells[2]
               + spread(grids[2], 2))
    cell_id = tf.broadcast_to(cell_id, full) + tf.reshape(tf.range(r_n), [r_n, 1, 1, 1]) * k_all
    sz = tf.gather(tf.reshape(size, [-1, 3]), cell_id)                   # [R, D, H, W, 3]
    start = tf.gather(tf.reshape(lo, [-1, 3]), cell_id)
    coord = [tf.broadcast_to(spread(tf.tile(tf.range(n)[None], [r_n, 1]), a), full)
             for a, n in enumerate(shape)]
    within = [coord[a] - start[..., a] for a in range(3)]
    covered = tf.ones(full, tf.bool)
    for a in range(3):
        covered &= (within[a] >= 0) & (within[a] < sz[..., a])
    szs = [tf.maximum(sz[..., a], 1) for a in range(3)]
    slot = (within[0] * szs[1] + within[1]) * szs[2] + within[2]
    # a random permutation of each window's slots (slots past its size stay last)
    count = tf.reduce_prod(size, -1)                                     # [R, K]
    keys = tf.random.stateless_uniform([r_n, k_all, n_loc], sub_seed(seed, 5))
    rank = tf.cast(tf.range(n_loc), tf.float32) / n_loc
    perm = tf.argsort(tf.where(tf.range(n_loc) < count[..., None], keys, 2.0 + rank), axis=-1)
    dest = tf.gather(tf.reshape(perm, [-1]),
                     cell_id * n_loc + tf.clip_by_value(slot, 0, n_loc - 1))
    moved = [dest // (szs[1] * szs[2]), (dest // szs[2]) % szs[1], dest % szs[2]]
    strides = (shape[1] * shape[2], shape[2], 1)
    here = tf.reshape(tf.range(shape[0] * shape[1] * shape[2]), shape)
    delta = sum((moved[a] - within[a]) * strides[a] for a in range(3))
    src = tf.where(covered, here[None] + delta, here[None])
    # the last covering round wins
    last = r_n - 1 - tf.argmax(tf.reverse(tf.cast(covered, tf.int32), [0]), axis=0,
                               output_type=tf.int32)
    picked = tf.reduce_sum(src * tf.one_hot(last, r_n, axis=0, dtype=tf.int32), axis=0)
    src = tf.reshape(tf.where(tf.reduce_any(covered, 0), picked, here), [-1])
    # the windows, round by round (empty ones, clipped away, as zeros)
    boxes = tf.where(tf.reduce_all(size > 0, -1, keepdims=True),
                     tf.concat([lo, lo + size], -1), 0)
    return src, tf.reshape(boxes, [r_n * k_all, 6])


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
