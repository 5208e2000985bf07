import numpy as np
import pytest

from rr_tf.errors import DataError
from rr_tf.data import preprocess as pp
from rr_tf.data.spec import PreprocessSpec
from rr_tf.data.volume import Volume
from nifti_factory import make_affine, ramp_volume, rotation

ODD_AFFINES = {
    "identity": make_affine((1, 1, 1)),
    "lps_like": make_affine((0.8, 0.8, 2.5), flips=(-1, -1, 1), origin=(100, 120, -50)),
    "permuted": make_affine((0.7, 1.1, 3.0), perm=(2, 0, 1), flips=(1, -1, -1), origin=(5, 6, 7)),
    "oblique": make_affine((0.9, 0.9, 2.0), rot=rotation(2, 30) @ rotation(0, -12), flips=(1, -1, 1),
                           perm=(1, 2, 0), origin=(-3, 40, 11)),
}


def world(affine, idx):
    idx = np.asarray(idx, float)
    return affine[:3, :3] @ idx + affine[:3, 3]


@pytest.mark.parametrize("name", list(ODD_AFFINES))
def test_to_canonical_keeps_world_positions(name):
    aff = ODD_AFFINES[name]
    data = ramp_volume((6, 7, 8))
    can, can_aff = pp.to_canonical(data, aff)
    assert pp.axcodes(can_aff) == "RAS"
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = tuple(rng.integers(0, s) for s in data.shape)
        w = world(aff, v)
        c = np.linalg.solve(can_aff[:3, :3], w - can_aff[:3, 3])
        ci = tuple(int(round(x)) for x in c)
        np.testing.assert_allclose(c, ci, atol=1e-6)
        assert can[ci] == data[v]


@pytest.mark.parametrize("name", list(ODD_AFFINES))
def test_native_spacing_round_trip_is_exact(name):
    aff = ODD_AFFINES[name]
    hu = ramp_volume((9, 10, 11)) * 2.3 + 0.4
    lab = (np.arange(hu.size).reshape(hu.shape) % 5).astype(np.uint8)
    spec = PreprocessSpec(spacing=None, hu_window=(-1000, 1000))
    case = pp.preprocess_case("c", Volume(hu, aff, "img"), Volume(lab, aff, "lab"), spec)
    assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
    np.testing.assert_allclose(case.meta["original"]["affine"], aff)
    assert case.meta["original"]["shape"] == [9, 10, 11]
    back = pp.restore_original_grid(case.image, case.affine, aff, hu.shape)
    np.testing.assert_array_less(np.abs(back - np.clip(hu, -1000, 1000)), 0.5 + 1e-4)
    np.testing.assert_array_equal(pp.restore_original_grid(case.label, case.affine, aff, hu.shape), lab)


def test_resampling_hits_target_spacing_and_world_values():
    """A field linear in world coordinates stays linear after resampling."""
    aff = make_affine((0.8, 1.2, 2.5), flips=(-1, 1, 1), origin=(50, -30, 10))
    shape = (40, 30, 16)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    w = idx @ aff[:3, :3].T + aff[:3, 3]
    grad = np.array([2.0, -1.5, 3.0])
    hu = (w @ grad).astype(np.float32)
    spec = PreprocessSpec(spacing=(1.6, 1.5, 2.0), hu_window=(-30000, 30000))
    case = pp.preprocess_case("c", Volume(hu, aff, "img"), None, spec)
    np.testing.assert_allclose(case.meta["spacing"], (1.6, 1.5, 2.0), rtol=0.03)
    assert tuple(case.image.shape) == pp.resampled_shape((40, 30, 16), (0.8, 1.2, 2.5), spec.spacing)
    new_idx = np.stack(np.meshgrid(*[np.arange(s) for s in case.image.shape], indexing="ij"), -1)
    expect = (new_idx @ case.affine[:3, :3].T + case.affine[:3, 3]) @ grad
    inner = tuple(slice(1, s - 1) for s in case.image.shape)  # edges are clamped, not extrapolated
    np.testing.assert_allclose(case.image[inner], expect[inner], atol=0.51)
    # field of view is preserved: first/last voxel edges coincide
    ext_old = np.abs(np.linalg.norm(aff[:3, :3], axis=0) * shape)
    ext_new = np.asarray(case.meta["spacing"]) * case.image.shape
    np.testing.assert_allclose(ext_new, ext_old[[0, 1, 2]], rtol=1e-6)


