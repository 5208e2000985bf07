"""Scans -> preprocessed TFRecord shards + manifest (the engine of
``launch/prepare_data.py``).

Guarantees:
- bad cases are reported one line each (file and reason) and the others
  still processed; unless ``skip_bad`` the run then fails and publishes
  nothing (a data set silently missing cases is worse than no data set);
- cheap header checks and the spec check against existing output run
  before any heavy work;
- output is published atomically: shards carry a generation tag derived
  from the inputs, are renamed into place, and the manifest (written last,
  atomically) switches to them; older generations are deleted afterwards.
  A crash at any point leaves the previous data set intact;
- re-running with unchanged inputs and settings does nothing.
"""

import collections
import concurrent.futures as cf
import dataclasses
import datetime
import hashlib
import json
import multiprocessing
import os
import sys

import numpy as np

import rr_tf
from rr_tf.errors import ConfigError, DataError, SpecMismatchError
from rr_tf.data import labelnames, nifti, records, sources
from rr_tf.data.preprocess import preprocess_case
from rr_tf.data.spec import PreprocessSpec
from rr_tf.utils.progress import Progress


@dataclasses.dataclass
class PrepareConfig:
    """Options of a data preparation run (see launch/prepare_data.py)."""

    source: str
    output_dir: str
    spec: PreprocessSpec = dataclasses.field(default_factory=PreprocessSpec)
    labels_dir: str | None = None
    num_cases: int = 8
    phantom_shape: tuple = (128, 128, 128)
    val_fraction: float = 0.2
    seed: int = 0
    skip_bad: bool = False
    workers: int = 0                # 0 = one per CPU core
    cases_per_shard: int = 16
    compression: str = "none"
    overwrite: bool = False
    dicom_all_series: bool = False
    patient_table: str | None = None
    progress: bool = True
    # {label value: name}; replaces the names the source declares (a
    # Decathlon dataset.json, BDMAP organ files, the phantom's)
    label_names: dict | None = None
    # the largest NIfTI image (voxels) a header may declare; larger ones,
    # and headers declaring more data than their file holds, are bad cases
    # found before any voxel is read
    max_voxels: int = nifti.MAX_VOXELS

    def validate(self):
        if not self.output_dir:
            raise ConfigError("output_dir", "is required")
        if self.source != sources.PHANTOM and not os.path.isdir(self.source):
            raise ConfigError("source", f"{self.source!r} is neither 'phantom' nor an existing folder")
        if self.source == sources.PHANTOM and self.num_cases < 1:
            raise ConfigError("num_cases", f"must be >= 1, got {self.num_cases}")
        if self.source == sources.PHANTOM and self.labels_dir:
            raise ConfigError("labels", "phantoms carry their own labels; do not pass --labels")
        if self.labels_dir and not os.path.isdir(self.labels_dir):
            raise ConfigError("labels", f"{self.labels_dir!r} is not a folder")
        if self.labels_dir and self.source != sources.PHANTOM:
            layout = sources.detect_layout(self.source)
            if layout != "plain":
                raise ConfigError("labels", f"{self.source} is a data set in the {layout} layout, "
                                  "which brings its own labels; do not pass --labels")
        if self.label_names is not None:
            self.label_names = labelnames.check_names(self.label_names) or None
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.workers < 0:
            raise ConfigError("workers", "must be >= 0 (0 = one per CPU core)")
        if self.cases_per_shard < 1:
            raise ConfigError("cases_per_shard", "must be >= 1")
        if self.max_voxels < 1:
            raise ConfigError("max_voxels", f"must be >= 1, got {self.max_voxels}")
        if self.compression not in records.COMPRESSIONS:
            raise ConfigError("compression", f"must be one of {tuple(records.COMPRESSIONS)}")
        if len(self.phantom_shape) != 3 or min(self.phantom_shape) < 16:
            raise ConfigError("phantom_shape", f"need three sizes >= 16, got {self.phantom_shape}")


