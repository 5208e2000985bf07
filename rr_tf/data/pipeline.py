"""tf.data streams from a shard manifest: cases -> views -> batches.

    stream = view_dataset(data_dir, "train", view_fn, StreamConfig(batch_size=4))

Reading: shard files (checked against the manifest first: size, or sha256
with ``verify="sha256"``) are shuffled with the seed, read interleaved
(each shard's records counted against the manifest as it is read: a record
that cannot be read, e.g. bytes flipped on disk after the size check, stops
the stream with an error that :func:`shard_error` turns into a DataError
naming the shard, or with ``skip_corrupt`` ends that shard with a warning),
records shuffled in a bounded buffer, decoded (int16 HU). Views: ``view_fn(image, seed, to_unit)`` (or
``view_fn(image, label, seed, to_unit)`` for labelled streams; ``to_unit``
scales crops to network input with the data set's spec) is called
``crops_per_volume`` times per decoded volume with independent stateless
seeds, so one volume read feeds several crops; crops are shuffled, batched
(fixed batch size) and prefetched. The stream is deterministic under
``StreamConfig.seed`` (ordered parallel map). Under tf.distribute, pass the
``tf.distribute.InputContext`` to shard by file; otherwise tf.data's AUTO
policy shards by file (falling back to data).
"""

import collections
import contextlib
import dataclasses
import os
import re
import sys

import tensorflow as tf

from rr_tf.errors import ConfigError, DataError
from rr_tf.data import records, views

AUTOTUNE = tf.data.AUTOTUNE
_VERIFY = ("none", "size", "sha256")


