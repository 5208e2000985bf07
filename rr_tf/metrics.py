"""Segmentation metrics: per-class Dice, HD95 (mm) and volumes (ml).

Definitions (one class ``c``; ``P`` = predicted voxels, ``R`` = reference):

* Dice = 2 |P n R| / (|P| + |R|).
* Surface of a mask = its voxels with at least one 6-connected neighbour
  outside the mask; voxels on the image border count as surface (the world
  outside the image is background), as in medpy and MONAI.
* Directed surface distances d(P->R) = for every surface voxel of P, the
  Euclidean distance in millimetres (voxel spacing applied per axis) to the
  nearest surface voxel of R (``scipy.ndimage.distance_transform_edt`` of the
  complement of R's surface); d(R->P) likewise.
* HD95 = max(p95(d(P->R)), p95(d(R->P))): the larger of the two directed
  95th percentiles (numpy's linear interpolation), the definition used by
  medpy ``hd95``, MONAI ``compute_hausdorff_distance(percentile=95)`` and
  DeepMind's surface-distance "robust Hausdorff" (the latter weights by surfel
  area; this one counts voxels).

Empty masks (``status`` of a :class:`ClassResult`):

* ``"absent"``: P and R both empty. Nothing to score: Dice and HD95 are NaN
  and the case is left out of that class's mean (nnU-Net's convention), so a
  class is averaged over the cases whose reference or prediction contains it.
* ``"missed"``: R non-empty, P empty: Dice 0, HD95 = the penalty.
* ``"false_positive"``: R empty, P non-empty: Dice 0, HD95 = the penalty.
  (Counted in the means: predicting an organ that is not there is an error.)
* ``"ok"``: both non-empty.

The HD95 penalty is the image diagonal in millimetres (the largest distance
two voxels of the image can have), a finite, reproducible worst case; per-class
``n_missed`` / ``n_false_positive`` counts say how many penalties a mean
contains.

Aggregation over cases (:func:`aggregate`): per class, mean and sample
standard deviation (ddof=1; 0 for a single case) over the cases that are not
``absent``. Overall: the same statistics of each case's mean over its scored
classes (cases where every class is absent are left out), and ``class_mean``
= the mean of the per-class means (each class weighted equally).

HD95 is aggregated two ways:

* ``hd95_mean`` / ``hd95_std``: only the ``ok`` cases (both masks non-empty).
  A missed or false-positive class has no surface distance; as in MONAI
  (``compute_hausdorff_distance`` of an empty mask is not a finite number and
  its mean reductions leave NaN out) it is left out of the mean, so the number
  is comparable with published MONAI-based results. ``n_hd95`` counts the
  cases in it; the Dice mean and ``n_missed`` / ``n_false_positive`` still
  show the misses.
* ``hd95_mean_penalised`` / ``hd95_std_penalised``: every non-absent case,
  with the image diagonal for a missed or false-positive class (stricter, not
  comparable with MONAI-based numbers).
"""

import dataclasses
import math

import numpy as np
from scipy import ndimage

_SIX_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


@dataclasses.dataclass
class ClassResult:
    """Metrics of one class in one case (see the module docstring)."""

    dice: float
    hd95: float
    pred_ml: float
    ref_ml: float
    status: str

    def as_dict(self):
        return dataclasses.asdict(self)


def dice(pred_mask, ref_mask):
    """Dice of two boolean masks; NaN when both are empty."""
    p = np.asarray(pred_mask, bool)
    r = np.asarray(ref_mask, bool)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, r).sum()) / total


def image_diagonal_mm(shape, spacing):
    """Length of the image's diagonal in mm (the HD95 penalty)."""
    return float(np.sqrt(np.sum((np.asarray(shape, float) * np.asarray(spacing, float)) ** 2)))


def surface(mask):
    """Boolean surface voxels of ``mask`` (6-connectivity, border = outside)."""
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_SIX_NEIGHBOURS, border_value=0)


def _union_box(a, b):
    """Slices of the bounding box of a | b grown by one voxel (clipped).

    Surfaces and distances between them are unchanged by this crop: a mask
    voxel inside the image keeps its six neighbours, and one on the image
    border stays on the crop border (treated as outside either way)."""
    any_ = a | b
    box = []
    for axis in range(3):
        other = tuple(x for x in range(3) if x != axis)
        idx = np.flatnonzero(any_.any(axis=other))
        box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, any_.shape[axis])))
    return tuple(box)


def surface_distances(pred_mask, ref_mask, spacing):
    """(d(P->R), d(R->P)) in mm as 1D float arrays; both masks non-empty."""
    p = np.asarray(pred_mask, bool)
    r = np.asarray(ref_mask, bool)
    if not p.any() or not r.any():
        raise ValueError("surface distances need two non-empty masks")
    box = _union_box(p, r)
    p, r = p[box], r[box]
    sp, sr = surface(p), surface(r)
    spacing = tuple(float(s) for s in spacing)
    to_r = ndimage.distance_transform_edt(~sr, sampling=spacing)
    to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return to_r[sp], to_p[sr]