@dataclasses.dataclass
class PrepareResult:
    manifest: dict | None
    bad: list            # [(source, reason)]
    up_to_date: bool = False
    published: bool = False

    @property
    def ok(self):
        return self.published or self.up_to_date


def assign_splits(patient_ids, val_fraction, seed):
    """patient id -> "train"/"val": patients ranked by a seeded hash, the
    first round(val_fraction * n) go to val (at least one when the fraction
    is positive and there are two or more patients). Stable: adding patients
    does not move the others across more than the boundary."""
    unique = sorted(set(patient_ids))
    n_val = int(round(val_fraction * len(unique)))
    if val_fraction > 0 and len(unique) >= 2:
        n_val = min(max(n_val, 1), len(unique) - 1)
    key = lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()  # noqa: E731
    ranked = sorted(unique, key=key)
    val = set(ranked[:n_val])
    return {p: ("val" if p in val else "train") for p in unique}


def _fingerprint(config, tasks):
    h = hashlib.sha256()
    h.update(json.dumps([records.FORMAT_VERSION, config.spec.hash, config.val_fraction, config.seed,
                         config.cases_per_shard, config.compression]).encode())
    for t in tasks:
        h.update(t.fingerprint().encode())
    return h.hexdigest()


def _process(task, spec, max_voxels=nifti.MAX_VOXELS):
    """Worker: load + preprocess one case. Never raises for bad input."""
    try:
        image, label = sources.load_case(task, max_voxels)
        case = preprocess_case(task.case_id, image, label, spec, patient_id=task.patient_id)
        return "ok", case
    except DataError as err:
        return "bad", (err.path, err.reason)
    except MemoryError:
        return "bad", (task.source, "out of memory while preprocessing")
    except Exception as err:  # an unforeseen defect in a file must not stop the others
        return "bad", (task.source, f"unexpected {type(err).__name__}: {err}")


# foreground voxels sampled per case for the intensity statistics (nnU-Net
# samples 10,000 per case too)
FOREGROUND_SAMPLES = 10_000


def foreground_sample(image, label, seed, size=FOREGROUND_SAMPLES):
    """Up to ``size`` stored HU of ``label > 0`` voxels, drawn without
    replacement with ``seed`` (all of them when fewer)."""
    values = np.asarray(image)[np.asarray(label) > 0]
    if values.size > size:
        values = np.random.default_rng(seed).choice(values, size, replace=False)
    return values.astype(np.float64)


def intensity_properties(samples):
    """The data set's foreground intensity statistics (nnU-Net's CT
    normalisation reads them): 0.5 / 99.5 percentiles, mean and std of the
    sampled labelled voxels of the training cases; None without any."""
    samples = [s for s in samples if s.size]
    if not samples:
        return None
    v = np.concatenate(samples)
    lo, hi = np.percentile(v, [0.5, 99.5])
    return {"percentile_00_5": float(lo), "percentile_99_5": float(hi), "mean": float(v.mean()),
            "std": float(v.std()), "num_voxels": int(v.size), "num_cases": len(samples)}


def _worker_init(parent=None):
    # One BLAS/OpenMP thread per worker: the parallelism is across cases.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    if parent is not None:
        _die_with_parent(parent)


