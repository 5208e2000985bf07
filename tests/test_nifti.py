import gzip
import os

import numpy as np
import pytest

from rr_tf.errors import DataError
from rr_tf.data import nifti
from nifti_factory import make_affine, ramp_volume, rotation, write


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32, np.float32, np.float64, np.uint8])
def test_reads_any_dtype_as_float32(tmp_path, dtype):
    data = np.arange(4 * 5 * 6).reshape(4, 5, 6) % 200
    path = write(tmp_path / "a.nii.gz", data, np.eye(4), dtype=dtype)
    vol = nifti.read_nifti(path)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, data.astype(np.float32))
    assert vol.meta["orig_dtype"] == np.dtype(dtype).name


def test_applies_scl_slope_and_inter(tmp_path):
    stored = np.arange(60, dtype=np.uint16).reshape(3, 4, 5) * 10
    path = write(tmp_path / "s.nii", stored, np.eye(4), dtype=np.uint16, slope=0.5, inter=-1024)
    vol = nifti.read_nifti(path)
    np.testing.assert_allclose(vol.array, stored * 0.5 - 1024)
    assert vol.meta["scl_slope"] == 0.5 and vol.meta["scl_inter"] == -1024


def test_keeps_oblique_affine_and_qform_only(tmp_path):
    aff = make_affine((0.7, 0.8, 2.5), rot=rotation(2, 25) @ rotation(0, 10), flips=(-1, 1, -1),
                      perm=(1, 0, 2), origin=(10, -20, 30))
    data = ramp_volume((6, 7, 8))
    vol = nifti.read_nifti(write(tmp_path / "o.nii.gz", data, aff))
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 2.5), atol=1e-6)
    vol2 = nifti.read_nifti(write(tmp_path / "q.nii.gz", data, aff, sform=False))
    assert vol2.meta["sform_code"] == 0
    np.testing.assert_allclose(vol2.affine, aff, atol=1e-4)


def test_4d_with_single_volume_is_accepted(tmp_path):
    data = ramp_volume((5, 6, 7))[..., None]
    vol = nifti.read_nifti(write(tmp_path / "t.nii.gz", data, np.eye(4)))
    assert vol.shape == (5, 6, 7)


