"""Frozen-feature linear probe during pre-training: does the network being
pre-trained already separate the organs?

Every ``every`` steps a voxel-wise linear classifier of the organ labels is
fitted, in closed form, on the *frozen* features of the network that
fine-tuning transfers, and scored on held-out patches:

1. patches (drawn once, fixed seed): ``patches`` labelled patches of the
   training cases to fit on and as many of *other* cases (the val split; or,
   without labelled val cases, half of the labelled training cases) to
   score on, centred on organ voxels (class-balanced, as fine-tuning's
   sampler);
2. features: the method's transferable encoder as exported
   (:meth:`~rr_tf.methods.base.PretrainMethod.export_parts`; the part that
   carries the most transfer parts, e.g. RepRec's CNN + transformer), in
   inference mode, every map it returns average-pooled (finer maps) or
   repeated (coarser maps) to the patch's stride-``stride`` grid and
   concatenated, then standardised with the fitting patches' statistics;
3. labels: the label at the centre voxel of each grid cell;
4. fit: ridge regression of one-hot labels on the features (plus a bias),
   rows sampled class-balanced (at most ``max_rows``), closed form;
5. score: arg-max class on the held-out grid; ``accuracy`` over all cells,
   ``mean_dice`` over the organ classes present in the held-out labels.

Its cost is fixed by the patch count, not the data set size (docs/probe.md
gives the seconds per probe at the demo size). :class:`ProbeCallback` logs
``probe/mean_dice``, ``probe/accuracy``, ``probe/dice_<organ>`` and
``probe/seconds`` to TensorBoard and appends every result to ``probe.json``
in the run directory; the last one goes into ``metrics.json``.
"""

import dataclasses
import json
import math
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from rr_tf.errors import ConfigError
from rr_tf.utils.files import atomic_write_json

DEFAULT_EVERY = 500


@dataclasses.dataclass
class ProbeConfig:
    every: int = DEFAULT_EVERY   # steps between probes (0 = off)
    patches: int = 8             # labelled patches to fit on, and as many to score on
    stride: int = 4              # the grid (patch stride) features and labels meet on
    max_rows: int = 20000        # grid cells the ridge fit uses at most (class-balanced)
    ridge: float = 1e-3          # L2 penalty, relative to the mean diagonal of X^T X
    seed: int = 0
    batch: int = 2               # patches per feature forward pass

    def validate(self):
        if self.every < 0:
            raise ConfigError("probe_every", f"must be >= 0 (0 = off), got {self.every}")
        if self.patches < 1:
            raise ConfigError("probe_patches", f"must be >= 1, got {self.patches}")
        for name in ("stride", "max_rows", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"probe_{name}", f"must be >= 1, got {getattr(self, name)}")


# ----------------------------------------------------------------- fitting
def fit_ridge(x, y, num_classes, ridge=1e-3, max_rows=20000, seed=0):
    """Weights [C + 1, K] of a ridge regression of one-hot ``y`` [N] on
    standardised features ``x`` [N, C] (bias row last). Rows are sampled
    class-balanced: at most ``max_rows // K_present`` per present class."""
    rng = np.random.default_rng(seed)
    present = np.unique(y)
    per = max(1, max_rows // max(1, len(present)))
    rows = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per] for c in present])
    xs = np.concatenate([x[rows], np.ones((len(rows), 1), x.dtype)], 1).astype(np.float64)
    onehot = np.eye(num_classes)[y[rows]]
    gram = xs.T @ xs
    lam = ridge * max(float(np.mean(np.diag(gram))), 1e-12)
    reg = lam * np.eye(gram.shape[0])
    reg[-1, -1] = 0.0  # the bias is not penalised
    return np.linalg.solve(gram + reg, xs.T @ onehot)


def predict(weights, x):
    """Arg-max class [N] of features ``x`` [N, C] under ``weights``."""
    return np.argmax(x @ weights[:-1] + weights[-1], axis=1)


