"""View recipes: what one training sample is, built from views.py samplers
and augment ops. Each recipe returns a function for
:func:`rr_tf.data.pipeline.view_dataset` and yields a dict of tensors with
static shapes, boxes included."""

import tensorflow as tf

from rr_tf.data import views

# Scaled intensity above which a voxel counts as "body" for foreground-biased
# sampling: -500 HU in the default [-1000, 1000] window.
BODY_THRESHOLD = 0.25


def _coin(seed, p):
    return tf.random.stateless_uniform([], seed) < p


def random_crop(crop_size, foreground_p=0.0, threshold=BODY_THRESHOLD):
    """One crop of ``crop_size`` per call; with probability ``foreground_p``
    centred on a body voxel (CAST-like foreground-aware sampling)."""
    crop_size = tuple(int(c) for c in crop_size)

    def fn(image, seed):
        s_coin, s_fg, s_uni = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        shape = tf.shape(image)[:3]
        if foreground_p > 0:
            box = tf.cond(_coin(s_coin, foreground_p),
                          lambda: views.foreground_box(image, crop_size, s_fg, threshold),
                          lambda: views.random_box(shape, crop_size, s_uni))
        else:
            box = views.random_box(shape, crop_size, s_uni)
        view = views.crop(image, box)
        return {"view": tf.ensure_shape(view, crop_size + (1,)), "box": box}

    return fn


def finetune_patch(patch_size, fg_fraction=1.0 / 3.0, spatial=None, stride=2):
    """Image/label patch pairs; a ``fg_fraction`` of patches is centred on a
    random labelled voxel (as nnU-Net oversamples foreground). ``spatial``
    is an optional ``fn(image, label, seed) -> (image, label)`` applied to
    both (e.g. flips + affine, nearest for the label)."""
    patch_size = tuple(int(c) for c in patch_size)

    def fn(image, label, seed):
        s_coin, s_pick, s_uni, s_aug = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        shape = tf.shape(image)[:3]
        size = tf.constant(patch_size, tf.int32)
        fg = tf.cast(tf.where(label[::stride, ::stride, ::stride] > 0), tf.int32) * stride
        n = tf.shape(fg)[0]

        def centred():
            k = tf.random.stateless_uniform([], s_pick, 0, n, dtype=tf.int32)
            return views.make_box(fg[k] - size // 2, size)  # crop() pads beyond the volume

        box = tf.cond(tf.logical_and(_coin(s_coin, fg_fraction), n > 0), centred,
                      lambda: views.random_box(shape, size, s_uni))
        img = views.crop(image, box)
        lab = views.crop(label, box)
        if spatial is not None:
            img, lab = spatial(img, lab, s_aug)
        return {"image": tf.ensure_shape(img, patch_size + (1,)),
                "label": tf.ensure_shape(tf.cast(lab, tf.int32), patch_size), "box": box}

    return fn


def patient_pair(crop_size, foreground_p=0.5, threshold=BODY_THRESHOLD):
    """MICLe positives: one crop from each of two scans of a patient (the
    scans may differ in shape and position, so each gets its own box)."""
    single = random_crop(crop_size, foreground_p, threshold)

    def fn(image_a, image_b, seed):
        s_a, s_b = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        a, b = single(image_a, s_a), single(image_b, s_b)
        return {"view1": a["view"], "box1": a["box"], "view2": b["view"], "box2": b["box"]}

    return fn
