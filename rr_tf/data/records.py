"""TFRecord shards of preprocessed volumes and their ``manifest.json``.

One record = one case: the int16 volume (raw little-endian bytes), its shape,
spacing, and the uint8 label map when present. All other per-case metadata
(original geometry, source paths, patient id, split) lives in the manifest,
which also carries the preprocessing spec and the sha256 of every shard.

Paths may be local or any filesystem ``tf.io.gfile`` understands (``gs://``).
Every file is written under a temporary name and renamed into place.
"""

import hashlib
import json
import os

import numpy as np

from rr_tf.errors import ConfigError, DataError
from rr_tf.data.labelnames import normalise
from rr_tf.data.spec import PreprocessSpec

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "rr_tf.shards"
FORMAT_VERSION = 1
COMPRESSIONS = {"none": "", "gzip": "GZIP"}


def _tf():
    import tensorflow as tf

    return tf


def gfile():
    return _tf().io.gfile


# ------------------------------------------------------------------ records
def encode_case(image, label, spacing, case_id):
    """Serialises one preprocessed case as a ``tf.train.Example``."""
    tf = _tf()
    image = np.ascontiguousarray(image, dtype="<i2")
    feats = {
        "case_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[case_id.encode()])),
        "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(image.shape))),
        "spacing": tf.train.Feature(float_list=tf.train.FloatList(value=list(spacing))),
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "label": tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[np.ascontiguousarray(label, np.uint8).tobytes() if label is not None else b""])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def feature_spec():
    tf = _tf()
    return {
        "case_id": tf.io.FixedLenFeature([], tf.string),
        "shape": tf.io.FixedLenFeature([3], tf.int64),
        "spacing": tf.io.FixedLenFeature([3], tf.float32),
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.string, default_value=b""),
    }


def decode_case(serialized):
    """Graph op: serialized Example -> dict(case_id, image int16 [D,H,W],
    label uint8 [D,H,W] (zeros when absent), has_label bool, spacing, shape)."""
    tf = _tf()
    ex = tf.io.parse_single_example(serialized, feature_spec())
    shape = tf.cast(ex["shape"], tf.int32)
    image = tf.reshape(tf.io.decode_raw(ex["image"], tf.int16, little_endian=True), shape)
    has_label = tf.strings.length(ex["label"]) > 0
    label = tf.cond(has_label,
                    lambda: tf.reshape(tf.io.decode_raw(ex["label"], tf.uint8), shape),
                    lambda: tf.zeros(shape, tf.uint8))
    return {"case_id": ex["case_id"], "image": image, "label": label, "has_label": has_label,
            "spacing": ex["spacing"], "shape": shape}


