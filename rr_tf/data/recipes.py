"""View recipes: what one training sample is, built from views.py samplers
and augment ops. Each recipe returns a function for
:func:`rr_tf.data.pipeline.view_dataset` and yields a dict of tensors with
static shapes, boxes included. Un-augmented crops are returned as int16
stored HU (the stream scales whole batches); augmented ones are float32
network input (augmentation needs it)."""

import math

import tensorflow as tf

from rr_tf.data import augment, views
from rr_tf.data.augment._common import sub_seed
from rr_tf.data.options import PATCH_SAMPLING

# HU above which a voxel counts as "body" for foreground-biased sampling.
BODY_THRESHOLD_HU = -500


def _scaled_sizes(crop_size, scales):
    """The crop sizes ``crop_size`` x each of ``scales`` (global-view pairs)."""
    return [[int(round(c * f)) for c in crop_size] for f in scales]


def _global_pair(image, sizes, min_iou, seed, out_size, to_unit):
    """Two overlapping crops (sizes from ``sizes``, IoU >= ``min_iou``)
    resized to ``out_size`` in network units, stacked, and their boxes."""
    b1, b2 = views.global_pair_boxes(tf.shape(image)[:3], sizes, min_iou, seed)
    return tf.stack([_crop_unit(image, b, out_size, to_unit) for b in (b1, b2)]), b1, b2


def _crop_unit(image, box, out_size, to_unit):
    """Crop (HU) -> network units -> resize to ``out_size``."""
    return views.crop_resize(image, box, out_size, pad_value=views.PAD_HU, scale=to_unit)


def _coin(seed, p):
    return tf.random.stateless_uniform([], seed) < p


def random_crop(crop_size, foreground_p=0.0, threshold=BODY_THRESHOLD_HU):
    """One crop of ``crop_size`` per call; with probability ``foreground_p``
    centred on a body voxel (CAST-like foreground-aware sampling)."""
    crop_size = tuple(int(c) for c in crop_size)

    def fn(image, seed, to_unit):
        s_coin, s_fg, s_uni = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        shape = tf.shape(image)[:3]
        if foreground_p > 0:
            box = tf.cond(_coin(s_coin, foreground_p),
                          lambda: views.foreground_box(image, crop_size, s_fg, threshold),
                          lambda: views.random_box(shape, crop_size, s_uni))
        else:
            box = views.random_box(shape, crop_size, s_uni)
        view = views.crop(image, box, pad_value=views.PAD_HU)  # int16 HU: the stream scales batches
        return {"view": tf.ensure_shape(view, crop_size + (1,)), "box": box}

    return fn


