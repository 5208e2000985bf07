"""Read one CT DICOM series (a folder of single-frame slices) into a ``Volume``.

Geometry: ``array[i, j, k]`` with ``i`` the column index (along the row
direction cosine ``IOP[:3]``, step ``PixelSpacing[1]``), ``j`` the row index
(along ``IOP[3:]``, step ``PixelSpacing[0]``) and ``k`` the slice index after
sorting slices by ``ImagePositionPatient`` projected on the slice normal
``IOP[:3] x IOP[3:]`` (ascending; file names and InstanceNumber are ignored).
The affine's third column is the mean step between consecutive sorted slice
positions, so gantry tilt (a sheared stack) is kept rather than resampled;
the translation is the first sorted slice's position.  The LPS affine is
converted to RAS+ with ``LPS_TO_RAS`` like nibabel/dcm2niix outputs, e.g. an
axial series with IOP ``[1,0,0,0,1,0]`` gets ``diag(-sx, -sy, sz)``.

Values are ``stored * RescaleSlope + RescaleIntercept`` per slice (slices may
differ) as float32 HU; signedness and ``BitsStored < BitsAllocated`` follow
``PixelRepresentation``.

Tolerances (a series outside them is rejected with a one-line ``DataError``):

* orientation: direction cosines equal within ``ORIENTATION_TOL`` (1e-4);
* in-plane: same Rows/Columns; PixelSpacing equal within 1e-4 relative;
* duplicates: two slices closer than ``DUPLICATE_TOL_MM`` (0.01 mm) along the
  normal;
* missing slices: a step along the normal more than ``GAP_FACTOR`` (1.5) times
  the median step;
* inconsistent spacing: a step vector (3D, so in-plane drift counts too) or a
  slice position off the uniform grid ``first + k * mean_step`` by more than
  ``max(SPACING_REL_TOL * |mean step|, SPACING_ABS_TOL_MM)`` = max(1 %, 0.02 mm)
  (0.02 mm absorbs positions written with two decimals).

Not supported (clear error): multi-frame / enhanced images, colour images,
single-slice "volumes".  pydicom is imported lazily: ``pip install rr_tf[dicom]``.
"""

import os

import numpy as np

from rr_tf.data.volume import LPS_TO_RAS, Volume
from rr_tf.errors import DataError

EXTRA_HINT = "pip install rr_tf[dicom]"
ORIENTATION_TOL = 1e-4
PIXEL_SPACING_RTOL = 1e-4
DUPLICATE_TOL_MM = 0.01
GAP_FACTOR = 1.5
SPACING_REL_TOL = 0.01
SPACING_ABS_TOL_MM = 0.02
_MAX_UIDS_SHOWN = 3


def _pydicom():
    try:
        import pydicom
    except ImportError as err:
        raise ImportError(
            f"reading DICOM needs pydicom and its JPEG plugins: {EXTRA_HINT}"
        ) from err
    return pydicom


def _has_dicm_preamble(path):
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_image(ds):
    """Header-only test for an image object (not DICOMDIR, SR, RT plan ...)."""
    if "Rows" not in ds or "Columns" not in ds:
        return False
    if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
        return False  # scout/topogram stored in the CT series
    if "ImagePositionPatient" in ds:
        return True
    # enhanced multi-frame images keep positions in functional groups; keep
    # them so that reading says "not supported" instead of "no images"
    return _num_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def _num_frames(ds):
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _candidate_files(directory):
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise DataError(directory, "not a folder")
    paths = []
    with os.scandir(directory) as it:
        for entry in it:
            if entry.is_file() and not entry.name.startswith("."):
                paths.append(entry.path)
    return sorted(paths)


_DEFLATED = ("1.2.840.10008.1.2.1.99",)


def _read_header(pydicom, path):
    """(header dataset, image?) or raise DataError for a corrupt/truncated file."""
    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            # dcmread stops *at* the pixel data tag: nothing left = no pixels
            has_pixels = fh.tell() < os.fstat(fh.fileno()).st_size
    except Exception as err:  # noqa: BLE001 - any parse failure is corruption
        raise DataError(path, f"corrupt DICOM header ({type(err).__name__}: {err})") from err
    meta = getattr(ds, "file_meta", None) or {}
    if str(meta.get("TransferSyntaxUID", "")) in _DEFLATED:
        has_pixels = True  # whole stream inflated up front; rely on the tags
    if not has_pixels:
        sop = meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
        sop_name = getattr(sop, "name", "") or ""
        if sop is None or "Rows" in ds or "Image Storage" in sop_name:
            raise DataError(path, "truncated or corrupt DICOM file: header ends without pixel data")
        return ds, False
    return ds, _is_image(ds)