def hd95(pred_mask, ref_mask, spacing, penalty=None):
    """95th-percentile Hausdorff distance in mm (module docstring).

    Both empty -> NaN; exactly one empty -> ``penalty`` (default: the image
    diagonal in mm)."""
    p = np.asarray(pred_mask, bool)
    r = np.asarray(ref_mask, bool)
    has_p, has_r = bool(p.any()), bool(r.any())
    if not has_p and not has_r:
        return float("nan")
    if has_p != has_r:
        return float(image_diagonal_mm(p.shape, spacing) if penalty is None else penalty)
    d_pr, d_rp = surface_distances(p, r, spacing)
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


def voxel_volume_ml(spacing):
    return float(np.prod(np.asarray(spacing, float))) / 1000.0


def evaluate_case(pred, ref, spacing, labels):
    """Metrics of every label in one case.

    Args:
      pred, ref: integer label maps of the same shape.
      spacing: voxel size in mm per array axis.
      labels: iterable of label values (> 0) to score.

    Returns:
      {label: :class:`ClassResult`}.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    voxel_ml = voxel_volume_ml(spacing)
    penalty = image_diagonal_mm(ref.shape, spacing)
    out = {}
    for label in labels:
        p = pred == label
        r = ref == label
        n_p, n_r = int(p.sum()), int(r.sum())
        if n_p == 0 and n_r == 0:
            status = "absent"
        elif n_p == 0:
            status = "missed"
        elif n_r == 0:
            status = "false_positive"
        else:
            status = "ok"
        out[int(label)] = ClassResult(
            dice=dice(p, r), hd95=hd95(p, r, spacing, penalty),
            pred_ml=n_p * voxel_ml, ref_ml=n_r * voxel_ml, status=status)
    return out


def case_mean(results):
    """Mean Dice and HD95 of one case over its scored (non-absent) classes:
    ``hd95`` over the classes found in both masks (NaN when there is none;
    missed and false-positive classes left out, as MONAI does) and
    ``hd95_penalised`` with the image diagonal for those; NaN when every
    class is absent."""
    nan = float("nan")
    scored = [r for r in results.values() if r.status != "absent"]
    if not scored:
        return {"dice": nan, "hd95": nan, "hd95_penalised": nan, "n_classes": 0}
    found = [r.hd95 for r in scored if r.status == "ok"]
    return {"dice": float(np.mean([r.dice for r in scored])),
            "hd95": float(np.mean(found)) if found else nan,
            "hd95_penalised": float(np.mean([r.hd95 for r in scored])),
            "n_classes": len(scored)}


def _stats(values):
    values = [float(v) for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std


def aggregate(per_case, labels):
    """Statistics over cases (module docstring).

    Args:
      per_case: {case name: {label: ClassResult}}.
      labels: the labels to summarise.

    Returns:
      {"classes": {label: {n, dice_mean, dice_std, n_hd95, hd95_mean,
      hd95_std, hd95_mean_penalised, hd95_std_penalised, n_absent, n_missed,
      n_false_positive, ref_ml_mean, pred_ml_mean}},
      "overall": {n, dice_mean, dice_std, hd95_mean, hd95_std,
      hd95_mean_penalised, hd95_std_penalised, dice_class_mean,
      hd95_class_mean, hd95_class_mean_penalised}}; ``hd95_*`` leave missed
      and false-positive classes out (MONAI), ``*_penalised`` count them
      with the image diagonal.
    """
    classes = {}
    for label in labels:
        rows = [case[int(label)] for case in per_case.values() if int(label) in case]
        scored = [r for r in rows if r.status != "absent"]
        found = [r for r in scored if r.status == "ok"]
        d_mean, d_std = _stats([r.dice for r in scored])
        h_mean, h_std = _stats([r.hd95 for r in found])
        p_mean, p_std = _stats([r.hd95 for r in scored])
        classes[int(label)] = {
            "n": len(scored), "dice_mean": d_mean, "dice_std": d_std,
            "n_hd95": len(found), "hd95_mean": h_mean, "hd95_std": h_std,
            "hd95_mean_penalised": p_mean, "hd95_std_penalised": p_std,
            "n_absent": sum(r.status == "absent" for r in rows),
            "n_missed": sum(r.status == "missed" for r in rows),
            "n_false_positive": sum(r.status == "false_positive" for r in rows),
            "ref_ml_mean": _stats([r.ref_ml for r in rows])[0],
            "pred_ml_mean": _stats([r.pred_ml for r in rows])[0],
        }
    means = [case_mean({k: v for k, v in case.items() if k in classes})
             for case in per_case.values()]
    means = [m for m in means if m["n_classes"] > 0]
    d_mean, d_std = _stats([m["dice"] for m in means])
    h_mean, h_std = _stats([m["hd95"] for m in means])
    p_mean, p_std = _stats([m["hd95_penalised"] for m in means])
    overall = {
        "n": len(means), "dice_mean": d_mean, "dice_std": d_std,
        "hd95_mean": h_mean, "hd95_std": h_std,
        "hd95_mean_penalised": p_mean, "hd95_std_penalised": p_std,
        "dice_class_mean": _stats([c["dice_mean"] for c in classes.values()])[0],
        "hd95_class_mean": _stats([c["hd95_mean"] for c in classes.values()])[0],
        "hd95_class_mean_penalised": _stats([c["hd95_mean_penalised"]
                                             for c in classes.values()])[0],
    }
    return {"classes": classes, "overall": overall}