def _die_with_parent(parent, every=1.0):
    """A worker ends within ``every`` seconds of the process that started it
    (killed with SIGKILL, it cannot shut its pool down, and idle workers
    would wait for work forever): a watchdog thread sees the parent's pid
    change. (Not the kernel's parent-death signal: it follows the thread
    that started the worker, not the process.)"""
    import threading
    import time

    if os.getppid() != parent:  # already gone
        os._exit(1)

    def watch():
        while True:
            time.sleep(every)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _ordered_results(tasks, spec, workers, max_voxels=nifti.MAX_VOXELS):
    """Yields (task, status, payload) in task order, at most 2*workers in flight."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield (t,) + _process(t, spec, max_voxels)
        return
    ctx = multiprocessing.get_context("spawn")  # never fork a process that imported TF
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                initargs=(os.getpid(),)) as pool:
        pending = collections.deque()
        it = iter(tasks)
        for t in it:
            pending.append((t, pool.submit(_process, t, spec, max_voxels)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            t, fut = pending.popleft()
            yield (t,) + fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_process, nxt, spec, max_voxels)))


class _SplitShards:
    """Shard writers of one split: a new shard after ``cases_per_shard``
    cases, but never between two scans of one patient (cases arrive sorted
    by patient, so a patient's scans stay adjacent in one shard: the
    patient-pair stream relies on it)."""

    def __init__(self, output_dir, split, generation, cases_per_shard, compression):
        self.args = (output_dir, split, generation, cases_per_shard, compression)
        self.done, self.current, self.last_patient = [], None, None

    def add(self, case):
        output_dir, split, generation, per_shard, compression = self.args
        patient = case.meta["patient_id"]
        if (self.current is not None and self.current.num_records >= per_shard
                and patient != self.last_patient):
            self.finish()
        if self.current is None:
            name = f"{split}-{generation}-{len(self.done):05d}.tfrecord"
            self.current = records.ShardWriter(output_dir, name, compression)
        self.current.write(records.encode_case(case.image, case.label, case.meta["spacing"],
                                               case.case_id))
        self.last_patient = patient
        return self.current.name, self.current.num_records - 1

    def finish(self):
        if self.current is not None:
            info = self.current.close()
            info["split"] = self.args[1]
            self.done.append((self.current, info))
            self.current = None

    def discard(self):
        for writer, _ in self.done:
            writer.discard()
        if self.current is not None:
            self.current.discard()


def _existing_manifest(config, log):
    gf = records.gfile()
    if not gf.exists(records.manifest_path(config.output_dir)):
        return None
    try:
        old = records.read_manifest(config.output_dir)
    except (DataError, ConfigError) as err:
        if not config.overwrite:
            raise DataError(records.manifest_path(config.output_dir),
                            f"existing manifest is unreadable ({err}); pass --overwrite to replace it")
        log(f"warning: replacing unreadable manifest ({err})")
        return None
    if old["spec_hash"] != config.spec.hash and not config.overwrite:
        raise SpecMismatchError(
            config.output_dir,
            f"already holds shards made with spec {old['spec_hash']} ({old['spec_obj'].describe()}); "
            f"this run's spec is {config.spec.hash} ({config.spec.describe()}); use another "
            "--output_dir or pass --overwrite")
    return old


def _is_current(old, fingerprint, output_dir):
    if old is None or old.get("fingerprint") != fingerprint:
        return False
    try:
        records.verify_shards(output_dir, old, checksum=False)
    except DataError:
        return False
    return True


def prepare(config, log=None):
    """Runs a preparation; returns :class:`PrepareResult`.

    Raises ConfigError / DataError for problems that stop the whole run
    (bad options, missing source, spec mismatch with existing output).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    config.validate()
    if config.source == sources.PHANTOM:
        from rr_tf.data.phantom import LABEL_NAMES

        tasks, problems, notes = sources.phantom_tasks(config.num_cases, config.seed,
                                                       config.phantom_shape), [], []
        layout, names = sources.PHANTOM, dict(LABEL_NAMES)
    else:
        found = sources.find_cases(config.source, config.labels_dir, config.patient_table,
                                   config.dicom_all_series)
        tasks, problems, notes = found.tasks, found.problems, found.notes
        layout, names = found.layout, found.label_names
    names = labelnames.to_json(config.label_names or names)
    if layout not in ("plain", sources.PHANTOM):
        log(f"{config.source}: {layout} layout, {len(tasks)} case(s)"
            + (f", labels {_describe_names(names)}" if names else ""))
    for note in notes:
        log(f"note: {note}")
    if not tasks and not problems:
        raise DataError(config.source, "no NIfTI files or DICOM series folders found")

    gf = records.gfile()  # imports TensorFlow: after the checks of the source
    gf.makedirs(config.output_dir)
    with _WriterLock(config.output_dir):
        return _prepare_into(config, log, gf, tasks, problems, layout, names)