def _scan(directory):
    """SeriesInstanceUID -> [(path, header dataset)] for the image files."""
    pydicom = _pydicom()
    series = {}
    for path in _candidate_files(directory):
        if not _has_dicm_preamble(path):
            continue
        ds, image = _read_header(pydicom, path)
        if image:
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            series.setdefault(uid, []).append((path, ds))
    return series


def list_series(directory):
    """SeriesInstanceUID -> sorted file paths of the image files in ``directory``.

    Not recursive.  Reads headers only; hidden files, files without the 'DICM'
    preamble (README ...) and non-image objects (DICOMDIR, reports: no pixel
    data, Rows or ImagePositionPatient; ImageType LOCALIZER scouts) are ignored.  A file with the preamble whose header
    cannot be parsed raises ``DataError`` naming it.
    """
    return {uid: [p for p, _ in items] for uid, items in _scan(directory).items()}


def first_patient_id(directory):
    """PatientID of the first DICOM image header in ``directory`` (or None).

    Header-only and cheap; used to split and pair cases by patient before
    any pixel data is read.
    """
    try:
        pydicom = _pydicom()
        paths = _candidate_files(directory)
    except (ImportError, DataError, OSError):
        return None
    for path in paths:
        if not _has_dicm_preamble(path):
            continue
        try:
            ds, is_image = _read_header(pydicom, path)
        except DataError:
            continue
        if is_image:
            pid = str(ds.get("PatientID", "") or "").strip()
            return pid or None
    return None


def is_dicom_dir(directory):
    """True if ``directory`` (not recursive) holds at least one DICOM image file.

    Cheap: stops at the first file with the 'DICM' preamble whose header is an
    image (without pydicom installed, the preamble alone decides).
    """
    try:
        paths = _candidate_files(directory)
    except (DataError, OSError):
        return False
    try:
        pydicom = _pydicom()
    except ImportError:
        pydicom = None
    for path in paths:
        if not _has_dicm_preamble(path):
            continue
        if pydicom is None:
            if os.path.basename(path).upper() != "DICOMDIR":
                return True
            continue
        try:
            if _read_header(pydicom, path)[1]:
                return True
        except DataError:  # a corrupt file is not evidence either way
            continue
    return False


def _floats(ds, keyword, path, count):
    value = ds.get(keyword)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = None
    if out is None or out.shape != (count,) or not np.all(np.isfinite(out)):
        raise DataError(path, f"missing or invalid {keyword} ({value!r})")
    return out


def _float_or(ds, keyword, default, path):
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = float("nan")
    if not np.isfinite(out):
        raise DataError(path, f"invalid {keyword} ({value!r})")
    return out


def _choose_series(directory, series, series_uid):
    if not series:
        raise DataError(directory, "no DICOM image files in this folder")
    if series_uid is not None:
        if series_uid not in series:
            raise DataError(
                directory,
                f"series_uid {series_uid} not found; series here: {_describe(series)}",
            )
        return series[series_uid]
    if len(series) > 1:
        raise DataError(
            directory,
            f"{len(series)} series in one folder: {_describe(series)}; "
            "pass series_uid to choose one",
        )
    return next(iter(series.values()))


def _describe(series):
    items = sorted(series.items(), key=lambda kv: -len(kv[1]))
    shown = [f"{uid or '<no SeriesInstanceUID>'} ({len(files)} files)" for uid, files in items[:_MAX_UIDS_SHOWN]]
    more = len(items) - _MAX_UIDS_SHOWN
    return ", ".join(shown) + (f", and {more} more" if more > 0 else "")