def test_label_resampling_is_nearest():
    lab = np.zeros((20, 20, 10), np.uint8)
    lab[5:12, 6:15, 2:8] = 3
    lab[12:16, 6:15, 2:8] = 7
    hu = np.zeros(lab.shape, np.float32)
    case = pp.preprocess_case("c", Volume(hu, np.eye(4), "i"), Volume(lab, np.eye(4), "l"),
                              PreprocessSpec(spacing=(1.7, 0.6, 1.3)))
    assert set(np.unique(case.label)) == {0, 3, 7}
    assert case.meta["label_values"] == [0, 3, 7]
    back = pp.restore_original_grid(case.label, case.affine, np.eye(4), lab.shape)
    assert np.mean(back == lab) > 0.95


def test_foreground_crop_keeps_body_and_labels():
    hu = np.full((40, 40, 20), -1000, np.float32)
    hu[10:30, 12:28, 4:16] = 40            # body
    hu[0:2, 0:2, 0:2] = 200                # small speck, not the largest component
    lab = np.zeros(hu.shape, np.uint8)
    lab[33:35, 20:22, 10:12] = 1           # a label outside the body must survive
    spec = PreprocessSpec(spacing=None, foreground_crop=True, foreground_margin_mm=2)
    aff = make_affine((1, 1, 2), origin=(3, 4, 5))
    case = pp.preprocess_case("c", Volume(hu, aff, "i"), Volume(lab, aff, "l"), spec)
    box = case.meta["crop_box"]
    assert box[0][0] <= 8 and box[0][1] >= 35 and box[1][0] <= 10 and box[2][0] <= 3
    assert box[0][0] > 2  # the speck did not widen the box
    assert case.label.sum() == lab.sum()
    back = pp.restore_original_grid(case.image, case.affine, aff, hu.shape, cval=-1234)
    inside = np.zeros(hu.shape, bool)
    inside[tuple(slice(lo, hi) for lo, hi in box)] = True
    np.testing.assert_array_equal(back[inside], np.clip(hu, -1000, 1000)[inside])
    assert np.all(back[~inside] == -1234)


def test_label_geometry_mismatch_is_an_error():
    img = Volume(np.zeros((5, 6, 7), np.float32), np.eye(4), "img.nii.gz")
    with pytest.raises(DataError, match="label shape") as info:
        pp.preprocess_case("c", img, Volume(np.zeros((5, 6, 8), np.uint8), np.eye(4), "lab.nii.gz"),
                           PreprocessSpec())
    assert str(info.value).startswith("lab.nii.gz:")
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    with pytest.raises(DataError, match="label affine"):
        pp.preprocess_case("c", img, Volume(np.zeros((5, 6, 7), np.uint8), shifted, "lab.nii.gz"),
                           PreprocessSpec())


def test_hu_is_clipped_and_rounded():
    hu = np.array([-3000, -1000.4, -0.5, 0.49, 12.5, 999.6, 5000], np.float32).reshape(7, 1, 1)
    hu = np.repeat(np.repeat(hu, 2, 1), 2, 2)
    case = pp.preprocess_case("c", Volume(hu, np.eye(4), "i"), None, PreprocessSpec(spacing=None))
    np.testing.assert_array_equal(case.image[:, 0, 0], [-1000, -1000, 0, 0, 12, 1000, 1000])


def test_restore_original_grid_interpolating_path():
    aff = ODD_AFFINES["oblique"]
    hu = ramp_volume((12, 12, 12))
    spec = PreprocessSpec(spacing=(1.5, 1.5, 1.5), hu_window=(-2000, 2000))
    case = pp.preprocess_case("c", Volume(hu, aff, "i"), None, spec)
    back = pp.restore_original_grid(case.image.astype(np.float32), case.affine, aff, hu.shape, order=1)
    inner = (slice(2, -2),) * 3
    assert np.median(np.abs(back[inner] - hu[inner])) < 15