def _prepare_into(config, log, gf, tasks, problems, layout, names):
    """The writing part of :func:`prepare`, run under the output's lock."""
    _remove_stale_temporaries(config.output_dir)
    old = _existing_manifest(config, log)
    fingerprint = _fingerprint(config, tasks)
    if not problems and _is_current(old, fingerprint, config.output_dir):
        if old.get("label_names") != names:  # names only: the shards stay as they are
            old["label_names"] = names
            records.write_manifest(config.output_dir, old)
            log(f"{config.output_dir}: label names updated to {_describe_names(names)}")
        log(f"{config.output_dir}: up to date ({len(old['cases'])} cases, spec {old['spec_hash']}); "
            "nothing to do")
        return PrepareResult(manifest=old, bad=[], up_to_date=True)

    bad = [(p.path, p.reason) for p in problems]
    good_tasks = []
    for task in tasks:  # header-only checks before heavy work
        try:
            sources.preflight(task, config.max_voxels)
            good_tasks.append(task)
        except DataError as err:
            bad.append((err.path, err.reason))
    for path, reason in bad:
        log(f"bad input: {path}: {reason}")

    splits = assign_splits([t.patient_id or t.case_id for t in tasks], config.val_fraction, config.seed)
    good_tasks.sort(key=lambda t: (t.patient_id or t.case_id, t.case_id))
    generation = fingerprint[:8]
    writers = {s: _SplitShards(config.output_dir, s, generation, config.cases_per_shard,
                               config.compression) for s in ("train", "val")}
    workers = config.workers or os.cpu_count() or 1
    log(f"preparing {len(good_tasks)} case(s) with {min(workers, max(len(good_tasks), 1))} "
        f"worker(s); {config.spec.describe()}")
    cases_meta, fg_samples = [], []
    progress = Progress(len(good_tasks), "cases", enabled=config.progress)
    try:
        for task, status, payload in _ordered_results(good_tasks, config.spec, workers,
                                                      config.max_voxels):
            progress.update()
            if status == "bad":
                bad.append(payload)
                log(f"bad input: {payload[0]}: {payload[1]}")
                continue
            split = splits[task.patient_id or task.case_id]
            shard, index = writers[split].add(payload)
            if split == "train" and payload.label is not None:
                fg_samples.append(foreground_sample(payload.image, payload.label,
                                                    len(cases_meta)))
            meta = dict(payload.meta, split=split, shard=shard, index_in_shard=index,
                        source_kind=task.kind)
            if task.seed is not None:
                meta["phantom_seed"] = task.seed
            cases_meta.append(meta)
        progress.close()
        for w in writers.values():
            w.finish()
        if bad and not config.skip_bad:
            raise _Abort()
        if not cases_meta:
            raise DataError(config.source, "no case could be prepared")
        unnamed = sorted({v for c in cases_meta for v in c.get("label_values", ())}
                         - {0} - {int(k) for k in names or {}})
        if names and unnamed:
            log(f"warning: label value(s) {unnamed} occur in the label maps but have no name "
                f"(label names: {_describe_names(names)})")
        shard_infos = []
        for w in writers.values():
            for writer, info in w.done:
                writer.publish()
                shard_infos.append(info)
    except _Abort:
        for w in writers.values():
            w.discard()
        _summary(log, len(cases_meta), bad, published=False)
        return PrepareResult(manifest=None, bad=bad)
    except BaseException:
        for w in writers.values():
            w.discard()
        raise

    manifest = {
        "format": records.FORMAT_NAME,
        "format_version": records.FORMAT_VERSION,
        "rr_tf_version": rr_tf.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
        "spec": config.spec.to_dict(),
        "spec_hash": config.spec.hash,
        "source": {"source": config.source, "labels_dir": config.labels_dir,
                   "num_cases": config.num_cases if config.source == sources.PHANTOM else None,
                   "phantom_shape": list(config.phantom_shape) if config.source == sources.PHANTOM else None,
                   "patient_table": config.patient_table, "layout": layout},
        "label_names": names,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "compression": config.compression,
        "splits": {s: sum(1 for c in cases_meta if c["split"] == s) for s in ("train", "val")},
        "shards": shard_infos,
        "cases": cases_meta,
        "intensity_properties": intensity_properties(fg_samples),
        "bad_cases": [{"source": p, "reason": r} for p, r in bad],
    }
    records.atomic_write_text(os.path.join(config.output_dir, "preprocess.json"),
                              config.spec.to_json() + "\n")
    records.write_manifest(config.output_dir, manifest)
    if old is not None:  # drop the previous generation's shards
        keep = {s["name"] for s in shard_infos}
        for s in old["shards"]:
            path = os.path.join(config.output_dir, s["name"])
            if s["name"] not in keep and gf.exists(path):
                gf.remove(path)
    _summary(log, len(cases_meta), bad, published=True)
    return PrepareResult(manifest=manifest, bad=bad, published=True)


