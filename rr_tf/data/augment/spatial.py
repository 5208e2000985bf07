"""Spatial augmentations: flips, rot90, small affine, nnU-Net-style
deformation (rotation, anisotropic zoom, elastic; image + optional label).

Images are resampled trilinearly, labels with nearest neighbour, both by the
same transform. All shapes are channels-last (D, H, W, C); a label may be
(D, H, W) or (D, H, W, 1) and comes back in the shape it was given.
"""

import math

import tensorflow as tf

from rr_tf.data.augment._common import (
    as_seed, finish_label, prepare_label, random_apply, static_spatial_shape,
    sub_seed, uniform)


# --------------------------------------------------------------------- flips
def random_flip(x, seed, label=None, axes=(0, 1, 2), p=0.5):
    """Flip each spatial axis in ``axes`` independently with probability ``p``.

    Returns ``(x, flips)`` or ``(x, label, flips)`` where ``flips`` is an int32
    [3] vector of 0/1, one bit per spatial axis (D, H, W); axes not in
    ``axes`` always report 0. Applying the same flips again is the identity.
    """
    seed = as_seed(seed)
    x = tf.convert_to_tensor(x)
    allowed = tf.constant([a in tuple(axes) for a in range(3)])
    bits = tf.logical_and(tf.random.stateless_uniform([3], seed) < p, allowed)
    flips = tf.cast(bits, tf.int32)
    x = apply_flips(x, flips)
    if label is None:
        return x, flips
    label, squeeze = prepare_label(label)
    return x, finish_label(apply_flips(label, flips), squeeze), flips


def apply_flips(x, flips):
    """Reverse the spatial axes of ``x`` (D, H, W, ...) whose bit in ``flips`` is 1.

    Static axes with a select per axis (no data-dependent axis list), so the
    op compiles under XLA (``jit_compile=True``)."""
    flips = tf.cast(flips, tf.bool)
    for axis in range(3):
        x = tf.where(flips[axis], tf.reverse(x, [axis]), x)
    return x


# -------------------------------------------------------------------- rot90
def random_rot90(x, seed, label=None, axes=(0, 1)):
    """Rotate by ``k * 90`` degrees in the plane ``axes``, k uniform in {0..3}.

    Same convention as ``np.rot90(x, k, axes)``. Both dims of the plane must
    be equal (checked at trace time). Returns ``(x, k)`` or ``(x, label, k)``
    with ``k`` an int32 scalar.
    """
    seed = as_seed(seed)
    x = tf.convert_to_tensor(x)
    a, b = (int(v) for v in axes)
    shape = static_spatial_shape(x, "random_rot90")
    if a == b or not (0 <= a < 3 and 0 <= b < 3):
        raise ValueError(f"random_rot90: axes must be two different spatial axes, got {axes}")
    if shape[a] != shape[b]:
        raise ValueError(f"random_rot90: axes {axes} have different sizes {shape[a]} and "
                         f"{shape[b]}; a 90-degree rotation would change the crop shape")
    k = tf.random.stateless_uniform([], seed, 0, 4, dtype=tf.int32)
    x = rot90(x, k, (a, b))
    if label is None:
        return x, k
    label, squeeze = prepare_label(label)
    return x, finish_label(rot90(label, k, (a, b)), squeeze), k


def rot90(x, k, axes=(0, 1)):
    """``np.rot90(x, k, axes)`` for a tensor ``k`` (graph friendly)."""
    a, b = axes
    perm = list(range(x.shape.rank))
    perm[a], perm[b] = perm[b], perm[a]
    branches = [
        lambda: x,
        lambda: tf.transpose(tf.reverse(x, [b]), perm),
        lambda: tf.reverse(x, [a, b]),
        lambda: tf.reverse(tf.transpose(x, perm), [b]),
    ]
    return tf.switch_case(tf.math.floormod(tf.cast(k, tf.int32), 4), branches)


