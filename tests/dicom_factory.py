"""Write small synthetic CT DICOM series for tests.

``write_ct_series`` turns an HU array ``hu[i, j, k]`` with a RAS+ affine into
one CT Image Storage file per slice ``k``, the inverse of
``rr_tf.data.dicom.read_dicom_series``.  ``expected_read`` gives what the
reader returns for such a series (the reader sorts slices along the slice
normal, so a stack written against the normal comes back reversed).
"""

import os

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

# name -> (transfer syntax UID, compress with Dataset.compress?)
TRANSFER_SYNTAXES = {
    "explicit_le": ("1.2.840.10008.1.2.1", False),
    "implicit_le": ("1.2.840.10008.1.2", False),
    "explicit_be": ("1.2.840.10008.1.2.2", False),
    "deflated_le": ("1.2.840.10008.1.2.1.99", False),
    "rle_lossless": ("1.2.840.10008.1.2.5", True),
    "jpegls_lossless": ("1.2.840.10008.1.2.4.80", True),
    "jpeg2000_lossless": ("1.2.840.10008.1.2.4.90", True),
    # pydicom has no encoder for these: written by _jpeg_lossless_sv1 below
    "jpeg_lossless_sv1": ("1.2.840.10008.1.2.4.70", True),
    "jpeg_lossless": ("1.2.840.10008.1.2.4.57", True),
}
_OWN_ENCODER = ("jpeg_lossless_sv1", "jpeg_lossless")
COMPRESSED = [name for name, (_, comp) in TRANSFER_SYNTAXES.items() if comp]


def encoder_problem(transfer_syntax):
    """Why ``transfer_syntax`` (a name above) cannot be written here, or ''."""
    uid, compressed = TRANSFER_SYNTAXES[transfer_syntax]
    if not compressed or transfer_syntax in _OWN_ENCODER:
        return ""
    try:
        from pydicom.pixels import get_encoder

        enc = get_encoder(uid)
    except Exception as err:  # noqa: BLE001 - report any reason
        return f"no pydicom encoder for {transfer_syntax}: {err}"
    if not enc.is_available:
        return f"no encoder plugin for {transfer_syntax}: {enc.missing_dependencies}"
    return ""


def _geometry(affine_ras):
    """(row cosine, column cosine, PixelSpacing [row, col], slice step, origin) in LPS."""
    a = LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
    col_i, col_j, step, origin = a[:3, 0], a[:3, 1], a[:3, 2], a[:3, 3]
    si, sj = np.linalg.norm(col_i), np.linalg.norm(col_j)
    row_cos, col_cos = col_i / si, col_j / sj
    if abs(float(row_cos @ col_cos)) > 1e-6:
        raise ValueError("affine columns 0 and 1 must be orthogonal for DICOM")
    return row_cos, col_cos, [sj, si], step, origin


def expected_read(hu, affine_ras):
    """(array, affine) that the reader returns for a series written from these."""
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    row_cos, col_cos, _, step, _ = _geometry(affine_ras)
    if float(np.cross(row_cos, col_cos) @ step) >= 0:
        return np.asarray(hu, dtype=np.float32), affine_ras
    n = hu.shape[2]
    flip = np.eye(4)
    flip[2, 2] = -1.0
    flip[2, 3] = n - 1
    return np.asarray(hu[:, :, ::-1], dtype=np.float32), affine_ras @ flip


def _per_slice(value, n, name):
    arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,))
    if not np.all(np.isfinite(arr)) or (name == "slope" and np.any(arr == 0)):
        raise ValueError(f"bad {name}: {value!r}")
    return arr


def _ds(value):
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)