# ------------------------------------------------------------------ writing
def atomic_write_text(path, text):
    gf = gfile()
    folder, name = os.path.split(str(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    with gf.GFile(tmp, "w") as f:
        f.write(text)
    gf.rename(tmp, path, overwrite=True)


class ShardWriter:
    """Writes one shard under a temporary name; ``close()`` returns its facts
    (name, records, bytes, sha256) and ``publish()`` renames it into place."""

    def __init__(self, output_dir, name, compression="none"):
        tf = _tf()
        self.output_dir = output_dir
        self.name = name
        self.final_path = os.path.join(output_dir, name)
        self.tmp_path = os.path.join(output_dir, f".{name}.tmp-{os.getpid()}")
        self._writer = tf.io.TFRecordWriter(
            self.tmp_path, options=tf.io.TFRecordOptions(compression_type=COMPRESSIONS[compression]))
        self.num_records = 0

    def write(self, serialized):
        self._writer.write(serialized)
        self.num_records += 1

    def close(self):
        self._writer.close()
        size, digest = file_sha256(self.tmp_path)
        return {"name": self.name, "num_records": self.num_records, "bytes": size, "sha256": digest}

    def publish(self):
        gfile().rename(self.tmp_path, self.final_path, overwrite=True)

    def discard(self):
        try:
            self._writer.close()
        except Exception:  # already closed
            pass
        if gfile().exists(self.tmp_path):
            gfile().remove(self.tmp_path)


def file_sha256(path, chunk=1 << 22):
    h = hashlib.sha256()
    size = 0
    with gfile().GFile(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            size += len(block)
            h.update(block)
    return size, h.hexdigest()


# ----------------------------------------------------------------- manifest
def manifest_path(data_dir):
    return os.path.join(str(data_dir), MANIFEST_NAME)


def read_manifest(data_dir):
    """Reads and checks ``<data_dir>/manifest.json``; returns the dict with
    ``spec`` parsed into a :class:`PreprocessSpec` under ``"spec_obj"``."""
    path = manifest_path(data_dir)
    if not gfile().exists(path):
        raise DataError(path, "no manifest here; run launch/prepare_data.py first")
    try:
        with gfile().GFile(path, "r") as f:
            manifest = json.load(f)
    except (ValueError, OSError) as err:
        raise DataError(path, f"unreadable manifest ({err})")
    if manifest.get("format") != FORMAT_NAME:
        raise DataError(path, "not an rr_tf shard manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(path, f"manifest format version {manifest.get('format_version')} is not "
                        f"supported (expected {FORMAT_VERSION})")
    spec = PreprocessSpec.from_dict(manifest["spec"])
    if spec.hash != manifest.get("spec_hash"):
        raise DataError(path, f"spec hash {manifest.get('spec_hash')} does not match its spec "
                        f"({spec.hash}); the manifest was edited by hand?")
    normalise(manifest.get("label_names"), path)  # raises DataError when malformed
    manifest.setdefault("label_names", None)      # manifests older than the key
    manifest["spec_obj"] = spec
    return manifest


def label_names(manifest):
    """``{int value: name}`` recorded in a manifest (``"label_names"``,
    string keys in the JSON); {} when the data set records none (plain
    folders without ``--label_names``, manifests older than the key)."""
    return normalise(manifest.get("label_names"), MANIFEST_NAME)


def check_crop_fits(manifest, crop_size, name="crop_size", factor=2.0):
    """Refuses (ConfigError naming ``name``) a crop more than ``factor``
    times the largest stored volume along an axis: such crops are mostly
    padding, and the step's memory grows with the crop (a 512^3 crop on 3 mm
    phantoms was OOM-killed at 21.6 GB). Smaller overhangs stay allowed
    (crops read beyond a volume as air)."""
    shapes = [c["shape"] for c in manifest.get("cases", []) if c.get("shape")]
    if not shapes:
        return
    largest = [max(int(s[i]) for s in shapes) for i in range(3)]
    if any(int(c) > factor * m for c, m in zip(crop_size, largest)):
        raise ConfigError(name, f"{'x'.join(str(int(c)) for c in crop_size)} is more than "
                          f"{factor:g}x the largest stored volume "
                          f"({'x'.join(map(str, largest))} voxels) along an axis: mostly padding, "
                          f"with memory growing with it; use a smaller --{name}")


def write_manifest(data_dir, manifest):
    body = {k: v for k, v in manifest.items() if k != "spec_obj"}
    atomic_write_text(manifest_path(data_dir), json.dumps(body, indent=1, sort_keys=False) + "\n")


def shard_paths(data_dir, manifest, split=None):
    """Full paths of the shards of ``split`` (all splits when None)."""
    return [os.path.join(str(data_dir), s["name"]) for s in manifest["shards"]
            if split is None or s["split"] == split]


def verify_shards(data_dir, manifest, checksum=True):
    """Raises DataError naming the first shard that is missing, has the wrong
    size or (with ``checksum``) the wrong sha256."""
    for shard in manifest["shards"]:
        path = os.path.join(str(data_dir), shard["name"])
        if not gfile().exists(path):
            raise DataError(path, "shard listed in the manifest is missing")
        size = gfile().stat(path).length
        if size != shard["bytes"]:
            raise DataError(path, f"shard has {size} bytes, manifest says {shard['bytes']} (truncated?)")
        if checksum:
            _, digest = file_sha256(path)
            if digest != shard["sha256"]:
                raise DataError(path, "sha256 does not match the manifest (corrupt shard)")


def first_bad_record(path, compression=""):
    """Where reading ``path`` record by record first fails, e.g. ``'record 3:
    corrupted record at byte 2044'``; None when every record reads (a
    diagnosis for an error message: it reads the shard up to that point)."""
    import re

    tf = _tf()
    count = 0
    try:
        for _ in tf.data.TFRecordDataset(path, compression_type=compression):
            count += 1
    except tf.errors.OpError as err:
        text = (err.message or str(err)).strip()
        found = re.search(r"(corrupted|truncated) record at (\d+)", text)
        what = (f"{found[1]} record at byte {found[2]}" if found
                else f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}")
        return f"record {count + 1}: {what}"
    return None


def iterate_cases(data_dir, split=None, manifest=None):
    """Yields decoded cases as numpy dicts (for tests, inspection and
    inference; training uses the tf.data views instead)."""
    tf = _tf()
    manifest = manifest or read_manifest(data_dir)
    compression = COMPRESSIONS[manifest.get("compression", "none")]
    by_id = {c["case_id"]: c for c in manifest["cases"]}
    for path in shard_paths(data_dir, manifest, split):
        for raw in tf.data.TFRecordDataset(path, compression_type=compression):
            case = {k: v.numpy() for k, v in decode_case(raw).items()}
            case["case_id"] = case["case_id"].decode()
            case["meta"] = by_id[case["case_id"]]
            if not case["has_label"]:
                case["label"] = None
            yield case