def _geometry(directory, items):
    """Validate headers; return (sorted items, affine RAS) or raise DataError."""
    for path, ds in items:
        if _num_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            raise DataError(
                path,
                f"multi-frame (enhanced) DICOM with {_num_frames(ds)} frames is not supported yet; "
                "convert it to single-frame slices (e.g. dcm4che emf2sf) or to NIfTI (dcm2niix)",
            )
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise DataError(path, f"colour image (SamplesPerPixel={ds.SamplesPerPixel}) is not a CT slice")
    if len(items) < 2:
        raise DataError(
            items[0][0] if items else directory,
            f"only {len(items)} slice in the series; a single 2D image is not a volume",
        )

    path0, ds0 = items[0]
    iop0 = _floats(ds0, "ImageOrientationPatient", path0, 6)
    ps0 = _floats(ds0, "PixelSpacing", path0, 2)
    shape0 = (int(ds0.Rows), int(ds0.Columns))
    positions = []
    for path, ds in items:
        iop = _floats(ds, "ImageOrientationPatient", path, 6)
        if np.max(np.abs(iop - iop0)) > ORIENTATION_TOL:
            raise DataError(
                directory,
                f"slices have different orientations: {os.path.basename(path0)} has "
                f"ImageOrientationPatient {_fmt(iop0)}, {os.path.basename(path)} has {_fmt(iop)}",
            )
        shape = (int(ds.Rows), int(ds.Columns))
        if shape != shape0:
            raise DataError(
                directory,
                f"slices have different Rows x Columns: {shape0[0]}x{shape0[1]} in "
                f"{os.path.basename(path0)}, {shape[0]}x{shape[1]} in {os.path.basename(path)}",
            )
        ps = _floats(ds, "PixelSpacing", path, 2)
        if not np.allclose(ps, ps0, rtol=PIXEL_SPACING_RTOL, atol=1e-6):
            raise DataError(
                directory,
                f"slices have different PixelSpacing: {_fmt(ps0)} in {os.path.basename(path0)}, "
                f"{_fmt(ps)} in {os.path.basename(path)}",
            )
        positions.append(_floats(ds, "ImagePositionPatient", path, 3))
    if np.any(ps0 <= 0):
        raise DataError(path0, f"non-positive PixelSpacing {_fmt(ps0)}")

    row_cos, col_cos = iop0[:3], iop0[3:]
    norms = np.linalg.norm(row_cos), np.linalg.norm(col_cos)
    if min(norms) < 0.5 or abs(float(row_cos @ col_cos)) > 0.01 * norms[0] * norms[1]:
        raise DataError(path0, f"ImageOrientationPatient {_fmt(iop0)} is not two orthogonal unit vectors")
    row_cos, col_cos = row_cos / norms[0], col_cos / norms[1]
    normal = np.cross(row_cos, col_cos)
    positions = np.asarray(positions)
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    items = [items[n] for n in order]
    positions, dist = positions[order], dist[order]
    names = [os.path.basename(p) for p, _ in items]

    steps_n = np.diff(dist)
    for n, s in enumerate(steps_n):
        if s < DUPLICATE_TOL_MM:
            raise DataError(
                directory,
                f"duplicate slice position {dist[n]:.3f} mm along the normal: "
                f"{names[n]} and {names[n + 1]}",
            )
    median = float(np.median(steps_n))
    for n, s in enumerate(steps_n):
        if s > GAP_FACTOR * median:
            raise DataError(
                directory,
                f"missing slice(s): gap of {s:.3f} mm between {names[n]} and {names[n + 1]} "
                f"(median spacing {median:.3f} mm, about {round(s / median) - 1} slice(s) missing)",
            )
    steps = np.diff(positions, axis=0)
    mean_step = steps.mean(axis=0)
    tol = max(SPACING_REL_TOL * float(np.linalg.norm(mean_step)), SPACING_ABS_TOL_MM)
    step_dev = np.linalg.norm(steps - mean_step, axis=1)
    grid = positions[0] + np.arange(len(positions))[:, None] * mean_step
    grid_dev = np.linalg.norm(positions - grid, axis=1)
    if step_dev.max() > tol or grid_dev.max() > tol:
        n = int(np.argmax(step_dev))
        raise DataError(
            directory,
            f"inconsistent slice spacing: steps along the normal range "
            f"{steps_n.min():.4f}-{steps_n.max():.4f} mm (mean step {_fmt(mean_step)}), worst step "
            f"{names[n]} -> {names[n + 1]} off by {step_dev[n]:.4f} mm, max off-grid {grid_dev.max():.4f} mm, "
            f"tolerance {tol:.4f} mm",
        )

    affine = np.eye(4)
    affine[:3, 0] = row_cos * ps0[1]
    affine[:3, 1] = col_cos * ps0[0]
    affine[:3, 2] = mean_step
    affine[:3, 3] = positions[0]
    return items, LPS_TO_RAS @ affine


def _fmt(values):
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"


