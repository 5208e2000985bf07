"""Dice, HD95 (mm), volumes and aggregation against hand-computed cases."""

import math

import numpy as np
import pytest
from scipy import ndimage

from rr_tf import metrics as M


def cube(shape, lo, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(l, l + size) for l in lo)] = True
    return m


def brute_hd95(p, r, spacing):
    """Independent reference: explicit 6-neighbour surfaces (outside the
    image = background) and all pairwise distances."""
    def surf(m):
        padded = np.pad(m, 1)
        inner = np.ones_like(m)
        for axis in range(3):
            for shift in (-1, 1):
                inner &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
        return m & ~inner

    sp = np.argwhere(surf(p)) * np.asarray(spacing)
    sr = np.argwhere(surf(r)) * np.asarray(spacing)
    d = np.sqrt(((sp[:, None, :] - sr[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_two_cubes_offset_along_the_fine_axis():
    """10^3 cubes, shifted 2 voxels along axis 0 with spacing (0.6, 1.5, 2.5).
    Per directed set of 488 surface voxels: 164 at 2*0.6 mm (the leading face
    and the inner part of the trailing face), 36 at 0.6 mm, 288 at 0 (shared
    side faces), so the 95th percentile is 1.2 mm."""
    spacing = (0.6, 1.5, 2.5)
    a = cube((16, 14, 14), (2, 2, 2), 10)
    b = cube((16, 14, 14), (4, 2, 2), 10)
    assert M.dice(a, b) == pytest.approx(2 * 800 / 2000)
    d_ab, d_ba = M.surface_distances(a, b, spacing)
    assert d_ab.size == 488 and d_ba.size == 488
    assert np.sum(np.isclose(d_ab, 1.2)) == 164 and np.sum(np.isclose(d_ab, 0.6)) == 36
    assert M.hd95(a, b, spacing) == pytest.approx(1.2)
    assert M.hd95(b, a, spacing) == pytest.approx(1.2)


def test_single_voxels_anisotropic():
    p = np.zeros((8, 8, 12), bool)
    r = np.zeros((8, 8, 12), bool)
    p[2, 3, 4] = True
    r[5, 3, 8] = True
    assert M.hd95(p, r, (0.5, 1.0, 2.5)) == pytest.approx(math.hypot(1.5, 10.0))
    assert M.dice(p, r) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape = (14, 12, 10)
    smooth = lambda: ndimage.gaussian_filter(rng.random(shape), 1.5)  # noqa: E731
    p, r = smooth() > 0.5, smooth() > 0.5
    p[0, :3, :3] = True  # touch the image border: border voxels are surface
    spacing = (0.8, 1.3, 3.0)
    assert M.hd95(p, r, spacing) == pytest.approx(brute_hd95(p, r, spacing), rel=1e-9)


def test_cube_offset_along_coarse_axis_matches_brute_force():
    spacing = (0.6, 1.5, 2.5)
    a = cube((12, 12, 12), (1, 1, 1), 8)
    b = cube((12, 12, 12), (1, 1, 2), 8)
    assert M.hd95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing))


def test_identical_and_image_filling_masks():
    a = np.ones((5, 6, 7), bool)
    assert M.dice(a, a) == 1.0 and M.hd95(a, a, (1, 2, 3)) == 0.0
    b = cube((9, 9, 9), (2, 2, 2), 4)
    assert M.hd95(b, b, (1, 1, 1)) == 0.0


def test_empty_cases_and_case_results():
    shape, spacing = (10, 10, 4), (1.0, 2.0, 5.0)
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    ref[2:4, 2:4, 1:3] = 1        # label 1: missed by the prediction
    pred[5:7, 5:7, 1:2] = 2       # label 2: false positive
    ref[7:9, 7:9, 0:2] = 3        # label 3: found exactly
    pred[7:9, 7:9, 0:2] = 3
    res = M.evaluate_case(pred, ref, spacing, [1, 2, 3, 4])
    diag = math.sqrt(10 ** 2 + 20 ** 2 + 20 ** 2)
    assert M.image_diagonal_mm(shape, spacing) == pytest.approx(diag)
    assert res[1].status == "missed" and res[1].dice == 0 and res[1].hd95 == pytest.approx(diag)
    assert res[2].status == "false_positive" and res[2].dice == 0
    assert res[2].hd95 == pytest.approx(diag)
    assert res[3].status == "ok" and res[3].dice == 1 and res[3].hd95 == 0
    assert res[4].status == "absent" and math.isnan(res[4].dice) and math.isnan(res[4].hd95)
    # volumes: voxel = 10 mm^3 = 0.01 ml
    assert res[1].ref_ml == pytest.approx(8 * 0.01) and res[1].pred_ml == 0
    assert res[2].pred_ml == pytest.approx(4 * 0.01)
    mean = M.case_mean(res)
    assert mean["n_classes"] == 3 and mean["dice"] == pytest.approx(1 / 3)
    assert mean["hd95"] == 0.0  # only label 3 was found in both masks (MONAI)
    assert mean["hd95_penalised"] == pytest.approx(2 * diag / 3)
    assert M.case_mean({4: res[4]})["n_classes"] == 0
    assert M.hd95(pred == 1, ref == 1, spacing, penalty=99.0) == 99.0


def R(dice, hd, status="ok"):
    return M.ClassResult(dice=dice, hd95=hd, pred_ml=1.0, ref_ml=2.0, status=status)


def test_aggregate_ignores_absent_and_counts_penalties():
    nan = float("nan")
    per_case = {
        "a": {1: R(0.8, 2.0), 2: R(nan, nan, "absent")},
        "b": {1: R(0.6, 4.0), 2: R(0.0, 50.0, "missed")},
        "c": {1: R(1.0, 0.0), 2: R(0.9, 1.0)},
        "d": {1: R(nan, nan, "absent"), 2: R(nan, nan, "absent")},
    }
    agg = M.aggregate(per_case, [1, 2])
    c1, c2 = agg["classes"][1], agg["classes"][2]
    assert c1["n"] == 3 and c1["dice_mean"] == pytest.approx(0.8)
    assert c1["dice_std"] == pytest.approx(np.std([0.8, 0.6, 1.0], ddof=1))
    assert c1["hd95_mean"] == pytest.approx(2.0) and c1["n_absent"] == 1
    assert c1["hd95_mean_penalised"] == pytest.approx(2.0)
    assert c2["n"] == 2 and c2["dice_mean"] == pytest.approx(0.45) and c2["n_missed"] == 1
    assert c2["hd95_mean_penalised"] == pytest.approx(25.5)
    assert c2["hd95_mean"] == pytest.approx(1.0) and c2["n_hd95"] == 1  # the miss left out
    ov = agg["overall"]
    case_means = [0.8, 0.3, 0.95]  # case d has nothing to score
    assert ov["n"] == 3 and ov["dice_mean"] == pytest.approx(np.mean(case_means))
    assert ov["dice_std"] == pytest.approx(np.std(case_means, ddof=1))
    assert ov["hd95_mean_penalised"] == pytest.approx(np.mean([2.0, 27.0, 0.5]))
    assert ov["hd95_mean"] == pytest.approx(np.mean([2.0, 4.0, 0.5]))
    assert ov["dice_class_mean"] == pytest.approx((0.8 + 0.45) / 2)
    one = M.aggregate({"a": per_case["a"]}, [1])
    assert one["classes"][1]["dice_std"] == 0.0 and one["overall"]["dice_mean"] == 0.8
    none = M.aggregate({"d": per_case["d"]}, [1, 2])
    assert none["overall"]["n"] == 0 and math.isnan(none["overall"]["dice_mean"])


def test_hd95_mean_leaves_a_missed_organ_out_like_monai_and_the_penalised_mean_counts_it():
    """Hand-built: two cases, one organ. Case a finds it 2 voxels off (HD95
    2 mm), case b misses it. MONAI-style mean = 2 mm over n_hd95 = 1 case;
    the penalised mean averages 2 mm with the image diagonal."""
    shape, spacing = (12, 12, 6), (1.0, 1.0, 1.0)
    ref = np.zeros(shape, np.uint8)
    ref[2:6, 2:6, 1:5] = 1
    shifted = np.zeros(shape, np.uint8)
    shifted[4:8, 2:6, 1:5] = 1
    per_case = {"a": M.evaluate_case(shifted, ref, spacing, [1]),
                "b": M.evaluate_case(np.zeros(shape, np.uint8), ref, spacing, [1])}
    assert per_case["a"][1].hd95 == pytest.approx(2.0) and per_case["b"][1].status == "missed"
    diag = M.image_diagonal_mm(shape, spacing)
    agg = M.aggregate(per_case, [1])
    c = agg["classes"][1]
    assert c["n"] == 2 and c["n_hd95"] == 1 and c["n_missed"] == 1
    assert c["hd95_mean"] == pytest.approx(2.0) and c["hd95_std"] == 0.0
    assert c["hd95_mean_penalised"] == pytest.approx((2.0 + diag) / 2)
    ov = agg["overall"]
    assert ov["hd95_mean"] == pytest.approx(2.0) and ov["hd95_class_mean"] == pytest.approx(2.0)
    assert ov["hd95_mean_penalised"] == pytest.approx((2.0 + diag) / 2)
    assert ov["hd95_class_mean_penalised"] == pytest.approx((2.0 + diag) / 2)
    # a label never found anywhere has no MONAI mean at all
    only_missed = M.aggregate({"b": per_case["b"]}, [1])
    assert math.isnan(only_missed["classes"][1]["hd95_mean"])
    assert only_missed["classes"][1]["hd95_mean_penalised"] == pytest.approx(diag)