# ------------------------------------------------------------------- affine
def rotation_matrix(angles):
    """3x3 rotation from three angles (radians) about the D, H and W axes."""
    c = tf.cos(angles)
    s = tf.sin(angles)
    one, zero = tf.ones([], angles.dtype), tf.zeros([], angles.dtype)
    r0 = tf.stack([[one, zero, zero], [zero, c[0], -s[0]], [zero, s[0], c[0]]])
    r1 = tf.stack([[c[1], zero, s[1]], [zero, one, zero], [-s[1], zero, c[1]]])
    r2 = tf.stack([[c[2], -s[2], zero], [s[2], c[2], zero], [zero, zero, one]])
    return r0 @ r1 @ r2


def _split_coords(coords):
    """A (..., 3) tensor or a sequence of 3 tensors -> list of 3 float32 tensors."""
    if isinstance(coords, (list, tuple)):
        return [tf.cast(c, tf.float32) for c in coords]
    coords = tf.cast(coords, tf.float32)
    return [coords[..., 0], coords[..., 1], coords[..., 2]]


def trilinear_sample(volume, coords, fill_value=None):
    """Sample ``volume`` (D, H, W, C) at float voxel coordinates.

    ``coords``: a (..., 3) tensor or three tensors of one shape S (the D, H
    and W coordinates); returns S + (C,). ``fill_value=None`` clamps the
    coordinates to the volume (the nearest edge value continues outwards);
    otherwise the volume is surrounded by ``fill_value`` (the border blends
    towards it). Implementation: the (h, w) 2x2 neighbourhood of every voxel
    is packed into channels, so two row gathers (d and d+1) fetch all eight
    corners.
    """
    volume = tf.convert_to_tensor(volume)
    dims = static_spatial_shape(volume, "trilinear_sample")
    ch = volume.shape[3] if volume.shape[3] is not None else tf.shape(volume)[3]
    dtype = volume.dtype
    vol = tf.cast(volume, tf.float32)
    co = _split_coords(coords)
    if fill_value is None:
        padded = tf.pad(vol, [[0, 1], [0, 1], [0, 1], [0, 0]], mode="SYMMETRIC")
        off, lo, hi = 0, [0.0] * 3, [n - 1.0 for n in dims]
    else:
        padded = tf.pad(vol, [[1, 2], [1, 2], [1, 2], [0, 0]],
                        constant_values=tf.cast(fill_value, tf.float32))
        off, lo, hi = 1, [-1.0] * 3, [float(n) for n in dims]
    hp, wp = padded.shape[1] - 1, padded.shape[2] - 1
    quad = tf.concat([padded[:, b:b + hp, c:c + wp] for b in (0, 1) for c in (0, 1)], -1)
    flat = tf.reshape(quad, [-1, 4 * ch])            # (h, w), (h, w+1), (h+1, w), (h+1, w+1)
    strides = (hp * wp, wp, 1)
    frac, idx = [], 0
    for ax in range(3):
        c = tf.clip_by_value(co[ax], lo[ax], hi[ax])
        base = tf.floor(c)
        frac.append((c - base)[..., None])
        idx = idx + (tf.cast(base, tf.int32) + off) * strides[ax]
    q0 = tf.gather(flat, idx)
    q1 = tf.gather(flat, idx + strides[0])
    q = q0 + frac[0] * (q1 - q0)
    a = q[..., :2 * ch] + frac[1] * (q[..., 2 * ch:] - q[..., :2 * ch])
    out = a[..., :ch] + frac[2] * (a[..., ch:] - a[..., :ch])
    return tf.cast(out, dtype)


