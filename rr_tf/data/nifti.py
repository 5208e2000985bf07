"""NIfTI-1/2 reading and writing (``.nii``, ``.nii.gz``) through nibabel.

Reading applies ``scl_slope`` / ``scl_inter``, accepts any integer or float
dtype and any (also oblique) affine, and keeps the header facts needed to
write results back in the file's exact geometry.
"""

import errno
import gzip
import os
import zlib

import numpy as np

from rr_tf.errors import DataError
from rr_tf.data.volume import Volume

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Largest image (voxels over all axes) a header may declare: 2^31 int16
# voxels are 4 GB. A forged header is refused before any voxel is read.
MAX_VOXELS = 2 ** 31
# deflate cannot compress better than about 1032:1 (a 258-byte match coded in
# 2 bits), so a .nii.gz of N bytes holds at most ~1032 N bytes of data
_DEFLATE_MAX_RATIO = 1032


def is_nifti(path):
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def case_name(path):
    """File name without the NIfTI suffix: ``/a/case_01.nii.gz`` -> ``case_01``."""
    base = os.path.basename(str(path).rstrip("/"))
    for suffix in NIFTI_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _load_header(path, max_voxels=MAX_VOXELS):
    import nibabel as nib

    if not os.path.exists(path):
        raise DataError(path, _missing_reason(path))
    if os.path.getsize(path) == 0:
        raise DataError(path, "empty file")
    try:
        img = nib.load(path)
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, ValueError,
            zlib.error, gzip.BadGzipFile) as err:
        raise DataError(path, f"not a readable NIfTI file ({type(err).__name__}: {err})")
    check_data_size(path, img, max_voxels)
    return img


def _missing_reason(path):
    """Why ``path`` cannot be opened although it may be listed in its folder:
    a symbolic link loop, a link to nothing, or no such file."""
    if not os.path.islink(path):
        return "file does not exist"
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself)"
    return f"broken symbolic link (its target {os.readlink(path)!r} does not exist)"


def check_data_size(path, img, max_voxels=MAX_VOXELS):
    """Refuses (DataError naming ``path``) a header whose declared voxel data
    the file cannot hold, or larger than ``max_voxels``, before any voxel is
    read: a 65-byte .nii.gz declaring 1024^3 voxels must not make the reader
    allocate gigabytes. An uncompressed file must hold vox_offset + the data
    bytes; a .nii.gz must be able to (deflate's best ratio), and its gzip
    trailer (ISIZE: the last member's size mod 2^32) must agree, else its
    stream is counted in bounded memory."""
    shape = tuple(int(n) for n in img.shape)
    voxels = int(np.prod(shape, dtype=np.float64)) if shape else 0
    dims = "x".join(map(str, shape))
    if max_voxels and voxels > max_voxels:
        raise DataError(path, f"header declares {dims} = {voxels} voxels, more than the limit of "
                        f"{max_voxels} (max_voxels; prepare_data.py --max_voxels)")
    dtype = img.header.get_data_dtype()
    # where the reader starts (a vox_offset of 0 in a .nii means "after the header")
    offset = getattr(img.dataobj, "offset", None)
    offset = int(img.header.get_data_offset() if offset is None else offset)
    need = offset + voxels * dtype.itemsize
    size = os.path.getsize(path)
    declared = f"header declares {dims} {dtype} voxels ({need} bytes with the header)"
    if not str(path).lower().endswith(".gz"):
        if size < need:
            raise DataError(path, f"truncated or corrupt: {declared} but the file holds only "
                            f"{size} bytes")
        return
    if need > _DEFLATE_MAX_RATIO * size + 4096:
        raise DataError(path, f"truncated or corrupt: {declared} but {size} gzip bytes cannot "
                        "hold that much")
    with open(path, "rb") as f:
        f.seek(max(size - 4, 0))
        isize = int.from_bytes(f.read(4), "little")
    if (isize >= need) if need < 2 ** 32 else (isize == need % 2 ** 32):
        return
    got = _gzip_length(path, need)
    if got < need:
        raise DataError(path, f"truncated or corrupt: {declared} but the file decompresses to "
                        f"{got} bytes")