def write_ct_series(
    out_dir,
    hu,
    affine_ras,
    *,
    transfer_syntax="explicit_le",
    slope=1.0,
    intercept=-1024.0,
    dtype=np.uint16,
    bits_stored=None,
    patient_id="P001",
    study_uid=None,
    series_uid=None,
    series_description="synthetic CT",
    slice_thickness=None,
    shuffle_names=True,
    shuffle_instance_numbers=True,
    seed=0,
    name_prefix="",
):
    """Write ``hu`` ([i, j, k], RAS+ ``affine_ras``) as one CT file per slice.

    ``slope``/``intercept`` are scalars or one value per slice; stored values
    are ``round((hu - intercept) / slope)`` in ``dtype`` (uint16/int16/uint8/
    int8) with ``bits_stored`` significant bits (default: all).  Returns the
    paths written, in slice order ``k``.  File names and InstanceNumbers are
    shuffled by default so readers cannot rely on them.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, generate_uid

    hu = np.asarray(hu, dtype=np.float64)
    if hu.ndim != 3:
        raise ValueError(f"hu must be 3D, got shape {hu.shape}")
    ni, nj, nk = hu.shape
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer_syntax {transfer_syntax!r}")
    problem = encoder_problem(transfer_syntax)
    if problem:
        raise RuntimeError(problem)
    ts_uid, compressed = TRANSFER_SYNTAXES[transfer_syntax]
    if transfer_syntax.startswith("jpeg2000") and min(ni, nj) < 32:
        # pylibjpeg-openjpeg always uses 6 DWT resolutions -> needs >= 32 px
        raise ValueError(f"{transfer_syntax} needs rows and columns >= 32, got {ni}x{nj}")
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu" or dtype.itemsize > 2:
        raise ValueError(f"dtype must be an 8/16-bit integer type, got {dtype}")
    bits_allocated = 8 * dtype.itemsize
    bits_stored = bits_allocated if bits_stored is None else int(bits_stored)
    signed = dtype.kind == "i"
    lo = -(1 << (bits_stored - 1)) if signed else 0
    hi = (1 << (bits_stored - 1)) - 1 if signed else (1 << bits_stored) - 1

    slopes = _per_slice(slope, nk, "slope")
    intercepts = _per_slice(intercept, nk, "intercept")
    row_cos, col_cos, pixel_spacing, step, origin = _geometry(affine_ras)
    normal = np.cross(row_cos, col_cos)
    if slice_thickness is None:
        slice_thickness = abs(float(normal @ step))

    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    names = rng.permutation(nk) if shuffle_names else np.arange(nk)
    numbers = rng.permutation(nk) + 1 if shuffle_instance_numbers else np.arange(nk) + 1
    os.makedirs(out_dir, exist_ok=True)

    paths = []
    for k in range(nk):
        stored = np.round((hu[:, :, k] - intercepts[k]) / slopes[k])
        if stored.min() < lo or stored.max() > hi:
            raise ValueError(
                f"slice {k}: stored values [{stored.min()}, {stored.max()}] "
                f"outside the {bits_stored}-bit {'signed' if signed else 'unsigned'} range"
            )
        pixels = np.ascontiguousarray(stored.T.astype(dtype))  # [row=j, col=i]
        sop_uid = generate_uid()

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = TRANSFER_SYNTAXES["explicit_le"][0] if compressed else ts_uid
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = "20240101"
        ds.Modality = "CT"
        ds.Manufacturer = "rr_tf tests"
        ds.SeriesDescription = series_description
        ds.PatientName = "Test^Synthetic"
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = int(numbers[k])
        ds.FrameOfReferenceUID = frame_uid
        ds.ImagePositionPatient = [_ds(v) for v in origin + k * step]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
        ds.SliceThickness = _ds(slice_thickness)
        ds.SliceLocation = _ds(float(normal @ (origin + k * step)))
        ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = nj, ni
        ds.BitsAllocated = bits_allocated
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = int(signed)
        ds.RescaleIntercept = _ds(intercepts[k])
        ds.RescaleSlope = _ds(slopes[k])
        ds.RescaleType = "HU"
        ds.PixelData = pixels.tobytes()
        if transfer_syntax in _OWN_ENCODER:
            from pydicom.encaps import encapsulate

            frame = _jpeg_lossless_sv1(pixels, bits_stored)
            ds.file_meta.TransferSyntaxUID = ts_uid
            ds.PixelData = encapsulate([frame])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        elif compressed:
            ds.compress(ts_uid, pixels, generate_instance_uid=False)
        else:
            ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
            if transfer_syntax == "explicit_be":
                ds.PixelData = pixels.astype(dtype.newbyteorder(">")).tobytes()

        path = os.path.join(str(out_dir), f"{name_prefix}IM{int(names[k]):05d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _jpeg_lossless_sv1(pixels, precision):
    """Encode a 2D integer image as a JPEG lossless (process 14) codestream.

    First-order prediction (selection value 1: the left neighbour; the first
    row uses the left, the first column the pixel above, the first pixel
    2**(P-1)), one Huffman table with the 17 difference categories all coded
    on 5 bits (code = category).  Valid for both 4.70 and 4.57.  Signed data is
    encoded as its two's complement ``precision``-bit pattern, as DICOM does.
    """
    rows, cols = pixels.shape
    mod = 1 << 16
    x = pixels.astype(np.int64) & ((1 << precision) - 1)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diff = (x - pred) % mod
    diff = np.where(diff >= mod // 2, diff - mod, diff)  # [-32768, 32767]

    bits = []  # (value, length) pairs, then packed with byte stuffing
    for d in diff.ravel().tolist():
        if d == -32768:
            bits.append((16, 5))  # category 16: no extra bits
            continue
        ssss = abs(d).bit_length()
        bits.append((ssss, 5))
        if ssss:
            extra = d if d > 0 else d - 1
            bits.append((extra & ((1 << ssss) - 1), ssss))
    out, acc, nacc = bytearray(), 0, 0
    for value, length in bits:
        acc = (acc << length) | value
        nacc += length
        while nacc >= 8:
            nacc -= 8
            byte = (acc >> nacc) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0x00)
        acc &= (1 << nacc) - 1
    if nacc:  # pad with 1 bits
        byte = ((acc << (8 - nacc)) | ((1 << (8 - nacc)) - 1)) & 0xFF
        out.append(byte)
        if byte == 0xFF:
            out.append(0x00)

    def segment(marker, payload):
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof = bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5
    dht = bytes([0x00]) + bytes(counts) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # 1 comp, table 0, Ss=1 (predictor), Se=0, Ah/Al=0
    stream = (
        b"\xff\xd8"
        + segment(0xC3, sof)
        + segment(0xC4, dht)
        + segment(0xDA, sos)
        + bytes(out)
        + b"\xff\xd9"
    )
    return stream


def simple_hu(shape=(24, 20, 12), seed=0, lo=-1024, hi=2000):
    """A deterministic integer HU volume with structure and noise."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    base = 10 * i - 7 * j + 31 * k
    noise = rng.integers(-50, 50, size=shape)
    return np.clip(base + noise - 300, lo, hi).astype(np.float64)