def nearest_sample(volume, coords, fill_value=None):
    """Nearest-neighbour version of :func:`trilinear_sample` (for labels)."""
    volume = tf.convert_to_tensor(volume)
    dims = static_spatial_shape(volume, "nearest_sample")
    flat = tf.reshape(volume, [-1, volume.shape[3]])
    strides = (dims[1] * dims[2], dims[2], 1)
    lin, inside = 0, None
    for ax, c in enumerate(_split_coords(coords)):
        i = tf.cast(tf.round(c), tf.int32)
        ok = (i >= 0) & (i < dims[ax])
        inside = ok if inside is None else inside & ok
        lin = lin + tf.clip_by_value(i, 0, dims[ax] - 1) * strides[ax]
    val = tf.gather(flat, lin)
    if fill_value is not None:
        val = tf.where(inside[..., None], val, tf.cast(fill_value, val.dtype))
    return val


def affine_coords(shape, matrix, out_shape=None, displacement=None):
    """Input coordinates sampled by each output voxel of a (D, H, W) grid for
    a centred linear map ``in = c_in + matrix @ (out - c_out)`` (c the grid
    centres; ``out_shape`` defaults to ``shape``), plus an optional
    ``displacement`` (three tensors of ``out_shape``, in input voxels):
    three ``out_shape`` float32 tensors, built by broadcasting (no (N, 3)
    grid)."""
    out_shape = tuple(shape) if out_shape is None else tuple(out_shape)
    c_in = [(n - 1) / 2.0 for n in shape]
    r = [tf.range(n, dtype=tf.float32) - (n - 1) / 2.0 for n in out_shape]
    r = [r[0][:, None, None], r[1][None, :, None], r[2][None, None, :]]
    m = tf.cast(matrix, tf.float32)
    coords = [c_in[k] + m[k, 0] * r[0] + m[k, 1] * r[1] + m[k, 2] * r[2] for k in range(3)]
    coords = [tf.broadcast_to(c, out_shape) for c in coords]
    if displacement is not None:
        coords = [c + d for c, d in zip(coords, displacement)]
    return coords


def smooth_displacement(seed, shape, amplitude, grid=4):
    """A smooth random displacement field over a (D, H, W) grid: three
    tensors of ``shape`` (voxels), trilinear interpolation of independent
    ``U(-amplitude, amplitude)`` values on a ``grid``^3 lattice spanning the
    grid (correlation length about ``shape / (grid - 1)``)."""
    coarse = uniform(seed, [grid, grid, grid, 3], -float(amplitude), float(amplitude))
    axes = [tf.range(n, dtype=tf.float32) * ((grid - 1) / max(n - 1, 1)) for n in shape]
    co = tf.meshgrid(*axes, indexing="ij")
    field = trilinear_sample(coarse, co)
    return [field[..., k] for k in range(3)]


def deform_input_size(out_shape, scale=(0.9, 1.1), degrees=10.0, anisotropy=0.0,
                      elastic=0.0):
    """Size of the input region that :func:`random_deform` can read for an
    output of ``out_shape`` with these ranges (a bound: the smallest zoom,
    the largest rotation about all three axes, the largest displacement),
    so that a caller crops it from the volume instead of letting the
    output's corners repeat the patch's edge."""
    zoom = 1.0 / (float(scale[0]) * (1.0 - float(anisotropy)))
    half = [(n - 1) / 2.0 * zoom for n in out_shape]
    theta = min(math.radians(abs(float(degrees))) * math.sqrt(3.0), math.pi / 2)
    size = []
    for k, h in enumerate(half):
        others = max([half[j] for j in range(3) if j != k])
        reach = h * max(math.cos(theta), 0.0) + others * math.sin(theta) if theta else h
        reach = max(reach, h) + float(elastic)
        size.append(max(int(out_shape[k]), 2 * int(math.ceil(reach)) + 2))
    return tuple(size)