def scores(pred, truth, num_classes):
    """{accuracy, mean_dice, dice: {class: dice}}: Dice of each organ class
    (1..K-1) present in ``truth``; mean_dice their mean (nan when none)."""
    dice = {}
    for c in range(1, num_classes):
        t, p = truth == c, pred == c
        if t.any():
            dice[c] = float(2.0 * np.sum(t & p) / (np.sum(t) + np.sum(p)))
    return {"accuracy": float(np.mean(pred == truth)),
            "mean_dice": float(np.mean(list(dice.values()))) if dice else math.nan,
            "dice": dice}


def standardise(train, *others):
    """Features standardised per channel with ``train``'s mean and std."""
    mean = train.mean(0)
    std = np.maximum(train.std(0), 1e-6)
    return [(a - mean) / std for a in (train,) + others]


def linear_probe(train_x, train_y, val_x, val_y, num_classes, ridge=1e-3, max_rows=20000, seed=0):
    """Fits on (train_x [N, C], train_y [N]) and scores on the val pair
    (:func:`scores`)."""
    tx, vx = standardise(train_x.astype(np.float32), val_x.astype(np.float32))
    weights = fit_ridge(tx, train_y, num_classes, ridge, max_rows, seed)
    return scores(predict(weights, vx), val_y, num_classes)


# ----------------------------------------------------------------- features
def probe_part(method):
    """The export part whose features are probed: the one carrying the most
    transfer parts (RepRec: the hybrid CNN + transformer; others: their one)."""
    parts = method.export_parts()
    return max(parts.values(), key=lambda p: len(getattr(p, "transfer_parts", dict)()))


