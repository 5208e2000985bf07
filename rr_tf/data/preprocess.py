"""Raw volume -> stored training volume, following a :class:`PreprocessSpec`.

Order of operations (each exact or explicitly interpolating):
1. label/image consistency check (same shape, same affine);
2. reorientation to the closest canonical RAS+ axes (a permutation and flips
   of the array: exact, no interpolation; oblique affines stay oblique);
3. optional body crop (never cropping labelled voxels);
4. resampling to the target spacing, linear for images, nearest for labels,
   pixel edges aligned (the field of view is preserved);
5. HU clip to the window, round, cast to int16 (labels uint8).

Every step updates the affine, so the stored volume's affine maps its voxels
to the same world (scanner) coordinates as the original file, and
:func:`restore_original_grid` can bring any array on the stored grid (e.g. a
predicted label map) back onto the original file's grid.
"""

import dataclasses

import numpy as np
from scipy import ndimage

from rr_tf.errors import DataError
from rr_tf.data.spec import PreprocessSpec
from rr_tf.data.volume import Volume

_AFFINE_RTOL = 1e-4
_AFFINE_ATOL_MM = 1e-3


@dataclasses.dataclass
class PreprocessedCase:
    """A case ready to be written to a shard.

    ``image`` is int16 HU (clipped to the spec window), ``label`` uint8 or
    None, ``affine`` maps stored voxels to RAS+ mm, ``meta`` is JSON-ready
    (see :func:`preprocess_case`).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    meta: dict


def affines_match(a, b):
    """Same grid up to float noise of writers (1e-4 relative, 1e-3 mm)."""
    return np.allclose(a, b, rtol=_AFFINE_RTOL, atol=_AFFINE_ATOL_MM)


def check_label_matches(image, label):
    """Raises DataError (naming the label file) unless grids are identical."""
    if image.shape != label.shape:
        raise DataError(label.source, f"label shape {label.shape} does not match image shape "
                        f"{image.shape} ({image.source})")
    if not affines_match(image.affine, label.affine):
        diff = float(np.max(np.abs(image.affine - label.affine)))
        raise DataError(label.source, f"label affine differs from the image affine by up to "
                        f"{diff:.4g} mm ({image.source})")


def canonical_transform(affine):
    """nibabel orientation transform from ``affine``'s axes to RAS+."""
    from nibabel import orientations as ornt

    return ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt("RAS"))


def to_canonical(array, affine):
    """Permutes/flips ``array`` to the closest canonical RAS+ axes (exact)."""
    from nibabel import orientations as ornt

    transform = canonical_transform(affine)
    new = ornt.apply_orientation(array, transform)
    new_affine = affine @ ornt.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(new), new_affine


def axcodes(affine):
    from nibabel import orientations as ornt

    return "".join(ornt.aff2axcodes(affine))


def foreground_box(hu, spacing, threshold_hu, margin_mm, label=None):
    """Bounding box [(lo, hi) per axis, hi exclusive] of the body plus margin.

    Body = largest connected component of ``hu > threshold_hu`` (found on a
    2x subsampled mask for speed). The box is widened to contain every
    labelled voxel. Returns the full extent when nothing is above threshold.
    """
    shape = hu.shape
    coarse = hu[::2, ::2, ::2] > threshold_hu
    comps, n = ndimage.label(coarse)
    if n == 0:
        box = [(0, s) for s in shape]
    else:
        sizes = np.bincount(comps.ravel())
        sizes[0] = 0
        sl = ndimage.find_objects((comps == int(np.argmax(sizes))).astype(np.int32))[0]
        box = []
        for axis, s in enumerate(sl):
            margin = int(np.ceil(margin_mm / spacing[axis]))
            lo = max(0, s.start * 2 - margin)
            hi = min(shape[axis], s.stop * 2 + margin)
            box.append((lo, hi))
    if label is not None and label.any():
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(label.any(axis=other))
            lo, hi = box[axis]
            box[axis] = (min(lo, int(idx[0])), max(hi, int(idx[-1]) + 1))
    return box


def _shift_affine(affine, offsets):
    """Affine of a sub-array starting at voxel ``offsets``."""
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.asarray(offsets, float) + affine[:3, 3]
    return out


def resampled_shape(shape, spacing, target):
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample(array, out_shape, order):
    """Resamples with pixel edges aligned (field of view preserved).

    Output voxel ``o`` samples input coordinate ``(o + 0.5) * n_in / n_out - 0.5``
    along each axis. Returns (array, 4x4 index map new -> old voxel).
    """
    in_shape = np.asarray(array.shape, float)
    scale = in_shape / np.asarray(out_shape, float)
    offset = 0.5 * scale - 0.5
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = offset
    if tuple(out_shape) == tuple(array.shape):
        return array, index_map
    out = ndimage.affine_transform(array, scale, offset=offset, output_shape=tuple(out_shape),
                                   order=order, mode="nearest", prefilter=False)
    return out, index_map


def quantize_hu(hu, spec):
    lo, hi = spec.hu_window
    return np.clip(np.rint(hu), lo, hi).astype(np.int16)