def finetune_patch(patch_size, fg_fraction=1.0 / 3.0, spatial="default", stride=2,
                   sampling="class_balanced", tissue_shift_hu=0.0, tissue_shift_p=0.5):
    """Image/label patch pairs; a ``fg_fraction`` of patches is centred on a
    labelled voxel, the rest are uniform random boxes. ``sampling``:
    ``"class_balanced"`` (nnU-Net's rule) draws a class uniformly among the
    foreground classes present in the case, then a voxel of it, so a small
    organ is a patch centre as often as the liver; ``"foreground"`` draws
    any labelled voxel (large organs dominate). Voxels are looked up on a
    ``stride`` grid (cheap; a structure thinner than ``stride`` voxels may
    be missed). ``spatial``: ``"default"`` = :func:`paired_spatial` (flips +
    small affine, the label resampled with nearest neighbour), None = no
    augmentation (the image then stays int16 HU until the stream scales the
    batch), or any ``fn(image, label, seed) -> (image, label)``; one with an
    ``input_size(patch_size)`` attribute, such as
    :func:`finetune_augmentation`, is given the larger region it asks for
    (same centre) and ``patch_size`` as its fourth argument. ``tissue_shift_hu`` > 0 (only with
    augmentation): with probability ``tissue_shift_p`` each labelled organ's
    voxels move by their own offset ``~ U(-tissue_shift_hu, tissue_shift_hu)``
    HU (:func:`~rr_tf.data.augment.label_offsets`), a stand-in for the
    contrast phases the labelled cases may not cover."""
    if sampling not in PATCH_SAMPLING:
        raise ValueError(f"patch sampling must be one of {PATCH_SAMPLING}, got {sampling!r}")
    if spatial == "default":
        spatial = paired_spatial
    patch_size = tuple(int(c) for c in patch_size)
    in_shape = (tuple(spatial.input_size(patch_size)) if hasattr(spatial, "input_size")
                else patch_size)
    in_size = tf.constant(in_shape, tf.int32)

    def fn(image, label, seed, to_unit):
        s_coin, s_pick, s_uni, s_aug, s_cls = tf.unstack(
            tf.random.experimental.stateless_split(seed, 5))
        shape = tf.shape(image)[:3]
        size = tf.constant(patch_size, tf.int32)
        grid = label[::stride, ::stride, ::stride]
        fg = tf.cast(tf.where(grid > 0), tf.int32)
        if sampling == "class_balanced":
            classes, index = tf.unique(tf.gather_nd(grid, fg))
            k_cls = tf.random.stateless_uniform([], s_cls, 0, tf.maximum(tf.size(classes), 1),
                                                dtype=tf.int32)
            fg = tf.boolean_mask(fg, tf.equal(index, k_cls))
        fg = fg * stride
        n = tf.shape(fg)[0]

        def centred():
            k = tf.random.stateless_uniform([], s_pick, 0, n, dtype=tf.int32)
            return views.make_box(fg[k] - size // 2, size)  # crop() pads beyond the volume

        box = tf.cond(tf.logical_and(_coin(s_coin, fg_fraction), n > 0), centred,
                      lambda: views.random_box(shape, size, s_uni))
        # a deformation reads beyond the patch: crop its whole reach, same centre
        read = views.make_box(box[0] - (in_size - size) // 2, in_size)
        img = tf.ensure_shape(views.crop(image, read, pad_value=views.PAD_HU), in_shape + (1,))
        lab = tf.ensure_shape(views.crop(label, read), in_shape)
        if spatial is not None:  # augmentation works on network units
            img = to_unit(img)
            if tissue_shift_hu > 0:
                per_hu = to_unit(tf.constant(1.0)) - to_unit(tf.constant(0.0))
                img = augment.label_offsets(img, lab, sub_seed(s_aug, 7),
                                            tissue_shift_hu * per_hu, p=tissue_shift_p)
            if hasattr(spatial, "input_size"):
                img, lab = spatial(img, lab, s_aug, patch_size)
            else:
                img, lab = spatial(img, lab, s_aug)
        return {"image": img, "label": tf.cast(lab, tf.int32), "box": box}

    return fn


@tf.function(jit_compile=True)
def paired_spatial(image, label, seed):
    """The same flip + small affine (scale 0.9-1.1, +-10 deg) on an image
    patch (trilinear) and its label patch (nearest)."""
    s_flip, s_aff = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image, label, _ = augment.random_flip(image, s_flip, label=label)
    return augment.random_affine(image, s_aff, label=label, scale=(0.9, 1.1), degrees=10.0)


# nnU-Net's intensity augmentation probabilities and ranges (its noise is in
# z-score units of CT foreground; here in HU)
_NOISE_HU = 25.0
_GAMMA_LOG = (math.log(0.7), math.log(1.5))


def finetune_augmentation(flip_axes=(0, 1, 2), intensity=False, hu_per_unit=2000.0,
                          scale=(0.9, 1.1), degrees=10.0, anisotropy=0.0, elastic=0.0):
    """``fn(image, label, seed, out_shape) -> (image, label)`` for
    :func:`finetune_patch`: flips on ``flip_axes`` only (on RAS+-ordered
    volumes axis 0 is left-right: flipping it swaps the sides of left/right
    organ labels), a :func:`~rr_tf.data.augment.random_deform` (zoom
    ``U(scale)``, per-axis factors ``1 +- anisotropy``, rotations up to
    ``degrees`` about each axis, a smooth elastic displacement of up to
    ``elastic`` voxels), and with ``intensity`` nnU-Net's intensity
    augmentation: Gaussian noise (p 0.1, sd up to 25 HU), blur (p 0.2,
    sigma 0.5-1 voxel), contrast about the patch mean (p 0.15,
    x0.75-1.25), gamma (p 0.3, 0.7-1.5). ``hu_per_unit``: HU per network
    unit (the spec's window width), to size the noise. ``fn.input_size(
    patch_size)`` is the region to crop so that the deformation reads real
    context around an output patch of ``patch_size``."""
    flip_axes = tuple(sorted(set(int(a) for a in flip_axes)))
    if any(a not in (0, 1, 2) for a in flip_axes):
        raise ValueError(f"flip axes must be among 0, 1, 2, got {flip_axes}")
    scale = (float(scale[0]), float(scale[1]))
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale range must be 0 < low <= high, got {scale}")
    if not 0 <= anisotropy < 1 or elastic < 0 or not 0 <= degrees <= 180:
        raise ValueError(f"need 0 <= anisotropy < 1, elastic >= 0, 0 <= degrees <= 180, got "
                         f"{anisotropy}, {elastic}, {degrees}")
    noise = _NOISE_HU / float(hu_per_unit)
    deform = dict(scale=scale, degrees=float(degrees), anisotropy=float(anisotropy),
                  elastic=float(elastic))

    @tf.function(jit_compile=True)
    def apply(image, label, seed, out_shape):
        s_flip, s_aff, s_int = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        if flip_axes:
            image, label, _ = augment.random_flip(image, s_flip, label=label, axes=flip_axes)
        image, label = augment.random_deform(image, s_aff, label=label, out_shape=out_shape,
                                             **deform)
        if intensity:
            s = [sub_seed(s_int, i) for i in range(4)]
            image = augment.gaussian_noise(image, s[0], std=(0.0, noise), p=0.1)
            image = augment.gaussian_blur(image, s[1], sigma=(0.5, 1.0), p=0.2)
            image = augment.random_contrast(image, s[2], factor=(0.75, 1.25), p=0.15)
            image = augment.random_gamma(image, s[3], log_gamma=_GAMMA_LOG, p=0.3)
        return image, label

    def fn(image, label, seed, out_shape=None):
        shape = tuple(image.shape[:3]) if out_shape is None else tuple(int(n) for n in out_shape)
        return apply(image, label, seed, shape)

    fn.input_size = lambda patch_size: augment.deform_input_size(patch_size, **deform)
    return fn


def patient_pair(crop_size, foreground_p=0.5, threshold=BODY_THRESHOLD_HU, augment=False,
                 spatial_affine=True):
    """MICLe positives: one crop from each of two scans of a patient (the
    scans may differ in shape and position, so each gets its own box).
    ``augment``: the two crops then get the spatial and intensity
    augmentation of :func:`contrastive_pair` (float32 output, the batch
    structure of ``contrastive_pair``); otherwise they stay int16 HU."""
    single = random_crop(crop_size, foreground_p, threshold)

    def fn(image_a, image_b, seed, to_unit):
        s_a, s_b, s_sp, s_in = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        a, b = single(image_a, s_a, to_unit), single(image_b, s_b, to_unit)
        out = {"view1": a["view"], "box1": a["box"], "view2": b["view"], "box2": b["box"]}
        if augment:
            pair = to_unit(tf.stack([a["view"], b["view"]]))
            pair = _intensity(_spatial(pair, s_sp, spatial_affine), s_in, swap=False)
            out["view1"], out["view2"] = pair[0], pair[1]
        return out

    return fn


# Static-shape augmentation runs under XLA: on 2 CPU cores it makes the
# gather-based affine 4.6x, patch swap 6.7x and flip 2.5x faster (measured
# single-threaded on 64x64x32 crops). Stateless normal noise is 6x *slower*
# under XLA, so it stays outside. Each function takes a stack of crops
# [N, D, H, W, 1] and their seeds [N, 2] (N unrolled), so a sample costs a
# few XLA dispatches rather than one per crop and op.
@tf.function(jit_compile=True)
def _spatial_xla(crops, seeds, affine):
    out = []
    for i in range(crops.shape[0]):
        s_flip, s_aff = tf.unstack(tf.random.experimental.stateless_split(seeds[i], 2))
        x, _ = augment.random_flip(crops[i], s_flip)
        if affine:
            x = augment.random_affine(x, s_aff, scale=(0.9, 1.1), degrees=10.0)
        out.append(x)
    return tf.stack(out)


@tf.function(jit_compile=True)
def _blur_xla(crops, seeds, p=0.5):
    return tf.stack([augment.gaussian_blur(crops[i], seeds[i], sigma=(0.0, 2.0), p=p)
                     for i in range(crops.shape[0])])


@tf.function(jit_compile=True)
def _gamma_swap_xla(crops, seeds, swap, p=0.5):
    out = []
    for i in range(crops.shape[0]):
        s_gamma, s_swap = tf.unstack(tf.random.experimental.stateless_split(seeds[i], 2))
        x = augment.random_gamma(crops[i], s_gamma, log_gamma=(-0.3, 0.3), p=p)
        if swap:
            x = augment.patch_swap(x, s_swap, patch=(8, 4, 4), num_swaps=100, p=p)
        out.append(x)
    return tf.stack(out)


def _spatial(crops, seed, affine=True):
    """Per crop of a stack: flip (each axis p 0.5), then a small affine
    (scale 0.9-1.1, +-10 deg) when ``affine``."""
    seeds = tf.random.experimental.stateless_split(seed, crops.shape[0])
    return _spatial_xla(crops, seeds, affine)


def _intensity(crops, seed, swap, p=0.5, znorm=False):
    """Per crop of a stack: blur, noise, gamma (each with probability ``p``)
    and, for global views, patch swap (``p``); then, with ``znorm``, each
    crop z-normalised (PCRLv2's torchio ZNormalization)."""
    n = crops.shape[0]
    s = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    x = _blur_xla(crops, tf.random.experimental.stateless_split(s[0], n), p)
    noise_seeds = tf.random.experimental.stateless_split(s[1], n)
    x = tf.stack([augment.gaussian_noise(x[i], noise_seeds[i], std=(0.0, 0.25), p=p)
                  for i in range(n)])
    x = _gamma_swap_xla(x, tf.random.experimental.stateless_split(s[2], n), swap, p)
    return tf.stack([augment.z_normalize(x[i]) for i in range(n)]) if znorm else x


PCRLV2_GLOBAL_SIZES = ((64, 64, 32), (80, 80, 40), (96, 96, 48), (112, 112, 56))
PCRLV2_LOCAL_SIZES = ((16, 16, 16), (24, 24, 24), (32, 32, 32))


def pcrlv2_views(global_out=(64, 64, 32), local_out=(16, 16, 16), num_local=6, min_iou=0.3,
                 global_sizes=PCRLV2_GLOBAL_SIZES, local_sizes=PCRLV2_LOCAL_SIZES,
                 spatial_affine=True):
    """PCRLv2 sample: two global crops (IoU >= ``min_iou``, resized to
    ``global_out``) and ``num_local`` local crops drawn inside their union
    box (resized to ``local_out``). Spatial augmentation, then intensity
    augmentation as the reference's torchio defaults apply it: blur, noise,
    gamma and (globals only) patch swap each with probability 1, then every
    input z-normalised. ``target1/2`` are the globals after spatial and
    before intensity augmentation (restoration targets, not normalised)."""
    global_out, local_out = tuple(global_out), tuple(local_out)

    def fn(image, seed, to_unit):
        s = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
        globs, b1, b2 = _global_pair(image, global_sizes, min_iou, s[0], global_out, to_unit)
        lboxes = views.local_boxes(views.union_box(b1, b2), num_local, local_sizes, s[1])
        targets = _spatial(globs, s[2], spatial_affine)
        globs = _intensity(targets, s[3], swap=True, p=1.0, znorm=True)
        locs = tf.stack([_crop_unit(image, lboxes[j], local_out, to_unit) for j in range(num_local)])
        locs = _intensity(_spatial(locs, s[4], spatial_affine), s[5], swap=False, p=1.0,
                          znorm=True)
        return {"box1": b1, "box2": b2, "local_boxes": lboxes, "target1": targets[0],
                "target2": targets[1], "global1": globs[0], "global2": globs[1], "locals": locs}

    return fn


def contrastive_pair(crop_size, out_size=None, min_iou=0.3, scales=(1.0, 1.25, 1.5),
                     spatial_affine=True):
    """Two augmented views of one volume (MoCo v2 / SimCLR / RepRec CNN
    branch): crops of ``crop_size`` x a scale from ``scales`` with IoU >=
    ``min_iou``, resized to ``out_size`` (default ``crop_size``), with
    spatial and intensity augmentation. Boxes are returned."""
    crop_size = tuple(int(c) for c in crop_size)
    out_size = tuple(out_size or crop_size)
    sizes = _scaled_sizes(crop_size, scales)

    def fn(image, seed, to_unit):
        s = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        pair, b1, b2 = _global_pair(image, sizes, min_iou, s[0], out_size, to_unit)
        pair = _intensity(_spatial(pair, s[1], spatial_affine), s[2], swap=False)
        return {"box1": b1, "box2": b2, "view1": pair[0], "view2": pair[1]}

    return fn


@tf.function(jit_compile=True)
def _flip_xla(crops, seeds):
    """Random flips (each axis p 0.5) of a stack of crops; returns the
    crops and their flip bits [N, 3] (PGL needs them to align the views)."""
    out, bits = [], []
    for i in range(crops.shape[0]):
        x, f = augment.random_flip(crops[i], seeds[i])
        out.append(x)
        bits.append(f)
    return tf.stack(out), tf.stack(bits)


def pgl_pair(crop_size, min_iou=0.3, scales=(1.0, 1.25, 1.5), intensity=True):
    """PGL sample: two views of one volume whose geometry is *known*: crops
    of ``crop_size`` x a scale from ``scales`` with IoU >= ``min_iou``,
    resized to ``crop_size``, flipped at random; then (``intensity``) blur,
    noise and gamma, which move no voxel. Returns the views, their boxes
    ``box1/2`` and flip bits ``flips1/2`` (int32 [3]), from which
    :func:`rr_tf.methods.alignment.overlap_regions` finds the overlap in
    each view. No affine and no patch swap: both would break the exact
    voxel correspondence the local consistency loss relies on."""
    crop_size = tuple(int(c) for c in crop_size)
    sizes = _scaled_sizes(crop_size, scales)

    def fn(image, seed, to_unit):
        s = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        pair, b1, b2 = _global_pair(image, sizes, min_iou, s[0], crop_size, to_unit)
        pair, flips = _flip_xla(pair, tf.random.experimental.stateless_split(s[1], 2))
        if intensity:
            pair = _intensity(pair, s[2], swap=False)
        return {"view1": pair[0], "view2": pair[1], "box1": b1, "box2": b2,
                "flips1": flips[0], "flips2": flips[1]}

    return fn


def slice_slabs(crop_size, neighbour_range=2, foreground_p=0.9, scales=(1.0, 1.25, 1.5),
                threshold=BODY_THRESHOLD_HU, corrupt=True):
    """Sequential multi-task sample (``rr_tf.methods.multitask``): two
    augmented slabs of neighbouring axial slices, a clean restoration target,
    its Genesis-corrupted copy and the slabs' normalised z-positions.

    ``crop_size = (X, Y, k)``: a slab is an ``X x Y`` in-plane window of the
    ``k`` (odd) consecutive axial slices ``z - k//2 .. z + k//2`` (the stored
    volume is RAS, so axial slices run along its last spatial axis; slices
    beyond the volume's ends repeat the first / last one, as
    ``rr_tf.models.unet2d.volume_to_slabs`` does). Slabs come out as
    ``[X, Y, k]``: the slices are channels.

    1. Anchor ``(x, y, z)``: a body voxel (HU > ``threshold``) with
       probability ``foreground_p``, else uniform. ``z' = z + U{-n..n}``
       (``n = neighbour_range``; 0 = the same slice twice), clipped to the
       volume.
    2. In-plane windows of ``(X, Y)`` times a scale from ``scales`` (clipped
       to the volume), the first around the anchor, the second shifted by
       up to a quarter window; both resized to ``(X, Y)``.
    3. Each slab: random in-plane flips (``target`` = slab 1 after flips),
       then intensity augmentation (blur, noise, gamma, each p 0.5) ->
       ``slab1``, ``slab2``.
    4. ``corrupted``: the published Models Genesis corruption of ``target``
       (local shuffling, Bezier, in/out-painting), applied in-plane and
       identically to the k slices (the slab is handled as an
       ``[X, Y, 1, k]`` crop with k channels).
    5. ``position1/2 = z / (depth - 1)`` (0 for a one-slice volume), with
       ``depth`` the stored volume's z extent.

    Returns float32 ``slab1``, ``slab2``, ``target``, ``corrupted`` ``[X, Y, k]``,
    ``position1``, ``position2`` (scalars), int32 ``z1``, ``z2``, ``depth`` and
    the boxes ``box1``, ``box2`` (``[2, 3]``: start / size with the z range of
    the slab, before clamping to the volume). Static shapes.
    """
    crop_size = tuple(int(c) for c in crop_size)
    out_xy, k = crop_size[:2], crop_size[2]
    if k < 1 or k % 2 == 0:
        raise ValueError(f"slice_slabs: the slab depth crop_size[2] must be odd, got {k}")
    r, n = k // 2, int(neighbour_range)
    sizes = tf.constant([[int(round(c * f)) for c in out_xy] for f in scales], tf.int32)

    def anchor(image, seed):
        s_coin, s_fg, s_jit, s_uni = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        shape = tf.shape(image)[:3]
        one = tf.ones([3], tf.int32)
        stride = 4  # foreground voxels are found on a stride-4 grid; jitter inside the cell

        def fg():
            start = views.foreground_box(image, one, s_fg, threshold, stride=stride)[0]
            jitter = views.random_box(tf.fill([3], stride), one, s_jit)[0]
            return tf.minimum(start + jitter, shape - 1)

        uni = lambda: views.random_box(shape, one, s_uni)[0]  # noqa: E731
        return fg() if foreground_p >= 1 else tf.cond(_coin(s_coin, foreground_p), fg, uni)

    def window(centre, shape_xy, seed):
        i = tf.random.stateless_uniform([], seed, 0, tf.shape(sizes)[0], dtype=tf.int32)
        size = tf.minimum(sizes[i], shape_xy)
        start = tf.clip_by_value(centre - size // 2, 0, tf.maximum(shape_xy - size, 0))
        return start, size

    def slab(image, start, size, z, to_unit):
        depth = tf.shape(image)[2]
        thin = tf.gather(image, tf.clip_by_value(z - r + tf.range(k), 0, depth - 1), axis=2)
        box = views.make_box(tf.concat([start, [0]], 0), tf.concat([size, [k]], 0))
        x = views.crop_resize(thin, box, out_xy + (k,), pad_value=views.PAD_HU, scale=to_unit)
        x = tf.transpose(x, [0, 1, 3, 2])  # [X, Y, 1, k]: in-plane crop, slices as channels
        return tf.ensure_shape(x, out_xy + (1, k))

    def fn(image, seed, to_unit):
        s = tf.unstack(tf.random.experimental.stateless_split(seed, 8))
        shape = tf.shape(image)[:3]
        depth = shape[2]
        c = anchor(image, s[0])
        z1 = c[2]
        z2 = tf.clip_by_value(z1 + tf.random.stateless_uniform([], s[1], -n, n + 1, tf.int32),
                              0, depth - 1)
        start1, size1 = window(c[:2], shape[:2], s[2])
        shift = tf.random.stateless_uniform([2], s[3], -1.0, 1.0) * tf.cast(size1 // 4, tf.float32)
        start2, size2 = window(c[:2] + tf.cast(tf.round(shift), tf.int32), shape[:2], s[4])
        raw = tf.stack([slab(image, start1, size1, z1, to_unit),
                        slab(image, start2, size2, z2, to_unit)])
        clean = _spatial(raw, s[5], affine=False)  # flips; the size-1 axis flips to itself
        aug = _intensity(clean, s[6], swap=False)
        target = clean[0]
        corrupted = augment.genesis_corrupt(target, s[7]) if corrupt else target
        span = tf.cast(tf.maximum(depth - 1, 1), tf.float32)
        as_slab = lambda x: tf.ensure_shape(x[:, :, 0, :], out_xy + (k,))  # noqa: E731
        box = lambda st, sz, z: views.make_box(tf.concat([st, [z - r]], 0),  # noqa: E731
                                               tf.concat([sz, [k]], 0))
        return {"slab1": as_slab(aug[0]), "slab2": as_slab(aug[1]), "target": as_slab(target),
                "corrupted": as_slab(corrupted),
                "position1": tf.cast(z1, tf.float32) / span,
                "position2": tf.cast(z2, tf.float32) / span,
                "z1": z1, "z2": z2, "depth": depth,
                "box1": box(start1, size1, z1), "box2": box(start2, size2, z2)}

    return fn


def genesis_pair(crop_size, flip_p=0.4, shuffle_p=0.5, nonlinear_p=0.9, paint_p=0.9,
                 outpaint_p=0.8, foreground_p=0.5, threshold=BODY_THRESHOLD_HU):
    """Models Genesis sample: ``target`` is a crop (network units) flipped
    along each axis with probability ``flip_p``; ``input`` is that target
    after the Genesis corruptions (:func:`rr_tf.data.augment.genesis_corrupt`:
    local pixel shuffling, non-linear Bezier mapping, out-/in-painting), so
    the flips apply to input and target alike. ``flips`` (int32 [3]) records
    them, ``box`` the crop. With probability ``foreground_p`` the crop is
    centred on a body voxel (Genesis skips cubes of nearly only air)."""
    crop_size = tuple(int(c) for c in crop_size)
    single = random_crop(crop_size, foreground_p, threshold)

    def fn(image, seed, to_unit):
        s_crop, s_flip, s_corrupt = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        crop = single(image, s_crop, to_unit)
        target, flips = augment.random_flip(to_unit(crop["view"]), s_flip, p=flip_p)
        corrupted = augment.genesis_corrupt(target, s_corrupt, shuffle_p=shuffle_p,
                                            nonlinear_p=nonlinear_p, paint_p=paint_p,
                                            outpaint_p=outpaint_p)
        return {"input": corrupted, "target": target, "box": crop["box"], "flips": flips}

    return fn


def pcrl_transform(x, seed):
    """PCRL's transformation for the conditioned decoder, on one crop
    (D, H, W, C): flip each spatial axis with probability 0.5, then rotate
    by ``k * 90`` degrees (k uniform in 0..3) in the (D, H) plane (as
    ``np.rot90(x, k, axes=(0, 1))``; D and H must be equal). Returns
    ``(transformed, vector)`` with the float32 7-d vector
    ``[flip_D, flip_H, flip_W, onehot(k, 4)]`` that the gating MLP reads."""
    s_flip, s_rot = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    y, flips = augment.random_flip(x, s_flip)
    y, k = augment.random_rot90(y, s_rot, axes=(0, 1))
    vector = tf.concat([tf.cast(flips, tf.float32), tf.one_hot(k, 4, dtype=tf.float32)], 0)
    return tf.ensure_shape(y, x.shape), vector


def pcrl_views(crop_size, min_iou=0.3, scales=(1.0, 1.25, 1.5), shuffle_p=0.5, paint_p=0.9,
               outpaint_p=0.8, spatial_affine=True):
    """PCRL sample: two crops of one volume (``crop_size`` x a scale from
    ``scales``, IoU >= ``min_iou``, resized to ``crop_size``, boxes returned).

    Per view ``i``: ``target{i}`` is the crop after spatial augmentation
    (flip + small affine: PCRL's torchio RandomFlip + RandomAffine);
    ``view{i}``, the network input, is the target after Gaussian blur (PCRL's
    torchio RandomBlur, at its default p = 1) and the Genesis local pixel shuffling (``shuffle_p``)
    and painting (``paint_p``; out-painting ``outpaint_p``, else
    in-painting); ``aug{i}`` is the 7-d vector of a further flip + rot90
    (:func:`pcrl_transform`) and ``aug_target{i}`` the target transformed by
    it: what the decoder conditioned on ``aug{i}`` must output."""
    crop_size = tuple(int(c) for c in crop_size)
    sizes = _scaled_sizes(crop_size, scales)

    def fn(image, seed, to_unit):
        s = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
        pair, b1, b2 = _global_pair(image, sizes, min_iou, s[0], crop_size, to_unit)
        clean = _spatial(pair, s[1], spatial_affine)
        blurred = _blur_xla(clean, tf.random.experimental.stateless_split(s[2], 2), 1.0)
        s_corrupt = tf.random.experimental.stateless_split(s[3], 2)
        s_transform = tf.random.experimental.stateless_split(s[4], 2)
        out = {"box1": b1, "box2": b2}
        for i in range(2):
            out[f"view{i + 1}"] = augment.genesis_corrupt(
                blurred[i], s_corrupt[i], shuffle_p=shuffle_p, nonlinear_p=0.0, paint_p=paint_p,
                outpaint_p=outpaint_p)
            out[f"target{i + 1}"] = clean[i]
            out[f"aug_target{i + 1}"], out[f"aug{i + 1}"] = pcrl_transform(clean[i], s_transform[i])
        return out

    return fn
