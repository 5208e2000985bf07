"""Checkpoint files: the flat variable map rr_tf checkpoints hold, which
checkpoint of a folder reads in full, and restoring a model's weights from
one. The training loop (:mod:`rr_tf.training.loop`) writes and resumes
them; :mod:`rr_tf.runs` reads a finished run's weights with them."""

import glob
import os
import shutil
import sys

import tensorflow as tf

from rr_tf.errors import DataError


def checkpoint_variables_of(prefix, variables):
    """{checkpoint key: tf variable}: ``prefix.<index>.<leaf name>``.

    Keys follow the (deterministic) order of ``weights``, not the variable
    paths: Keras paths carry process-wide auto-numbering (``dense_3``) and
    the online and EMA copies of a network share sub-paths. A layout change
    fails loudly on restore (count or shape mismatch, ``assert_consumed``)."""
    return {f"{prefix}.{i:04d}.{v.path.rsplit('/', 1)[-1]}": getattr(v, "value", v)
            for i, v in enumerate(variables)}


_READABLE = set()  # (path, size and mtime of its files) already read in full in this process


def _unreadable(path):
    """Why checkpoint ``path`` cannot be read in full (every tensor is read:
    a truncated ``.data`` or ``.index`` fails here), or None. A checkpoint
    read once is not read again while its files are unchanged (resume asks
    twice: for the data seed, then to restore)."""
    stamp = (path, tuple(sorted((f, os.path.getsize(f), os.path.getmtime(f))
                                for f in glob.glob(glob.escape(path) + ".*"))))
    if stamp in _READABLE:
        return None
    try:
        reader = tf.train.load_checkpoint(path)
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
    except Exception as err:  # noqa: BLE001  (any read failure means: do not resume from it)
        text = str(err).strip().splitlines()
        return f"{type(err).__name__}: {text[0] if text else ''}"
    _READABLE.add(stamp)
    return None


def usable_checkpoint(checkpoint_dir, log=None, read_only=False):
    """The newest checkpoint of ``checkpoint_dir`` that reads in full, or
    None. ``read_only`` (a multi-worker run's other workers, reading the
    chief's folder after the chief has tidied it): changes nothing and
    raises DataError when the newest one does not read. Otherwise, on the
    way: removes ``*_temp`` leftovers of a write killed
    half-way, and sets aside (renamed ``*.unreadable``, dropped from the
    ``checkpoint`` state file) each newer checkpoint that does not read,
    saying which file and why, so the run resumes from the previous intact
    one (``keep_checkpoints`` >= 2 keeps one). Raises DataError when
    checkpoints exist but none reads."""
    log = log or (lambda m: print(m, file=sys.stderr))
    if not os.path.isdir(checkpoint_dir):
        return None
    if read_only:
        latest = tf.train.latest_checkpoint(checkpoint_dir)
        why = latest and _unreadable(latest)
        if why:
            raise DataError(latest, f"the chief's newest checkpoint does not read ({why})")
        return latest
    for stale in glob.glob(os.path.join(checkpoint_dir, "*_temp*")):
        shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
    state = tf.train.get_checkpoint_state(checkpoint_dir)
    paths = list(state.all_model_checkpoint_paths) if state else []
    if state and state.model_checkpoint_path and state.model_checkpoint_path not in paths:
        paths.append(state.model_checkpoint_path)
    paths = [p if os.path.isabs(p) else os.path.join(checkpoint_dir, p) for p in paths]
    bad = []
    while paths:
        newest = paths[-1]
        why = _unreadable(newest)
        if why is None:
            break
        bad.append(newest)
        paths.pop()
        for f in glob.glob(glob.escape(newest) + ".*"):
            if not f.endswith(".unreadable"):
                os.replace(f, f + ".unreadable")
        log(f"warning: checkpoint {newest} is unreadable ({why}); set aside as *.unreadable, "
            + (f"resuming from {os.path.basename(paths[-1])}" if paths else "no older one"))
    if bad:
        if not paths:
            raise DataError(checkpoint_dir, f"no readable checkpoint: {len(bad)} unreadable "
                            f"(set aside as *.unreadable); start again with --overwrite")
        tf.compat.v1.train.update_checkpoint_state(checkpoint_dir, paths[-1],
                                                   all_model_checkpoint_paths=paths)
    return paths[-1] if paths else None


def restore_weights(method, checkpoint_dir):
    """Restores only the model variables (weights, BN statistics, EMA
    copies, queues) of the newest usable checkpoint, whatever optimizer
    wrote it (export, HPT, inspection). Returns the checkpoint path, or None."""
    latest = usable_checkpoint(checkpoint_dir)
    if latest is None:
        return None
    model = tf.train.Checkpoint(**checkpoint_variables_of("model", method.weights))
    model.read(latest).expect_partial().assert_existing_objects_matched()
    return latest