def _spacing_of(affine):
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def preprocess_case(case_id, image, label, spec, patient_id=None):
    """Applies ``spec`` to one case.

    Args:
      case_id: unique name of the case.
      image: :class:`Volume` with float HU.
      label: :class:`Volume` of uint8 labels on the same grid, or None.
      spec: :class:`PreprocessSpec`.
      patient_id: for patient-level splits and pairing; defaults to case_id.

    Returns:
      :class:`PreprocessedCase`; its ``meta`` holds the stored shape, spacing
      and affine, the original shape/spacing/affine/axis codes/dtype/source,
      the crop box (in canonical original voxels), the label values present.
    """
    if not isinstance(spec, PreprocessSpec):
        raise TypeError("spec must be a PreprocessSpec")
    if label is not None:
        check_label_matches(image, label)
    hu, affine = to_canonical(np.asarray(image.array, np.float32), image.affine)
    lab = to_canonical(label.array, label.affine)[0] if label is not None else None
    spacing = _spacing_of(affine)

    crop_box = None
    if spec.foreground_crop:
        crop_box = foreground_box(hu, spacing, spec.foreground_threshold_hu,
                                  spec.foreground_margin_mm, lab)
        sl = tuple(slice(lo, hi) for lo, hi in crop_box)
        hu = np.ascontiguousarray(hu[sl])
        lab = np.ascontiguousarray(lab[sl]) if lab is not None else None
        affine = _shift_affine(affine, [lo for lo, _ in crop_box])

    if spec.spacing is not None:
        out_shape = resampled_shape(hu.shape, spacing, spec.spacing)
        order = 1 if spec.image_interpolation == "linear" else 0
        hu, index_map = resample(hu, out_shape, order)
        if lab is not None:
            lab, _ = resample(lab, out_shape, 0)
        affine = affine @ index_map

    stored = quantize_hu(hu, spec)
    lab = lab.astype(np.uint8) if lab is not None else None
    meta = {
        "case_id": case_id,
        "patient_id": str(patient_id if patient_id is not None else image.meta.get("patient_id") or case_id),
        "shape": list(stored.shape),
        "spacing": list(_spacing_of(affine)),
        "affine": affine.tolist(),
        "has_label": lab is not None,
        "label_values": sorted(int(v) for v in np.unique(lab)) if lab is not None else [],
        "crop_box": [list(b) for b in crop_box] if crop_box is not None else None,
        "original": {
            "shape": list(image.shape),
            "spacing": list(image.spacing),
            "affine": np.asarray(image.affine).tolist(),
            "axcodes": axcodes(image.affine),
            "source": image.source,
            "label_source": label.source if label is not None else None,
            "meta": _jsonable(image.meta),
        },
    }
    return PreprocessedCase(case_id=case_id, image=stored, label=lab, affine=affine, meta=meta)


def _jsonable(d):
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, (np.floating,)):
            v = float(v)
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def _signed_permutation(matrix, tol=1e-6):
    """Returns (perm, signs) if ``matrix`` is a signed permutation, else None."""
    rounded = np.rint(matrix)
    if np.max(np.abs(matrix - rounded)) > tol or sorted(np.abs(rounded).sum(0)) != [1, 1, 1]:
        return None
    if not np.allclose(np.abs(rounded).sum(1), 1):
        return None
    perm = np.argmax(np.abs(rounded), axis=0)  # output axis a reads input axis perm[a]
    signs = rounded[perm, np.arange(3)].astype(int)
    return perm, signs


def restore_original_grid(array, affine, original_affine, original_shape, order=0, cval=0):
    """Resamples ``array`` (on the stored grid ``affine``) onto the original grid.

    Exact (no interpolation) when the two grids differ only by axis
    permutation, flips and an integer shift (native spacing, with or
    without a body crop); otherwise interpolates with spline ``order``
    (0 = nearest, for label maps). Voxels outside the stored grid get ``cval``.
    """
    original_shape = tuple(int(s) for s in original_shape)
    exact = exact_grid_map(affine, original_affine)
    if exact is not None:
        return _permute_shift(array, exact[0], exact[1], original_shape, cval)
    t = np.linalg.solve(np.asarray(affine, float), np.asarray(original_affine, float))
    offset = t[:3, 3]
    return ndimage.affine_transform(array, t[:3, :3], offset=offset, output_shape=original_shape,
                                    order=order, mode="constant", cval=cval,
                                    prefilter=order > 1)


def exact_grid_map(affine, original_affine):
    """``(signed permutation, integer offset)`` taking original voxels to
    stored ones when the two grids differ only by axis order, flips and an
    integer shift (restoring is then exact, no interpolation); else None."""
    t = np.linalg.solve(np.asarray(affine, float), np.asarray(original_affine, float))
    perm = _signed_permutation(t[:3, :3])
    offset = t[:3, 3]
    if perm is None or not np.allclose(offset, np.rint(offset), atol=1e-4):
        return None
    return perm, np.rint(offset).astype(int)


def _permute_shift(array, perm, offset, out_shape, cval):
    """out[v] = array[P v + offset] with P a signed permutation, exactly."""
    (perm, signs) = perm
    out = np.full(out_shape, cval, dtype=array.dtype)
    src_slices, dst_slices = [], []
    # Along output axis a, input axis perm[a] is read at signs[a] * v + offset[a].
    for a in range(3):
        n_in = array.shape[perm[a]]
        v = np.arange(out_shape[a])
        idx = signs[a] * v + offset[perm[a]]
        ok = np.flatnonzero((idx >= 0) & (idx < n_in))
        if ok.size == 0:
            return out
        dst_slices.append(slice(ok[0], ok[-1] + 1))
        lo, hi = idx[ok[0]], idx[ok[-1]]
        src_slices.append(slice(lo, hi + 1) if signs[a] > 0 else slice(lo, hi - 1 if hi > 0 else None, -1))
    moved = np.transpose(array, perm)  # output axis a <- input axis perm[a]
    src = tuple(src_slices)
    out[tuple(dst_slices)] = moved[src]
    return out