def _describe_names(names):
    """{"1": "liver", ...} -> '1=liver, 2=spleen' (shortened); 'none' for None."""
    if not names:
        return "none"
    items = [f"{k}={v}" for k, v in names.items()]
    return ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")


def _remove_stale_temporaries(output_dir):
    """Deletes ``.*.tmp-PID`` files left by a killed run (local folders only)."""
    if "://" in str(output_dir):
        return
    for name in os.listdir(output_dir):
        if not name.startswith(".") or ".tmp-" not in name:
            continue
        pid = name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            os.remove(os.path.join(output_dir, name))


LOCK_NAME = ".prepare.lock"


class _WriterLock:
    """One writer per output folder: ``.prepare.lock`` holds the writer's pid
    (created with O_EXCL). A second ``prepare`` into the folder while the
    holder lives is refused with one line; a lock left by a killed writer
    (its pid gone) is taken over. Object-store folders (``gs://``) are not
    locked."""

    def __init__(self, output_dir):
        self.path = None if "://" in str(output_dir) else os.path.join(str(output_dir), LOCK_NAME)

    def __enter__(self):
        if self.path is None:
            return self
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None and self._age() < 10.0:
                    holder = -1  # just created, its pid not yet written: held
                if holder is not None and holder != os.getpid() and (holder < 0 or
                                                                   _pid_alive(holder)):
                    raise DataError(os.path.dirname(self.path),
                                    f"another prepare_data (pid {holder if holder > 0 else '?'}) "
                                    "is writing this folder; "
                                    f"wait for it to finish, or remove {self.path} if that "
                                    "process is not a prepare_data run") from None
                try:  # the holder is gone: a stale lock
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return self
        raise DataError(os.path.dirname(self.path), f"could not take the lock {self.path}")

    def _holder(self):
        """The pid in the lock; None when empty or unreadable."""
        try:
            with open(self.path) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        return pid if pid > 0 else None

    def _age(self):
        import time

        try:
            return time.time() - os.path.getmtime(self.path)
        except OSError:
            return 0.0

    def __exit__(self, *exc):
        if self.path is not None and self._holder() == os.getpid():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        return False


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Abort(Exception):
    """Internal: bad cases without skip_bad; nothing is published."""


def _summary(log, n_ok, bad, published):
    if published:
        log(f"done: {n_ok} case(s) written" + (f", {len(bad)} bad case(s) skipped" if bad else ""))
    else:
        log(f"FAILED: {len(bad)} bad case(s), {n_ok} good; nothing was written. "
            "Fix or remove the files above, or pass --skip_bad to write the good cases.")
    for path, reason in bad:
        log(f"  - {path}: {reason}")
