"""Test helper: writes NIfTI files with chosen dtype, scaling and affine."""

import numpy as np


def rotation(axis, degrees):
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def make_affine(spacing=(1.0, 1.0, 1.0), rot=None, flips=(1, 1, 1), perm=(0, 1, 2),
                origin=(0.0, 0.0, 0.0)):
    """Affine = R @ P @ diag(flips * spacing) with translation ``origin``."""
    lin = np.diag(np.asarray(flips, float) * np.asarray(spacing, float))
    p = np.eye(3)[list(perm)]
    lin = p @ lin
    if rot is not None:
        lin = rot @ lin
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = origin
    return aff


def write(path, data, affine, dtype=None, slope=None, inter=None, sform=True):
    """Writes ``data`` (stored values if slope given) to ``path``."""
    import nibabel as nib

    data = np.asarray(data)
    img = nib.Nifti1Image(data.astype(dtype) if dtype is not None else data, affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    if not sform:
        img.set_sform(None, code=0)
        img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def ramp_volume(shape, seed=0):
    """A smooth HU-like volume with distinct values everywhere."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return (-900 + 13.0 * i + 7.0 * j + 3.0 * k + rng.integers(0, 5, shape)).astype(np.float32)