@dataclasses.dataclass
class StreamConfig:
    """Buffers and parallelism of a view stream (defaults fit in < 2 GB)."""

    batch_size: int = 2
    crops_per_volume: int = 4
    shuffle_cases: int = 8          # serialized volumes held for shuffling
    shuffle_crops: int = 64         # crops held for shuffling
    cycle_length: int = 2           # shards read at once
    parallel_calls: int = AUTOTUNE
    prefetch: int = 2
    verify: str = "size"            # none | size | sha256
    skip_corrupt: bool = False      # drop (with a warning) shards failing verification
    repeat: bool = True
    seed: int = 0
    deterministic: bool = True
    case_ids: tuple | None = None   # only these cases (e.g. the labelled budget of a fine-tuning)

    def validate(self):
        for name in ("batch_size", "crops_per_volume", "cycle_length", "prefetch"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("shuffle_cases", "shuffle_crops"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0")
        if self.verify not in _VERIFY:
            raise ConfigError("verify", f"must be one of {_VERIFY}, got {self.verify!r}")


# the reader's check of a shard's record count (case_dataset) fails with an
# error whose message carries this, the counts, the compression and the path
_CORRUPT_MARK = "RR_TF_CORRUPT_SHARD"
_CORRUPT_RE = re.compile(r"\[" + _CORRUPT_MARK + r"\] \[(\d+)\] \[(\d+)\] \[(\w*)\] \[(.*?)\] "
                         r"\[END\]", re.S)


def shard_error(err):
    """The DataError naming the shard (and the byte offset of its first bad
    record when TensorFlow's reader gives one) for an error raised by a
    stream whose shard could not be read to the end; None for any other
    error."""
    match = _CORRUPT_RE.search(str(err))
    if not match:
        return None
    read, total, compression, path = int(match[1]), int(match[2]), match[3], match[4]
    detail = records.first_bad_record(path, records.COMPRESSIONS.get(compression, ""))
    return DataError(path, f"record {read + 1} of {total} cannot be read"
                     f"{' (' + detail + ')' if detail else ''}: the shard changed after it was "
                     "written (its size still matches the manifest); restore it or prepare the "
                     "data again. --skip_corrupt_shards leaves such a shard out with a warning, "
                     "--verify_shards=sha256 checks every shard before training")


@contextlib.contextmanager
def shard_errors_named():
    """Context (or decorator) turning a stream's unreadable-shard error
    (:func:`shard_error`) into the DataError naming the shard."""
    try:
        yield
    except Exception as err:  # noqa: BLE001  (re-raised unchanged unless it names a shard)
        named = shard_error(err)
        if named is None:
            raise
        raise named from None


def _read_shard(path, expected, compression_name, skip_corrupt):
    """The records of one shard; after the last one the count read is
    compared with the manifest's: short (a record failed to read, which
    ends the shard) raises the error :func:`shard_error` recognises, or
    with ``skip_corrupt`` prints a warning naming the shard."""
    compression = records.COMPRESSIONS[compression_name]
    raw = tf.data.TFRecordDataset(path, compression_type=compression).ignore_errors()
    end = tf.data.Dataset.from_tensors((tf.constant(b"", tf.string), tf.constant(True)))
    items = raw.map(lambda r: (r, tf.constant(False))).concatenate(end)
    counted = items.scan(tf.constant(0, tf.int64),
                         lambda n, item: (n + tf.cast(tf.logical_not(item[1]), tf.int64),
                                          (item[0], item[1], n)))

    def check_end(read):
        if skip_corrupt:
            def warn():
                tf.print("warning: skipping the rest of shard", path, ": record", read + 1, "of",
                         expected, "cannot be read (corrupt or truncated)",
                         output_stream=sys.stderr)
                return tf.constant(False)

            return tf.cond(read >= expected, lambda: tf.constant(False), warn)
        check = tf.debugging.Assert(read >= expected, [_CORRUPT_MARK, read, expected,
                                                       compression_name, path, "END"],
                                    summarize=8)
        with tf.control_dependencies([check]):
            return tf.constant(False)

    keep = lambda r, is_end, read: tf.cond(is_end, lambda: check_end(read),  # noqa: E731
                                            lambda: tf.constant(True))
    return counted.filter(keep).map(lambda r, is_end, read: r)


def shard_files(data_dir, split, config, log=None):
    """(manifest, [shard paths]) after checking each shard against the manifest."""
    log = log or (lambda m: print(m, file=sys.stderr))
    manifest = records.read_manifest(data_dir)
    if split not in (None, "train", "val"):
        raise ConfigError("split", f"must be 'train', 'val' or None, got {split!r}")
    shards = [s for s in manifest["shards"] if split is None or s["split"] == split]
    if not shards:
        raise DataError(data_dir, f"the manifest lists no {split or ''} shards")
    files = []
    for shard in shards:
        one = dict(manifest, shards=[shard])
        try:
            if config.verify != "none":
                records.verify_shards(data_dir, one, checksum=config.verify == "sha256")
        except DataError as err:
            if not config.skip_corrupt:
                raise
            log(f"warning: skipping {err}")
            continue
        files.append(records.shard_paths(data_dir, one)[0])
    if not files:
        raise DataError(data_dir, f"no usable {split or ''} shard left after verification")
    return manifest, files


def unit_scaler(spec):
    """fn(HU tensor) -> float32 network input per ``spec``.

    Stored voxels are already clipped to the window, so scaling commutes
    with cropping and linear resizing: recipes apply it to crops (or the
    stream to whole batches), never to whole volumes. The clip is only
    needed when crop padding (``views.PAD_HU``) lies below the window.
    """
    if spec.scaling == "none":
        return lambda x: tf.cast(x, tf.float32)
    lo, hi, offset, divisor = spec.affine_scaling()
    gain, bias = 1.0 / divisor, -offset / divisor
    if spec.scaling == "unit" and lo <= views.PAD_HU:
        return lambda x: tf.cast(x, tf.float32) * gain + bias
    return lambda x: tf.clip_by_value(tf.cast(x, tf.float32), lo, hi) * gain + bias


def case_dataset(data_dir, split, config, input_context=None, log=None):
    """Decoded cases (dicts: case_id, image int16 HU [D,H,W,1], label uint8
    [D,H,W], has_label, spacing), shuffled and repeated per config."""
    config.validate()
    manifest, files = shard_files(data_dir, split, config, log)
    compression = manifest.get("compression", "none")
    counts = {s["name"]: int(s["num_records"]) for s in manifest["shards"]}
    ds = tf.data.Dataset.from_tensor_slices(
        (files, tf.constant([counts[os.path.basename(f)] for f in files], tf.int64)))
    if input_context is not None and input_context.num_input_pipelines > 1:
        if len(files) < input_context.num_input_pipelines:
            raise DataError(data_dir, f"{len(files)} shard(s) cannot feed "
                            f"{input_context.num_input_pipelines} input pipelines; prepare the data "
                            "with a smaller --cases_per_shard")
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if len(files) > 1:  # a new file order every epoch, epochs kept apart
        ds = ds.shuffle(len(files), seed=config.seed, reshuffle_each_iteration=True)
    if config.repeat:
        ds = ds.repeat()
    ds = ds.interleave(lambda f, n: _read_shard(f, n, compression, config.skip_corrupt),
                       cycle_length=min(config.cycle_length, len(files)),
                       num_parallel_calls=min(config.cycle_length, len(files)),
                       deterministic=config.deterministic)
    if config.shuffle_cases > 1:
        ds = ds.shuffle(config.shuffle_cases, seed=config.seed + 1, reshuffle_each_iteration=True)

    def decode(raw):
        case = records.decode_case(raw)
        case["image"] = case["image"][..., None]
        return case

    ds = ds.map(decode, num_parallel_calls=config.parallel_calls, deterministic=config.deterministic)
    if config.case_ids is not None:
        known = {c["case_id"] for c in manifest["cases"]}
        unknown = sorted(set(config.case_ids) - known)
        if unknown:
            raise DataError(data_dir, f"cases {unknown[:5]} are not in the manifest")
        wanted = tf.constant(sorted(config.case_ids), tf.string)
        ds = ds.filter(lambda c: tf.reduce_any(tf.equal(wanted, c["case_id"])))
    options = tf.data.Options()
    options.deterministic = config.deterministic
    return ds.with_options(options), manifest


def view_dataset(data_dir, split, view_fn, config, labelled=False, input_context=None, log=None,
                 spec=None):
    """Batched views. ``view_fn(image, seed, to_unit)`` (or ``(image, label,
    seed, to_unit)`` when ``labelled``) gets the stored int16 HU volume and
    the scaler to apply to its crops (:func:`unit_scaler`); it returns a
    dict of tensors with static shapes (int16 ones are taken as stored HU and
    scaled after batching) and is applied
    ``crops_per_volume`` times per volume; each element also carries its
    ``case_id``. ``spec``: the manifest's spec read with another
    normalisation (:meth:`~rr_tf.data.spec.PreprocessSpec.with_normalization`;
    None = as stored). Returns (dataset, manifest)."""
    cases, manifest = case_dataset(data_dir, split, config, input_context, log)
    to_unit = unit_scaler(spec or manifest["spec_obj"])
    if labelled:
        cases = cases.filter(lambda c: c["has_label"])
        call = lambda c, s: view_fn(c["image"], c["label"], s, to_unit)  # noqa: E731
    else:
        call = lambda c, s: view_fn(c["image"], s, to_unit)  # noqa: E731
    return _crops(cases, call, lambda c: c["case_id"], config, to_unit), manifest


def pair_view_dataset(data_dir, split, pair_fn, config, input_context=None, log=None):
    """MICLe-style pairs: ``pair_fn(image_a, image_b, seed, to_unit)`` gets two
    *different* scans of one patient when the manifest links several scans
    to that patient, else the same scan twice. Elements carry
    ``case_id_a`` / ``case_id_b``. Returns (dataset, manifest).

    Relies on prepare() keeping a patient's scans adjacent in one shard and
    reads shards one at a time, so grouping holds at most one scan waiting
    for a partner.
    """
    # sequential shard reading: a patient's scans arrive back to back and a
    # shard is never read twice at once (which would pair a scan with itself)
    no_shuffle = dataclasses.replace(config, shuffle_cases=0, cycle_length=1)
    cases, manifest = case_dataset(data_dir, split, no_shuffle, input_context, log)
    in_split = [c for c in manifest["cases"] if split is None or c["split"] == split]
    patients = sorted({c["patient_id"] for c in in_split})
    index = {p: i for i, p in enumerate(patients)}
    count = collections.Counter(c["patient_id"] for c in in_split)
    n = len(patients)
    # key < n: a patient with several scans (windows of 2); key >= n: a lone scan
    keys = [index[c["patient_id"]] + (0 if count[c["patient_id"]] > 1 else n) for c in in_split]
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer([c["case_id"] for c in in_split],
                                            tf.constant(keys, tf.int64)), default_value=-1)

    def pair_up(key, window):
        second = window.skip(tf.where(key < n, tf.constant(1, tf.int64), 0)).take(1)
        return tf.data.Dataset.zip((window.take(1), second))

    pairs = cases.group_by_window(key_func=lambda c: table.lookup(c["case_id"]), reduce_func=pair_up,
                                  window_size_func=lambda k: tf.where(k < n, tf.constant(2, tf.int64), 1))
    to_unit = unit_scaler(manifest["spec_obj"])
    call = lambda p, s: pair_fn(p[0]["image"], p[1]["image"], s, to_unit)  # noqa: E731
    ids = lambda p: (p[0]["case_id"], p[1]["case_id"])  # noqa: E731
    return _crops(pairs, call, ids, config, to_unit), manifest


def _crops(items, call, ids_of, config, to_unit):
    """Calls ``call(item, seed)`` ``crops_per_volume`` times per item with
    independent stateless seeds, then shuffles, batches and prefetches.

    Outputs a recipe returns as int16 are stored HU: they travel through
    shuffle and batch at half the bytes of float32 and are scaled to network
    input once per batch (twice the crops/s of scaling each crop)."""
    seeds = tf.data.Dataset.random(seed=config.seed + 2).batch(2)
    k = config.crops_per_volume

    def per_item(item, seed):
        crop_seeds = tf.random.experimental.stateless_split(seed, k)
        outs = [call(item, crop_seeds[i]) for i in range(k)]
        out = tf.nest.map_structure(lambda *t: tf.stack(t), *outs)
        ids = ids_of(item)
        if isinstance(ids, tuple):
            out["case_id_a"], out["case_id_b"] = (tf.fill([k], i) for i in ids)
        else:
            out["case_id"] = tf.fill([k], ids)
        return out

    ds = tf.data.Dataset.zip((items, seeds))
    ds = ds.map(per_item, num_parallel_calls=config.parallel_calls, deterministic=config.deterministic)
    ds = ds.unbatch()
    if config.shuffle_crops > 1:
        ds = ds.shuffle(config.shuffle_crops, seed=config.seed + 3, reshuffle_each_iteration=True)
    ds = ds.batch(config.batch_size, drop_remainder=True)
    scale_hu = lambda b: tf.nest.map_structure(  # noqa: E731
        lambda t: to_unit(t) if t.dtype == tf.int16 else t, b)
    ds = ds.map(scale_hu, num_parallel_calls=config.parallel_calls, deterministic=config.deterministic)
    return ds.prefetch(config.prefetch)