def _check_decoder(path, ds):
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax is None:
        return
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # older pydicom: let pixel_array report
        return
    label = f"{tsyntax.name} ({tsyntax})" if tsyntax.name != str(tsyntax) else str(tsyntax)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as err:
        raise DataError(path, f"transfer syntax {label} cannot be decoded by pydicom") from err
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise DataError(
            path,
            f"no decoder installed for transfer syntax {label} ({missing}); {EXTRA_HINT}",
        )


def _stored_values(ds):
    """pixel_array as a signed/unsigned integer array per PixelRepresentation."""
    arr = ds.pixel_array
    if arr.dtype.kind not in "iu":
        raise ValueError(f"unexpected pixel dtype {arr.dtype}")
    bits_alloc = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored", bits_alloc) or bits_alloc)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    width = 8 * arr.dtype.itemsize
    want = np.dtype(f"{'i' if signed else 'u'}{arr.dtype.itemsize}")
    if not arr.dtype.isnative:  # e.g. '>u2' from Explicit VR Big Endian
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype != want:  # same width, other signedness: reinterpret the bits
        arr = arr.view(want) if arr.dtype.itemsize == want.itemsize else arr.astype(want)
    if bits_stored < width:
        shift = width - bits_stored
        if signed:  # sign-extend from BitsStored; idempotent if already done
            arr = np.right_shift(np.left_shift(arr, shift), shift)
        else:  # drop unused high bits (old overlay bits)
            arr = arr & want.type((1 << bits_stored) - 1)
    return arr


def _read_slice(pydicom, path, header, shape):
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # noqa: BLE001
        raise DataError(path, f"corrupt or truncated DICOM file ({type(err).__name__}: {err})") from err
    if "PixelData" not in ds:
        raise DataError(path, "image header but no PixelData (truncated file?)")
    _check_decoder(path, ds)
    try:
        stored = _stored_values(ds)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - decoder / length errors
        tsyntax = ds.file_meta.get("TransferSyntaxUID", "?")
        raise DataError(
            path,
            f"cannot decode pixel data (transfer syntax {getattr(tsyntax, 'name', tsyntax)}; truncated or corrupt file?): "
            f"{type(err).__name__}: {err}",
        ) from err
    if stored.shape != shape:
        raise DataError(path, f"pixel array shape {stored.shape} differs from Rows x Columns {shape}")
    slope = _float_or(header, "RescaleSlope", 1.0, path)
    intercept = _float_or(header, "RescaleIntercept", 0.0, path)
    if slope == 0:
        raise DataError(path, "RescaleSlope is 0")
    hu = stored.astype(np.float64) * slope + intercept
    return hu.T.astype(np.float32), stored.dtype


def read_dicom_series(directory, series_uid=None):
    """Read the CT series in ``directory`` (not recursive) as a float32 HU ``Volume``.

    With several series in the folder ``series_uid`` must name one.  See the
    module docstring for geometry, tolerances and the errors raised.
    """
    directory = os.fspath(directory)
    pydicom = _pydicom()
    items = _choose_series(directory, _scan(directory), series_uid)
    items, affine = _geometry(directory, items)

    ds0 = items[0][1]
    shape = (int(ds0.Rows), int(ds0.Columns))
    array = np.empty((shape[1], shape[0], len(items)), dtype=np.float32)
    orig_dtypes = []
    for k, (path, header) in enumerate(items):
        array[:, :, k], dtype = _read_slice(pydicom, path, header, shape)
        orig_dtypes.append(str(dtype))

    thickness = ds0.get("SliceThickness")
    try:
        thickness = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness = None
    tsyntax = getattr(ds0, "file_meta", {}).get("TransferSyntaxUID", "")
    meta = {
        "patient_id": str(ds0.get("PatientID", "") or ""),
        "study_uid": str(ds0.get("StudyInstanceUID", "") or ""),
        "series_uid": str(ds0.get("SeriesInstanceUID", "") or ""),
        "modality": str(ds0.get("Modality", "") or ""),
        "series_description": str(ds0.get("SeriesDescription", "") or ""),
        "slice_thickness": thickness,
        "orig_dtype": orig_dtypes[0] if len(set(orig_dtypes)) == 1 else ",".join(sorted(set(orig_dtypes))),
        "num_slices": len(items),
        "transfer_syntax": str(tsyntax),
    }
    return Volume(array=array, affine=affine, source=directory, meta=meta)