def _to_grid_axis(x, axis, size):
    """Average-pool (``x`` finer) or repeat (coarser) one spatial axis to ``size``."""
    n = x.shape[axis]
    if n == size:
        return x
    if n > size and n % size == 0:
        shape = tf.concat([tf.shape(x)[:axis], [size, n // size], tf.shape(x)[axis + 1:]], 0)
        return tf.reduce_mean(tf.reshape(x, shape), axis=axis + 1)
    if n < size and size % n == 0:
        return tf.repeat(x, size // n, axis=axis)
    idx = tf.cast(tf.floor((tf.range(size, dtype=tf.float32) + 0.5) * n / size), tf.int32)
    return tf.gather(x, idx, axis=axis)  # nearest for non-integer ratios


def to_grid(fmap, grid):
    """[B, d, h, w, C] -> [B, *grid, C] (float32)."""
    x = tf.cast(fmap, tf.float32)
    for axis, size in zip((1, 2, 3), grid):
        x = _to_grid_axis(x, axis, size)
    return x


def grid_labels(labels, stride):
    """Label at the centre voxel of each ``stride`` cell: [B, D, H, W] -> [B, D/s, H/s, W/s]."""
    c = stride // 2
    return labels[:, c::stride, c::stride, c::stride]


def patch_size_for(crop_size, multiple=16):
    """The probe's patch: the run's crop, each axis raised to a multiple of
    ``multiple`` (the encoders' largest stride; a 2D method's slab depth of
    a few slices becomes 16)."""
    return tuple(max(multiple, int(math.ceil(int(c) / multiple)) * multiple) for c in crop_size)


class FeatureGrid:
    """volume batch -> features on the probe grid [B, g0, g1, g2, C] of a
    model part returning a dict of maps."""

    def __init__(self, part, grid):
        self.part, self.grid = part, tuple(grid)
        self._fn = tf.function(self._call, reduce_retracing=True)

    def _call(self, x):
        maps = self.part(x, training=False)
        maps = maps if isinstance(maps, dict) else {"features": maps}
        return tf.concat([to_grid(maps[k], self.grid) for k in sorted(maps)], axis=-1)

    def __call__(self, volumes, batch=2):
        out = [self._fn(tf.convert_to_tensor(volumes[i:i + batch])).numpy()
               for i in range(0, len(volumes), batch)]
        return np.concatenate(out, 0)


# ----------------------------------------------------------------- data
def _labelled_cases(manifest):
    cases = [c for c in manifest["cases"] if c.get("has_label")]
    return ([c["case_id"] for c in cases if c["split"] == "train"],
            [c["case_id"] for c in cases if c["split"] == "val"])


def probe_plan(manifest):
    """(fit case ids, held-out case ids, None) or (None, None, reason to skip)."""
    train, val = _labelled_cases(manifest)
    if not train and not val:
        return None, None, "the shards have no labels"
    if train and val:
        return train, val, None
    cases = sorted(train or val)
    if len(cases) < 2:
        return None, None, (f"the shards hold {len(cases)} labelled case; it needs two (one to "
                            "fit, one to score)")
    half = len(cases) // 2
    return cases[half:], cases[:half], None


def num_classes_of(manifest):
    values = [v for c in manifest["cases"] if c.get("has_label") for v in c.get("label_values", [])]
    return int(max(values)) + 1 if values else 2


def class_names(manifest, num_classes):
    """{value: name} from the manifest (or the phantom generator's record)."""
    from rr_tf.data import records

    names = records.label_names(manifest)
    if not names:
        for c in manifest["cases"]:
            meta = c.get("original", {}).get("meta", {}).get("labels")
            if meta:
                names = {int(k): v for k, v in meta.items()}
                break
    return {c: str(names.get(c, f"class_{c}")) for c in range(1, num_classes)}


def load_patches(data_dir, split, case_ids, count, patch_size, seed):
    """``count`` labelled patches (image [N, D, H, W, 1] float32 network
    input, label [N, D, H, W] int32) of ``case_ids``, centred on organ
    voxels (class-balanced), drawn with ``seed``."""
    from rr_tf.data import recipes
    from rr_tf.data.pipeline import StreamConfig, view_dataset

    fn = recipes.finetune_patch(patch_size, fg_fraction=1.0, spatial=None)
    stream = StreamConfig(batch_size=count, crops_per_volume=2, shuffle_cases=0, shuffle_crops=0,
                          seed=seed, case_ids=tuple(case_ids), cycle_length=1)
    ds, _ = view_dataset(data_dir, split, fn, stream, labelled=True, log=lambda m: None)
    batch = next(iter(ds))
    return (np.asarray(batch["image"], np.float32),
            np.asarray(batch["label"], np.int32).reshape((count,) + tuple(patch_size)))


class LinearProbe:
    """The fixed probe patches of a data set and :meth:`evaluate` (method -> scores)."""

    def __init__(self, train, val, num_classes, config, names=None):
        self.train_images, self.train_labels = train
        self.val_images, self.val_labels = val
        self.num_classes, self.config = int(num_classes), config
        self.names = names or {c: f"class_{c}" for c in range(1, self.num_classes)}
        patch = self.train_images.shape[1:4]
        if any(p % config.stride for p in patch):
            raise ConfigError("probe_stride", f"{config.stride} does not divide the probe patch "
                              f"{tuple(patch)}")
        self.grid = tuple(p // config.stride for p in patch)
        self._extractor = None

    @classmethod
    def from_data(cls, data_dir, crop_size, config, log=None):
        """The probe of a shard set, or None (with one line on ``log``) when
        it holds too few labelled cases."""
        from rr_tf.data import records

        log = log or (lambda m: print(m, file=sys.stderr))
        manifest = records.read_manifest(data_dir)
        fit_ids, held_ids, why = probe_plan(manifest)
        if why:
            log(f"probe: skipped ({why})")
            return None
        split_of = {c["case_id"]: c["split"] for c in manifest["cases"]}
        patch = patch_size_for(crop_size)
        k = num_classes_of(manifest)

        def draw(ids, seed):
            splits = {split_of[i] for i in ids}
            return load_patches(data_dir, splits.pop() if len(splits) == 1 else None, ids,
                                config.patches, patch, seed)

        probe = cls(draw(fit_ids, config.seed), draw(held_ids, config.seed + 1), k, config,
                    class_names(manifest, k))
        log(f"probe: every {config.every} steps, {config.patches} patches of "
            f"{'x'.join(map(str, patch))} from {len(fit_ids)} case(s) to fit, {config.patches} of "
            f"{len(held_ids)} other case(s) to score, {k} classes on the stride-{config.stride} grid")
        return probe

    def features(self, method, images):
        if self._extractor is None or self._extractor.method is not method:
            self._extractor = FeatureGrid(probe_part(method), self.grid)
            self._extractor.method = method
        f = self._extractor(images, self.config.batch)
        return f.reshape(-1, f.shape[-1])

    def evaluate(self, method):
        """{accuracy, mean_dice, dice: {name: dice}, seconds} of ``method``'s frozen features."""
        t0 = time.perf_counter()
        s = self.config.stride
        tx = self.features(method, self.train_images)
        vx = self.features(method, self.val_images)
        ty = grid_labels(self.train_labels, s).reshape(-1)
        vy = grid_labels(self.val_labels, s).reshape(-1)
        out = linear_probe(tx, ty, vx, vy, self.num_classes, self.config.ridge,
                           self.config.max_rows, self.config.seed)
        out["dice"] = {self.names.get(c, f"class_{c}"): d for c, d in out["dice"].items()}
        out["seconds"] = time.perf_counter() - t0
        out["feature_channels"] = int(tx.shape[1])
        return out


class ProbeCallback(keras.callbacks.Callback):
    """Runs ``probe`` at step 0 of a fresh run (the random-initialisation
    baseline), every ``every`` steps and at the end; writes the scalars to
    ``logdir`` and appends each result to ``json_path``. ``results`` holds
    them (step included)."""

    def __init__(self, probe, every, logdir, json_path=None, log=None):
        super().__init__()
        self.probe, self.every, self.json_path = probe, int(every), json_path
        self.writer = tf.summary.create_file_writer(logdir)
        self.log = log or (lambda m: print(m, file=sys.stderr))
        self.results = []
        if json_path and os.path.exists(json_path):
            with open(json_path) as f:
                self.results = json.load(f)

    def _step(self):
        return int(self.model.optimizer.iterations.numpy())

    def run(self):
        step = self._step()
        if self.results and self.results[-1]["step"] == step:
            return
        result = dict(self.probe.evaluate(self.model), step=step)
        with self.writer.as_default(step=step):
            tf.summary.scalar("probe/mean_dice", result["mean_dice"])
            tf.summary.scalar("probe/accuracy", result["accuracy"])
            tf.summary.scalar("probe/seconds", result["seconds"])
            for name, d in result["dice"].items():
                tf.summary.scalar(f"probe/dice_{name}", d)
        self.writer.flush()
        self.results = [r for r in self.results if r["step"] < step] + [result]
        if self.json_path:
            atomic_write_json(self.json_path, self.results)
        self.log(f"probe at step {step}: mean Dice {result['mean_dice']:.3f}, accuracy "
                 f"{result['accuracy']:.3f} ({result['seconds']:.1f} s)")

    def on_train_begin(self, logs=None):
        if self._step() == 0:
            self.run()

    def on_train_batch_end(self, batch, logs=None):
        if self._step() % self.every == 0:
            self.run()

    def on_train_end(self, logs=None):
        if self.model.stop_training and any(not np.isfinite(float(v)) for k, v in (logs or {}).items()
                                            if "loss" in k and np.ndim(v) == 0):
            return  # diverged: nothing worth probing
        self.run()

    def last(self):
        """The newest result as flat metrics (``probe_mean_dice``, ``probe_accuracy``, ``probe_step``)."""
        if not self.results:
            return {}
        r = self.results[-1]
        return {"probe_mean_dice": r["mean_dice"], "probe_accuracy": r["accuracy"],
                "probe_step": r["step"]}