def random_deform(x, seed, label=None, out_shape=None, scale=(0.9, 1.1), degrees=10.0,
                  anisotropy=0.0, elastic=0.0, grid=4):
    """Random rotation, (an)isotropic zoom and smooth elastic deformation
    about the centre, sampled on an output grid of ``out_shape`` (default:
    the input's; a larger input gives the transform real context to read,
    see :func:`deform_input_size`), nnU-Net's spatial augmentation.

    Draws one zoom ``s ~ U(scale)``, per-axis factors ``U(1 - anisotropy,
    1 + anisotropy)``, three angles ``~ U(-degrees, degrees)`` and, when
    ``elastic`` > 0, a :func:`smooth_displacement` of up to ``elastic``
    input voxels. Output voxel ``o`` reads ``c_in + R diag(1 / (s a)) (o -
    c_out) + u(o)``. Images are trilinear (clamped at the input's edge),
    the label nearest. Returns ``x`` or ``(x, label)`` at ``out_shape``.
    """
    seed = as_seed(seed)
    x = tf.convert_to_tensor(x)
    in_shape = static_spatial_shape(x, "random_deform")
    out_shape = tuple(in_shape) if out_shape is None else tuple(int(n) for n in out_shape)
    s = uniform(sub_seed(seed, 1), [], float(scale[0]), float(scale[1]))
    a = uniform(sub_seed(seed, 2), [3], 1.0 - float(anisotropy), 1.0 + float(anisotropy))
    ang = uniform(sub_seed(seed, 3), [3], -float(degrees), float(degrees))
    matrix = rotation_matrix(ang * (math.pi / 180.0)) / (s * a)[None, :]
    disp = (smooth_displacement(sub_seed(seed, 4), out_shape, elastic, grid)
            if elastic > 0 else None)
    coords = affine_coords(in_shape, matrix, out_shape, disp)
    out = tf.reshape(trilinear_sample(x, coords), out_shape + (x.shape[-1],))
    if label is None:
        return out
    lab, squeeze = prepare_label(label)
    lab = tf.reshape(nearest_sample(lab, coords), out_shape + (1,))
    return out, finish_label(lab, squeeze)


def random_affine(x, seed, label=None, scale=(0.9, 1.1), degrees=10.0, p=1.0,
                  fill_value=None, label_fill=0):
    """Small random 3D rotation + isotropic scaling about the crop centre.

    One scale ``s ~ U(scale)`` and three angles ``~ U(-degrees, degrees)``
    (about the D, H and W axes), as torchio's ``RandomAffine(isotropic=True)``.
    The output at voxel ``o`` reads the input at ``c + R (o - c) / s``: content
    is zoomed by ``s`` and rotated. Images are trilinear; outside the crop
    they continue the nearest edge value (``fill_value=None``) or read
    ``fill_value``. A label is resampled with nearest neighbour (outside:
    edge, or ``label_fill`` when a ``fill_value`` is given). Applied with
    probability ``p``. Returns ``x`` or ``(x, label)``.
    """
    seed = as_seed(seed)
    x = tf.convert_to_tensor(x)
    if isinstance(degrees, (int, float)):
        degrees = (-float(degrees), float(degrees))
    shape = static_spatial_shape(x, "random_affine")

    def matrix():
        s = uniform(sub_seed(seed, 1), [], float(scale[0]), float(scale[1]))
        ang = uniform(sub_seed(seed, 2), [3], float(degrees[0]), float(degrees[1]))
        return rotation_matrix(ang * (math.pi / 180.0)) / s

    def warp_image(img, coords):
        out = trilinear_sample(img, coords, fill_value)
        return tf.reshape(out, tf.shape(img))

    if label is None:
        def fn(img):
            return warp_image(img, affine_coords(shape, matrix()))
        out = random_apply(fn, p, sub_seed(seed, 0), x)
        out.set_shape(x.shape)
        return out

    label, squeeze = prepare_label(label)

    def fn2(img, lab):
        coords = affine_coords(shape, matrix())
        lab_fill = None if fill_value is None else label_fill
        new_lab = tf.reshape(nearest_sample(lab, coords, lab_fill), tf.shape(lab))
        return warp_image(img, coords), new_lab

    out, lab = random_apply(fn2, p, sub_seed(seed, 0), x, label)
    out.set_shape(x.shape)
    lab.set_shape(label.shape)
    return out, finish_label(lab, squeeze)