def _gzip_length(path, limit, chunk=1 << 20):
    """Uncompressed bytes of a gzip file, counted up to ``limit`` in chunks
    (bounded memory); DataError when the stream is broken."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while total < limit:
                block = f.read(min(chunk, limit - total))
                if not block:
                    break
                total += len(block)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(path, f"truncated or corrupt gzip stream ({type(err).__name__}: {err})")
    return total


def _spatial_shape(path, shape):
    """Accept 3D or 4D with a single trailing volume; reject the rest."""
    if len(shape) == 3:
        return tuple(shape)
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        return tuple(shape[:3])
    if len(shape) < 3:
        raise DataError(path, f"{len(shape)}D image of shape {tuple(shape)}; a 3D volume is required")
    raise DataError(path, f"{len(shape)}D image of shape {tuple(shape)}; a single 3D volume is "
                    "required (split 4D series first)")


def peek_nifti(path, max_voxels=MAX_VOXELS):
    """Header-only check: returns (spatial shape, affine). Cheap; no voxel
    read (a .nii.gz whose gzip trailer disagrees with its header is counted
    through once, in bounded memory). ``max_voxels``: see
    :func:`check_data_size`."""
    img = _load_header(path, max_voxels)
    shape = _spatial_shape(path, img.shape)
    if min(shape) < 2:
        raise DataError(path, f"image of shape {shape} is not a 3D volume (an axis has size < 2)")
    return shape, np.asarray(img.affine, dtype=np.float64)


def read_nifti(path, kind="image", max_voxels=MAX_VOXELS):
    """Reads a NIfTI file into a :class:`Volume`.

    Args:
      path: ``.nii`` or ``.nii.gz`` file.
      kind: ``"image"`` (float32 after scaling; NaN/Inf rejected) or
        ``"label"`` (integer array; must hold non-negative whole numbers).
      max_voxels: the largest image the header may declare; the declared
        data is also checked against the file's size before it is read
        (:func:`check_data_size`).

    Raises:
      DataError: naming the file and the reason.
    """
    path = str(path)
    img = _load_header(path, max_voxels)
    shape = _spatial_shape(path, img.shape)
    if min(shape) < 2:
        raise DataError(path, f"image of shape {shape} is not a 3D volume (an axis has size < 2)")
    header = img.header
    try:
        if kind == "image":
            data = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope/inter
        else:
            data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(path, f"truncated or corrupt voxel data ({type(err).__name__}: {err})")
    data = data.reshape(shape)
    if kind == "image":
        bad = np.count_nonzero(~np.isfinite(data))
        if bad:
            raise DataError(path, f"{bad} NaN/Inf voxels")
    elif kind == "label":
        data = _as_label_array(path, data)
    else:
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    qform_code = int(header["qform_code"]) if "qform_code" in header else 0
    sform_code = int(header["sform_code"]) if "sform_code" in header else 0
    meta = {
        "orig_dtype": str(header.get_data_dtype()),
        "qform_code": qform_code,
        "sform_code": sform_code,
        "xyzt_units": list(header.get_xyzt_units()),
    }
    # nibabel moves scl_slope/inter from the header into the array proxy on load
    slope = getattr(img.dataobj, "slope", None)
    inter = getattr(img.dataobj, "inter", None)
    if slope is not None and np.isfinite(slope) and (slope != 1 or (inter or 0) != 0):
        meta["scl_slope"] = float(slope)
        meta["scl_inter"] = float(inter if inter is not None and np.isfinite(inter) else 0.0)
    return Volume(array=data, affine=np.asarray(img.affine, dtype=np.float64), source=path, meta=meta)


def _as_label_array(path, data):
    """Label maps must hold non-negative whole numbers that fit uint8."""
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        if not finite.all():
            raise DataError(path, f"label map has {np.count_nonzero(~finite)} NaN/Inf voxels")
        if not np.array_equal(data, np.rint(data)):
            raise DataError(path, "label map holds non-integer values "
                            f"(e.g. {float(data[data != np.rint(data)].flat[0])})")
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != bool:
        raise DataError(path, f"label map has unsupported dtype {data.dtype}")
    lo, hi = (data.min(), data.max()) if data.size else (0, 0)
    if lo < 0:
        raise DataError(path, f"label map holds negative values (min {lo:g})")
    if hi > 255:
        raise DataError(path, f"label value {hi:g} exceeds 255 (labels are stored as uint8)")
    return data.astype(np.uint8)


def write_nifti(path, array, affine, header_meta=None):
    """Writes ``array`` with ``affine`` atomically (temporary name, then rename).

    ``header_meta`` may carry ``qform_code`` / ``sform_code`` from
    :func:`read_nifti` so the output declares the same coordinate system.
    """
    import nibabel as nib

    path = str(path)
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    header_meta = header_meta or {}
    img.set_qform(img.affine, code=int(header_meta.get("qform_code", 1) or 1))
    img.set_sform(img.affine, code=int(header_meta.get("sform_code", 1) or 1))
    img.header.set_xyzt_units("mm", "sec")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = ".nii.gz" if path.lower().endswith(".gz") else ".nii"
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    tmp = tmp[: -len(suffix)] + suffix if not tmp.endswith(suffix) else tmp
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
