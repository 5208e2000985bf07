"""Augmentations as pure TensorFlow graph ops on one crop (D, H, W, C).

Every random op takes ``seed`` (int32/int64, shape [2]) and uses only
``tf.random.stateless_*`` draws: the same seed gives the same output. All
ops trace under ``tf.function`` / ``tf.data.Dataset.map`` with static crop
shapes (no py_function, no numpy on the hot path).

- spatial (image + optional label, nearest for labels): :func:`random_flip`
  (returns the 3 flip bits), :func:`random_rot90` (returns k),
  :func:`random_affine`, :func:`random_deform` (rotation, anisotropic zoom,
  elastic; output grid may be smaller than the input), with helpers :func:`trilinear_sample`,
  :func:`nearest_sample`, :func:`rot90`, :func:`apply_flips`;
- intensity (torchio-like): :func:`gaussian_blur`, :func:`gaussian_noise`,
  :func:`random_gamma`, :func:`patch_swap`, :func:`z_normalize`,
  :func:`random_contrast`, :func:`label_offsets` (per-organ shifts);
- Models Genesis: :func:`local_pixel_shuffle`, :func:`nonlinear_bezier`,
  :func:`inpaint`, :func:`outpaint`, :func:`genesis_corrupt`;
- :func:`random_apply` for graph-friendly probabilities.
"""

from rr_tf.data.augment._common import random_apply
from rr_tf.data.augment.genesis import (
    apply_lut, bezier_lut, boxes_mask, genesis_corrupt, inpaint, local_pixel_shuffle,
    nonlinear_bezier, outpaint)
from rr_tf.data.augment.intensity import (
    blur, gamma, gaussian_blur, gaussian_noise, label_offsets, patch_swap, random_contrast,
    random_gamma, z_normalize)
from rr_tf.data.augment.spatial import (
    affine_coords, apply_flips, deform_input_size, nearest_sample, random_affine,
    random_deform, random_flip, random_rot90, rot90, rotation_matrix, smooth_displacement,
    trilinear_sample)

__all__ = [
    "random_apply",
    "random_flip", "random_rot90", "random_affine", "apply_flips", "rot90",
    "rotation_matrix", "affine_coords", "trilinear_sample", "nearest_sample",
    "random_deform", "deform_input_size", "smooth_displacement",
    "gaussian_blur", "blur", "gaussian_noise", "random_gamma", "gamma", "patch_swap",
    "random_contrast", "label_offsets",
    "z_normalize",
    "local_pixel_shuffle", "nonlinear_bezier", "bezier_lut", "apply_lut", "inpaint",
    "outpaint", "boxes_mask", "genesis_corrupt",
]
