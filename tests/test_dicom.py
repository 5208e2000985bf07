"""Tests of rr_tf.data.dicom with synthetic series from dicom_factory."""

import os
import shutil
import sys

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

import dicom_factory as fac  # noqa: E402
from rr_tf.data.dicom import is_dicom_dir, list_series, read_dicom_series  # noqa: E402
from rr_tf.data.volume import LPS_TO_RAS  # noqa: E402
from rr_tf.errors import DataError  # noqa: E402
from subproc import run_logged

SHAPE = (24, 20, 12)


def _affine(spacing=(0.7, 0.8, 2.5), rotation=np.eye(3), origin=(10.0, -20.0, 30.0), shear=(0.0, 0.0)):
    """RAS affine = [rotation @ diag(spacing) with the slice column sheared, origin]."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(rotation) @ np.diag(spacing)
    a[:3, 2] += np.asarray(rotation) @ np.array([shear[0], shear[1], 0.0])
    a[:3, 3] = origin
    return a


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _round_trip(tmp_path, hu, affine, **kw):
    out = tmp_path / "series"
    fac.write_ct_series(out, hu, affine, **kw)
    vol = read_dicom_series(out)
    want_hu, want_affine = fac.expected_read(hu, affine)
    assert vol.array.dtype == np.float32
    assert vol.shape == want_hu.shape
    np.testing.assert_array_equal(vol.array, want_hu)
    np.testing.assert_allclose(vol.affine, want_affine, atol=1e-5)
    assert vol.source == str(out)
    return vol


def _edit(path, **values):
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _one_line_error(excinfo, must_name):
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(must_name) in msg
    return msg


def _sorted_files(folder):
    """Files of a series ordered by position along the slice normal."""
    files = list_series(folder)
    (paths,) = files.values()
    ds = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    iop = np.array(ds[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return [p for _, p in sorted((float(np.dot(d.ImagePositionPatient, normal)), p) for d, p in zip(ds, paths))]


# --------------------------------------------------------------- round trips


def test_axial_affine_matches_nibabel_and_itk_conventions(tmp_path):
    hu = fac.simple_hu(SHAPE)
    affine = _affine(spacing=(-0.7, -0.8, 2.5))  # IOP [1,0,0,0,1,0] in LPS
    vol = _round_trip(tmp_path, hu, affine)
    first = pydicom.dcmread(_sorted_files(tmp_path / "series")[0])
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in first.PixelSpacing] == [0.8, 0.7]  # [row, column] spacing
    # RAS affine of an axial IOP [1,0,0,0,1,0] series: diag(-sx, -sy, sz), LPS origin flipped
    expected = np.diag([-0.7, -0.8, 2.5, 1.0])
    expected[:3, 3] = [-float(first.ImagePositionPatient[0]), -float(first.ImagePositionPatient[1]),
                       float(first.ImagePositionPatient[2])]
    np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.5))
    # voxel (i=col, j=row) is pixel_array[row=j, col=i]
    assert vol.array[5, 3, 0] == pytest.approx(float(first.pixel_array[3, 5]) + float(first.RescaleIntercept))


def test_oblique_affine_matches_nibabel_wrapper_and_itk_formula(tmp_path):
    dicomwrappers = pytest.importorskip("nibabel.nicom.dicomwrappers")
    hu = fac.simple_hu(SHAPE)
    affine = _affine(spacing=(0.6, 0.9, 2.0), rotation=_rotation(0.3, -0.2, 0.5))
    vol = _round_trip(tmp_path, hu, affine)
    first = pydicom.dcmread(_sorted_files(tmp_path / "series")[0])
    # nibabel indexes [row, col]; ours is [col, row]: swap the in-plane columns
    nib_lps = dicomwrappers.wrapper_from_data(first).affine
    ours_lps = LPS_TO_RAS @ vol.affine
    np.testing.assert_allclose(ours_lps[:3, [1, 0, 3]], nib_lps[:3, [0, 1, 3]], atol=1e-5)
    # ITK: direction [IOP[:3], IOP[3:], normal], spacing (PixelSpacing[1], PixelSpacing[0], dz), LPS
    iop = np.array(first.ImageOrientationPatient, dtype=float)
    ps = np.array(first.PixelSpacing, dtype=float)
    direction = np.column_stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])])
    itk = np.eye(4)
    itk[:3, :3] = direction @ np.diag([ps[1], ps[0], 2.0])
    itk[:3, 3] = np.array(first.ImagePositionPatient, dtype=float)
    np.testing.assert_allclose(vol.affine, LPS_TO_RAS @ itk, atol=1e-5)


@pytest.mark.parametrize("flips", [(-1, 1, 1), (1, -1, 1), (1, 1, -1), (-1, -1, -1)])
def test_flipped_axes(tmp_path, flips):
    hu = fac.simple_hu(SHAPE)
    affine = _affine(rotation=_rotation(0.1, 0.0, 0.2) @ np.diag(flips))
    vol = _round_trip(tmp_path, hu, affine)
    # independent of expected_read: a voxel's world point holds the same HU in the source grid
    for ijk in ([3, 7, 2], [0, 0, 0], [23, 19, 11]):
        world = vol.affine @ np.array([*ijk, 1.0])
        src = (np.linalg.inv(affine) @ world)[:3]
        np.testing.assert_allclose(src, np.round(src), atol=1e-4)
        assert vol.array[tuple(ijk)] == hu[tuple(np.round(src).astype(int))]


def test_anisotropic_spacing(tmp_path):
    vol = _round_trip(tmp_path, fac.simple_hu(SHAPE), _affine(spacing=(0.45, 1.3, 5.0)))
    assert vol.spacing == pytest.approx((0.45, 1.3, 5.0))
    assert vol.meta["slice_thickness"] == pytest.approx(5.0)


def test_gantry_tilt_keeps_the_shear(tmp_path):
    tilt = np.deg2rad(20.0)
    affine = _affine(spacing=(0.7, 0.7, 2.5), shear=(0.0, 2.5 * np.tan(tilt)))
    vol = _round_trip(tmp_path, fac.simple_hu(SHAPE), affine)
    step = vol.affine[:3, 2]
    assert step[1] == pytest.approx(2.5 * np.tan(tilt), abs=1e-5)  # sheared, not resampled
    assert vol.meta["slice_thickness"] == pytest.approx(2.5)


@pytest.mark.parametrize(
    "dtype,bits_stored,intercept",
    [(np.uint16, 16, -1024.0), (np.uint16, 12, -1024.0), (np.int16, 16, 0.0), (np.int16, 12, 0.0),
     (np.int16, 16, -1024.0), (np.uint8, 8, -1100.0), (np.int8, 8, 0.0)],
)
def test_signed_and_unsigned_storage(tmp_path, dtype, bits_stored, intercept):
    hu = fac.simple_hu(SHAPE)
    if np.dtype(dtype).itemsize == 1:
        hu = np.clip(hu, -1100 if dtype == np.uint8 else -128, -1100 + 255 if dtype == np.uint8 else 127)
    vol = _round_trip(tmp_path, hu, _affine(), dtype=dtype, bits_stored=bits_stored, intercept=intercept)
    assert vol.meta["orig_dtype"] == np.dtype(dtype).name


def test_unused_high_bits_are_ignored(tmp_path):
    hu = fac.simple_hu(SHAPE)
    paths = fac.write_ct_series(tmp_path / "s", hu, _affine(), dtype=np.uint16, bits_stored=12)
    for p in paths:  # old overlay bits above BitsStored must not leak into HU
        ds = pydicom.dcmread(p)
        ds.PixelData = (ds.pixel_array | np.uint16(0xA000)).tobytes()
        ds.save_as(p)
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "s").array, hu.astype(np.float32))


def test_per_slice_slope_and_intercept(tmp_path):
    hu = fac.simple_hu(SHAPE)
    slopes = np.array([0.5, 1.0, 2.0, 1.0, 0.25, 1.5, 1.0, 3.0, 1.0, 0.5, 2.0, 1.0])
    intercepts = np.array([-1024, -1000, -2048, -1024, -1024, -1500, 0, -3000, -1024, -1024, -2048, -1024.5])
    out = tmp_path / "s"
    fac.write_ct_series(out, hu, _affine(), slope=slopes, intercept=intercepts, dtype=np.int16)
    vol = read_dicom_series(out)
    want = np.round((hu - intercepts) / slopes) * slopes + intercepts
    np.testing.assert_allclose(vol.array, want, atol=1e-3)
    assert np.all(np.abs(vol.array - hu) <= slopes / 2 + 1e-3)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
@pytest.mark.parametrize("syntax", list(fac.TRANSFER_SYNTAXES))
def test_transfer_syntaxes(tmp_path, syntax, dtype):
    problem = fac.encoder_problem(syntax)
    if problem:
        pytest.skip(problem)
    hu = fac.simple_hu((34, 32, 5))  # JPEG 2000 (openjpeg, 6 resolutions) needs >= 32 px
    intercept = -1024.0 if dtype == np.uint16 else 0.0
    vol = _round_trip(tmp_path, hu, _affine(rotation=_rotation(0.2, 0.1, 0.0)), transfer_syntax=syntax,
                      dtype=dtype, bits_stored=12, intercept=intercept)
    assert vol.meta["transfer_syntax"] == fac.TRANSFER_SYNTAXES[syntax][0]


def test_jpeg2000_encoder_needs_32_pixels(tmp_path):
    with pytest.raises(ValueError, match="32"):
        fac.write_ct_series(tmp_path, fac.simple_hu(SHAPE), _affine(), transfer_syntax="jpeg2000_lossless")


def test_shuffled_names_and_instance_numbers_are_not_used(tmp_path):
    out = tmp_path / "s"
    paths = fac.write_ct_series(out, fac.simple_hu(SHAPE), _affine(), seed=3)
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths]
    assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)
    assert paths != sorted(paths) and paths != sorted(paths, reverse=True)
    _round_trip(tmp_path / "again", fac.simple_hu(SHAPE), _affine(), seed=3)
    # names and numbers in reverse slice order
    _round_trip(tmp_path / "plain", fac.simple_hu(SHAPE), _affine(spacing=(0.7, 0.8, -2.5)),
                shuffle_names=False, shuffle_instance_numbers=False)


def test_meta(tmp_path):
    out = tmp_path / "s"
    fac.write_ct_series(out, fac.simple_hu(SHAPE), _affine(), patient_id="PX9", series_uid="1.2.3.4",
                        study_uid="1.2.3", series_description="chest", slice_thickness=3.0)
    meta = read_dicom_series(out).meta
    assert meta == {
        "patient_id": "PX9", "study_uid": "1.2.3", "series_uid": "1.2.3.4", "modality": "CT",
        "series_description": "chest", "slice_thickness": 3.0, "orig_dtype": "uint16",
        "num_slices": SHAPE[2], "transfer_syntax": "1.2.840.10008.1.2.1",
    }


def test_extra_files_are_ignored(tmp_path):
    out = tmp_path / "s"
    hu = fac.simple_hu(SHAPE)
    fac.write_ct_series(out, hu, _affine())
    (out / "README").write_text("not dicom\n")
    (out / ".DS_Store").write_bytes(b"\x00" * 300)
    (out / "notes.dcm").write_bytes(b"\x00" * 128 + b"NOPE" + b"\x01" * 50)
    (out / "subdir").mkdir()
    fac.write_ct_series(out / "subdir", hu, _affine(), series_uid="9.9.9")  # not recursive
    # a DICOMDIR and a non-image object (structured report: no pixels, no position)
    for name, sop in [("DICOMDIR", "1.2.840.10008.1.3.10"), ("report.dcm", "1.2.840.10008.5.1.4.1.1.88.11")]:
        ds = pydicom.Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.SOPClassUID = sop
        ds.SeriesInstanceUID = "7.7.7"
        ds.save_as(out / name, enforce_file_format=True)
    series = list_series(out)
    assert len(series) == 1 and len(next(iter(series.values()))) == SHAPE[2]
    assert is_dicom_dir(out) and is_dicom_dir(out / "subdir")
    np.testing.assert_array_equal(read_dicom_series(out).array, hu.astype(np.float32))


def test_localizer_in_the_series_is_ignored(tmp_path):
    hu = fac.simple_hu(SHAPE)
    fac.write_ct_series(tmp_path, hu, _affine())
    scout = tmp_path / "scout.dcm"
    shutil.copy(_sorted_files(tmp_path)[0], scout)
    _edit(scout, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
          SOPInstanceUID=pydicom.uid.generate_uid())
    assert len(next(iter(list_series(tmp_path).values()))) == SHAPE[2]
    np.testing.assert_array_equal(read_dicom_series(tmp_path).array, hu)


def test_is_dicom_dir_false_cases(tmp_path):
    assert not is_dicom_dir(tmp_path / "missing")
    (tmp_path / "README").write_text("hi")
    assert not is_dicom_dir(tmp_path)
    with pytest.raises(DataError, match="no DICOM image"):
        read_dicom_series(tmp_path)


# -------------------------------------------------------------------- errors


def test_mixed_series_needs_series_uid(tmp_path):
    hu = fac.simple_hu(SHAPE)
    fac.write_ct_series(tmp_path, hu, _affine(), series_uid="1.2.826.0.1.111", name_prefix="a")
    fac.write_ct_series(tmp_path, hu[:, :, :5] + 1, _affine(spacing=(0.7, 0.8, 1.0)),
                        series_uid="1.2.826.0.1.222", name_prefix="b")
    with pytest.raises(DataError) as excinfo:
        read_dicom_series(tmp_path)
    msg = _one_line_error(excinfo, tmp_path)
    assert "2 series" in msg and "1.2.826.0.1.111" in msg and "1.2.826.0.1.222" in msg and "series_uid" in msg
    assert sorted(list_series(tmp_path)) == ["1.2.826.0.1.111", "1.2.826.0.1.222"]
    np.testing.assert_array_equal(read_dicom_series(tmp_path, "1.2.826.0.1.111").array, hu)
    np.testing.assert_array_equal(read_dicom_series(tmp_path, series_uid="1.2.826.0.1.222").array, hu[:, :, :5] + 1)
    with pytest.raises(DataError) as excinfo:
        read_dicom_series(tmp_path, series_uid="1.2.3.404")
    assert "1.2.3.404" in _one_line_error(excinfo, tmp_path)


def test_many_series_message_is_truncated(tmp_path):
    hu = fac.simple_hu((8, 8, 2))
    for n in range(6):
        fac.write_ct_series(tmp_path, hu, _affine(), series_uid=f"1.2.{n}", name_prefix=f"s{n}")
    with pytest.raises(DataError) as excinfo:
        read_dicom_series(tmp_path)
    msg = _one_line_error(excinfo, tmp_path)
    assert "6 series" in msg and "and 3 more" in msg


def test_missing_slice(tmp_path):
    fac.write_ct_series(tmp_path, fac.simple_hu(SHAPE), _affine())
    os.remove(_sorted_files(tmp_path)[5])
    with pytest.raises(DataError, match="missing slice") as excinfo:
        read_dicom_series(tmp_path)
    _one_line_error(excinfo, tmp_path)


def _move_slice(path, delta_lps):
    ds = pydicom.dcmread(path)
    _edit(path, ImagePositionPatient=[float(v) + d for v, d in zip(ds.ImagePositionPatient, delta_lps)])


def test_inconsistent_spacing(tmp_path):
    fac.write_ct_series(tmp_path, fac.simple_hu(SHAPE), _affine())
    _move_slice(_sorted_files(tmp_path)[6], (0, 0, 0.4))  # steps 2.9 / 2.1 mm: no gap, not uniform
    with pytest.raises(DataError, match="inconsistent slice spacing") as excinfo:
        read_dicom_series(tmp_path)
    _one_line_error(excinfo, tmp_path)


def test_in_plane_drift_is_inconsistent_spacing(tmp_path):
    fac.write_ct_series(tmp_path, fac.simple_hu(SHAPE), _affine())
    _move_slice(_sorted_files(tmp_path)[4], (1.0, 0, 0))
    with pytest.raises(DataError, match="inconsistent slice spacing"):
        read_dicom_series(tmp_path)


def test_small_position_jitter_is_tolerated(tmp_path):
    hu = fac.simple_hu(SHAPE)
    fac.write_ct_series(tmp_path, hu, _affine())
    _move_slice(_sorted_files(tmp_path)[6], (0.005, -0.005, 0.01))
    vol = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(vol.array, hu)
    np.testing.assert_allclose(vol.affine, _affine(), atol=1e-3)


def test_duplicate_position(tmp_path):
    fac.write_ct_series(tmp_path, fac.simple_hu(SHAPE), _affine())
    src = _sorted_files(tmp_path)[3]
    shutil.copy(src, tmp_path / "copy.dcm")
    _edit(tmp_path / "copy.dcm", SOPInstanceUID=pydicom.uid.generate_uid())
    with pytest.raises(DataError, match="duplicate slice position") as excinfo:
        read_dicom_series(tmp_path)
    msg = _one_line_error(excinfo, tmp_path)
    assert "copy.dcm" in msg and os.path.basename(src) in msg


def test_single_slice_is_not_a_volume(tmp_path):
    paths = fac.write_ct_series(tmp_path, fac.simple_hu(SHAPE)[:, :, :1], _affine())
    with pytest.raises(DataError, match="single 2D image") as excinfo:
        read_dicom_series(tmp_path)
    _one_line_error(excinfo, paths[0])


@pytest.mark.parametrize("keep", ["pixels", "header"])
def test_truncated_file(tmp_path, keep):
    fac.write_ct_series(tmp_path, fac.simple_hu(SHAPE), _affine())
    victim = _sorted_files(tmp_path)[4]
    data = open(victim, "rb").read()
    cut = len(data) - 200 if keep == "pixels" else 600
    with open(victim, "wb") as fh:
        fh.write(data[:cut])
    with pytest.raises(DataError) as excinfo:
        read_dicom_series(tmp_path)
    msg = _one_line_error(excinfo, victim)
    assert "truncated" in msg or "less than expected" in msg


def test_different_orientation(tmp_path):
    fac.write_ct_series(tmp_path, fac.simple_hu(SHAPE), _affine())
    c, s = np.cos(0.1), np.sin(0.1)
    _edit(_sorted_files(tmp_path)[7], ImageOrientationPatient=[c, s, 0, -s, c, 0])
    with pytest.raises(DataError, match="different orientations") as excinfo:
        read_dicom_series(tmp_path)
    _one_line_error(excinfo, tmp_path)


def test_different_rows_or_pixel_spacing(tmp_path):
    hu = fac.simple_hu(SHAPE)
    a = tmp_path / "a"
    fac.write_ct_series(a, hu[:, :, :6], _affine(), series_uid="1.2.5")
    fac.write_ct_series(a, hu[:, :18, 6:], _affine(origin=(10, -20, 45)), series_uid="1.2.5", name_prefix="x")
    with pytest.raises(DataError, match="Rows x Columns") as excinfo:
        read_dicom_series(a)
    _one_line_error(excinfo, a)
    b = tmp_path / "b"
    fac.write_ct_series(b, hu, _affine())
    _edit(_sorted_files(b)[2], PixelSpacing=[0.8, 0.75])
    with pytest.raises(DataError, match="PixelSpacing") as excinfo:
        read_dicom_series(b)
    _one_line_error(excinfo, b)


def test_multi_frame_is_not_supported(tmp_path):
    fac.write_ct_series(tmp_path, fac.simple_hu(SHAPE), _affine())
    victim = _sorted_files(tmp_path)[0]
    _edit(victim, NumberOfFrames=2)
    with pytest.raises(DataError, match="multi-frame.*not supported") as excinfo:
        read_dicom_series(tmp_path)
    _one_line_error(excinfo, victim)


def test_missing_decoder_names_file_syntax_and_extra(tmp_path, monkeypatch):
    from pydicom.pixels import get_decoder

    fac.write_ct_series(tmp_path, fac.simple_hu(SHAPE), _affine(), transfer_syntax="rle_lossless")
    decoder = get_decoder(pydicom.uid.RLELossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg-rle",)})
    with pytest.raises(DataError) as excinfo:
        read_dicom_series(tmp_path)
    msg = _one_line_error(excinfo, tmp_path)
    assert ".dcm" in msg and "RLE Lossless" in msg and "rr_tf[dicom]" in msg


def test_import_without_pydicom():
    code = (
        "import sys; sys.modules['pydicom'] = None\n"
        "import rr_tf.data.dicom as d\n"
        "try:\n    d.read_dicom_series('.')\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = run_logged([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "ERR" in res.stdout and "rr_tf[dicom]" in res.stdout