def _expect_error(path, match, kind="image"):
    with pytest.raises(DataError, match=match) as info:
        nifti.read_nifti(path, kind=kind)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_bad_files_give_one_line_errors(tmp_path):
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    _expect_error(empty, "empty file")

    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"this is not a nifti file at all" * 20)
    _expect_error(garbage, "not a readable NIfTI")

    good = write(tmp_path / "good.nii.gz", ramp_volume((20, 20, 20)), np.eye(4), dtype=np.int16)
    raw = open(good, "rb").read()
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(raw[: len(raw) // 2])
    _expect_error(trunc, "truncated or corrupt|not a readable")

    corrupt = tmp_path / "corrupt.nii.gz"
    body = bytearray(gzip.decompress(raw))
    comp = bytearray(gzip.compress(bytes(body)))
    comp[len(comp) // 2: len(comp) // 2 + 50] = b"\x00" * 50
    corrupt.write_bytes(bytes(comp))
    _expect_error(corrupt, "truncated or corrupt|not a readable")

    _expect_error(write(tmp_path / "flat.nii", np.zeros((8, 9)), np.eye(4)), "2D image")
    _expect_error(write(tmp_path / "4d.nii", np.zeros((4, 4, 4, 3)), np.eye(4)), "4D image")
    _expect_error(write(tmp_path / "thin.nii", np.zeros((4, 4, 1)), np.eye(4)), "not a 3D volume")

    nan = ramp_volume((5, 5, 5))
    nan[1, 2, 3] = np.nan
    nan[0, 0, 0] = np.inf
    _expect_error(write(tmp_path / "nan.nii.gz", nan, np.eye(4)), "2 NaN/Inf voxels")
    _expect_error(tmp_path / "missing.nii.gz", "does not exist")


def test_label_checks(tmp_path):
    lab = np.zeros((5, 5, 5))
    lab[1:3, 1:3, 1:3] = 2
    vol = nifti.read_nifti(write(tmp_path / "ok.nii.gz", lab, np.eye(4), dtype=np.float32), kind="label")
    assert vol.array.dtype == np.uint8 and set(np.unique(vol.array)) == {0, 2}
    frac = lab.copy()
    frac[0, 0, 0] = 0.5
    _expect_error(write(tmp_path / "frac.nii.gz", frac, np.eye(4), dtype=np.float32), "non-integer", "label")
    neg = lab.copy()
    neg[0, 0, 0] = -1
    _expect_error(write(tmp_path / "neg.nii.gz", neg, np.eye(4), dtype=np.int16), "negative", "label")
    big = lab.copy()
    big[0, 0, 0] = 300
    _expect_error(write(tmp_path / "big.nii.gz", big, np.eye(4), dtype=np.int16), "exceeds 255", "label")


def test_write_nifti_round_trip_and_atomic(tmp_path):
    aff = make_affine((0.9, 0.9, 3.0), rot=rotation(1, 15), origin=(1, 2, 3))
    data = (ramp_volume((6, 7, 8))).astype(np.int16)
    out = nifti.write_nifti(tmp_path / "sub" / "w.nii.gz", data, aff, {"qform_code": 1, "sform_code": 2})
    vol = nifti.read_nifti(out)
    np.testing.assert_array_equal(vol.array, data)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    assert vol.meta["sform_code"] == 2
    assert os.listdir(tmp_path / "sub") == ["w.nii.gz"]


def test_case_name():
    assert nifti.case_name("/x/case_01.nii.gz") == "case_01"
    assert nifti.case_name("y.NII") == "y"


def _forged_header(shape=(1024, 1024, 1024), dtype=np.int16):
    """The header bytes (+ the empty extension flag) of a NIfTI-1 file that
    declares ``shape`` voxels, with no voxel data after it."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(np.eye(4), code=1)
    return hdr.binaryblock + b"\0" * 4


def test_forged_header_is_refused_before_any_voxel_is_read(tmp_path):
    """A tiny file whose header declares 1024^3 int16 voxels (2 GiB) is one
    DataError line naming it, from the header and the file size alone; the
    reader's peak memory stays small (measured in a child process)."""
    import subprocess
    import sys

    forged = tmp_path / "forged.nii.gz"
    forged.write_bytes(gzip.compress(_forged_header()))
    assert forged.stat().st_size < 200
    plain = tmp_path / "forged.nii"
    plain.write_bytes(_forged_header() + b"\0" * 1000)
    for path in (forged, plain):
        for read in (nifti.peek_nifti, nifti.read_nifti):
            with pytest.raises(DataError, match="truncated or corrupt: header declares "
                               "1024x1024x1024 int16") as info:
                read(path)
            assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    # The peak is read from /proc/self/status (VmHWM belongs to the process's
    # own address space); getrusage's ru_maxrss survives execve on Linux and
    # would report the (large) pytest parent's peak at fork time.
    code = ("import sys\nfrom rr_tf.data import nifti\nfrom rr_tf.errors import DataError\n"
            "def hwm():\n    for line in open('/proc/self/status'):\n"
            "        if line.startswith('VmHWM:'):\n            return int(line.split()[1])\n"
            "before = hwm()\n"
            "try:\n    nifti.read_nifti(sys.argv[1])\nexcept DataError as err:\n    print(err)\n"
            "print(hwm() - before)\n")
    if not os.path.exists("/proc/self/status"):
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", code, str(forged)], capture_output=True, text=True,
                         env=env, timeout=120)
    message, growth_kb = res.stdout.splitlines()
    # Reading 2 GiB would grow the peak by 2,000,000 kB; the refusal costs ~nothing.
    assert str(forged) in message and int(growth_kb) < 100_000, (message, growth_kb)


def test_declared_size_limit_and_multi_member_gzip(tmp_path):
    """--max_voxels refuses a big (real) header; a valid file compressed as
    several gzip members (bgzip style: the trailer only sizes the last,
    empty member) is counted through and read."""
    data = ramp_volume((10, 8, 6))
    path = write(tmp_path / "a.nii", data, np.eye(4), dtype=np.int16)
    with pytest.raises(DataError, match="480 voxels, more than the limit of 100"):
        nifti.peek_nifti(path, max_voxels=100)
    with pytest.raises(DataError, match="limit"):
        nifti.read_nifti(path, max_voxels=100)
    raw = open(path, "rb").read()
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:200]) + gzip.compress(raw[200:]) + gzip.compress(b""))
    np.testing.assert_array_equal(nifti.read_nifti(multi).array, data.astype(np.float32))
    cut = tmp_path / "cut.nii.gz"  # members lost from the end: shorter than the header says
    cut.write_bytes(gzip.compress(raw[:-100]) + gzip.compress(b""))
    with pytest.raises(DataError, match="truncated or corrupt: header declares 10x8x6 int16"):
        nifti.peek_nifti(cut)


def test_symbolic_link_loops_and_broken_links_say_so(tmp_path):
    loop = tmp_path / "loop.nii.gz"
    os.symlink(loop.name, loop)  # points at itself
    _expect_error(loop, "symbolic link loop")
    dangling = tmp_path / "gone.nii.gz"
    os.symlink("nowhere.nii.gz", dangling)
    _expect_error(dangling, "broken symbolic link .*'nowhere.nii.gz'")
    _expect_error(tmp_path / "missing.nii.gz", "file does not exist")
