"""Whole-scan segmentation with a fine-tuned model, back on the scan's own grid.

    model = SegmentationModel.load("runs/ft_reprec")      # run dir or export dir
    labels, probs = model.segment(volume)                  # rr_tf.data.volume.Volume
    ens = SegmentationEnsemble.load(["runs/ft_a", "runs/ft_b"])  # mean of their probabilities

The scan goes through the *same* preprocessing spec as the training data
(canonical RAS orientation, optional body crop, resampling to the training
spacing, HU window), the sliding window runs on that grid, and the label
map is mapped back onto the input's original voxel grid: exactly (no
interpolation) when the grids differ by axis order, flips and a crop;
otherwise each class probability is interpolated linearly onto the input
grid and the label is their argmax there (smoother and more accurate at
organ borders than nearest-neighbour labels when the training spacing is
coarser than the scan's; one class at a time, so memory stays two
input-sized arrays). The output therefore shares the input's shape and
affine and overlays it in any viewer.
"""

import json
import os

import numpy as np

from rr_tf.data.labelnames import check_names, normalise
from rr_tf.data.preprocess import exact_grid_map, preprocess_case, restore_original_grid
from rr_tf.data.spec import PreprocessSpec
from rr_tf.errors import ConfigError, DataError
from rr_tf.inference import keras_predict_fn, sliding_window_inference


class SegmentationModel:
    """A fine-tuned segmenter with its spec and sliding-window settings."""

    def __init__(self, model, spec, window, overlap=0.5, source="", largest_component=(),
                 label_names=None):
        self.model, self.spec = model, spec
        self.largest_component = [int(c) for c in largest_component]
        # {value: name} recorded at export ({} when the export has none)
        self.label_names = check_names(label_names)
        self.window, self.overlap = tuple(int(w) for w in window), float(overlap)
        self.source = source
        self._predict = keras_predict_fn(model)

    @classmethod
    def load(cls, path):
        """From a fine-tuning run directory (its ``export/``) or an export
        directory holding ``segmenter.keras``, ``segmenter.json`` and
        ``preprocess.json``."""
        import keras

        import rr_tf.models  # noqa: F401  (registers the classes)

        export = os.path.join(path, "export") if os.path.isdir(os.path.join(path, "export")) else path
        needed = [os.path.join(export, n) for n in ("segmenter.keras", "segmenter.json",
                                                     "preprocess.json")]
        missing = [p for p in needed if not os.path.exists(p)]
        if missing:
            raise ConfigError("model", f"{path}: not a fine-tuning run or segmentation export "
                              f"({os.path.basename(missing[0])} missing)")
        with open(needed[1]) as f:
            info = json.load(f)
        with open(needed[2]) as f:
            spec = PreprocessSpec.from_json(f.read())
        try:
            names = normalise(info.get("label_names"), needed[1])
        except DataError as err:
            raise ConfigError("model", str(err)) from None
        try:
            model = keras.saving.load_model(needed[0])
        except Exception as err:  # noqa: BLE001  (any load failure: one line)
            raise ConfigError("model", f"{needed[0]}: cannot load ({type(err).__name__}: {err})") from None
        return cls(model, spec, info["window"], info.get("overlap", 0.5), source=export,
                   largest_component=info.get("largest_component", ()), label_names=names)

    def to_unit(self, stored):
        """Stored int16 HU (spec grid) -> float32 network input."""
        return np.asarray(self.spec.scale(stored.astype(np.float32)), np.float32)

    def network_probabilities(self, case, overlap=None, window_batch=2, tta=False,
                              progress=None):
        """Sliding-window class probabilities [D, H, W, C] on the stored grid of
        ``case`` (a scan preprocessed by this model's spec)."""
        return sliding_window_inference(
            self.to_unit(case.image), self._predict, self.window,
            overlap=self.overlap if overlap is None else overlap, window_batch=window_batch,
            tta=tta, pad_value=float(self.to_unit(np.array([-1000], np.int16))[0]),
            progress=progress)

    def segment(self, image, case_id="case", overlap=None, window_batch=2, tta=False,
                probabilities=False, progress=None, largest_component=None):
        """Label map (uint8, on ``image``'s grid) and, if asked, class
        probabilities [X, Y, Z, C] on that grid (else None; not
        postprocessed). ``largest_component``: classes reduced to their
        largest connected component (None = the ones chosen on validation
        at fine-tuning, ``self.largest_component``)."""
        case = preprocess_case(case_id, image, None, self.spec)
        probs = self.network_probabilities(case, overlap, window_batch, tta, progress)
        restore = _restorer(case)
        resampled = exact_grid_map(case.affine, case.meta["original"]["affine"]) is None
        if not resampled and not probabilities:  # exact grid map: the label map moves as it is
            out, full = restore(np.argmax(probs, axis=-1).astype(np.uint8), 0, 0), None
        else:
            out, full = _argmax_of_restored([(restore, probs, 1)], probs.shape[-1], probabilities)
        classes = self.largest_component if largest_component is None else largest_component
        return _keep_largest(out, classes), full


def _restorer(case):
    """``restore(array, order, cval)``: stored grid of ``case`` -> its original grid."""
    original = case.meta["original"]
    return lambda a, order, cval: restore_original_grid(
        a, case.affine, original["affine"], original["shape"], order=order, cval=cval)


def _argmax_of_restored(parts, num_classes, probabilities):
    """Label map (and, if asked, the probabilities) on the original grid from
    ``parts = [(restore, probs on its stored grid, weight)]``: each class is
    interpolated linearly onto the original grid, averaged over the parts
    with their weights (the number of models behind each), and the label is
    the argmax there, one class at a time (memory: two original-sized arrays
    plus the kept probabilities). Outside a stored grid a part counts as
    background."""
    out = best = None
    chans = []
    total = float(sum(w for _, _, w in parts))
    for c in range(num_classes):
        p = None
        for restore, probs, w in parts:
            q = restore(probs[..., c], 1, 1.0 if c == 0 else 0.0).astype(np.float32)
            q = q if w == total else q * np.float32(w / total)
            p = q if p is None else p + q
        if probabilities:
            chans.append(p)
        if out is None:
            out, best = np.zeros(p.shape, np.uint8), np.array(p, np.float32)
        else:
            better = p > best
            out[better], best[better] = c, p[better]
    return out, (np.stack(chans, axis=-1) if probabilities else None)


def _keep_largest(labels, classes):
    if not classes:
        return labels
    from rr_tf.postprocess import keep_largest_component

    return keep_largest_component(labels, classes)


class SegmentationEnsemble:
    """Several fine-tuned segmenters of the same classes, averaged as nnU-Net
    ensembles its folds and configurations: each model segments the scan
    through its own spec (spacing, window, crop) and sliding window, its
    class probabilities are interpolated onto the scan's grid, and the label
    is the argmax of their mean.

        ens = SegmentationEnsemble.load(["runs/ft_a", "runs/ft_b"])
        labels, probs = ens.segment(volume)

    The largest-component postprocessing keeps, by default, the classes
    that at least half of the models chose on their validation cases.
    """

    def __init__(self, models):
        self.models = list(models)
        if not self.models:
            raise ConfigError("model", "an ensemble needs at least one model")
        first = self.models[0]
        for m in self.models[1:]:
            if int(m.model.num_classes) != int(first.model.num_classes):
                raise ConfigError("model", f"{m.source}: {int(m.model.num_classes)} classes, but "
                                  f"{first.source} has {int(first.model.num_classes)}; an ensemble "
                                  "averages models of the same classes")
            if m.label_names and first.label_names and m.label_names != first.label_names:
                raise ConfigError("model", f"{m.source}: label names {m.label_names} differ from "
                                  f"{first.source}'s {first.label_names}")
        self.num_classes = int(first.model.num_classes)
        self.label_names = next((m.label_names for m in self.models if m.label_names), {})
        votes = {}
        for m in self.models:
            for c in m.largest_component:
                votes[c] = votes.get(c, 0) + 1
        self.largest_component = sorted(c for c, n in votes.items() if 2 * n >= len(self.models))
        self.source = ", ".join(m.source for m in self.models)

    @classmethod
    def load(cls, paths):
        return cls([SegmentationModel.load(p) for p in paths])

    def describe(self):
        return "; ".join(f"{m.source}: window {m.window}, spec {m.spec.describe()}"
                         for m in self.models)

    def segment(self, image, case_id="case", overlap=None, window_batch=2, tta=False,
                probabilities=False, progress=None, largest_component=None):
        """As :meth:`SegmentationModel.segment`, over the mean of the models'
        probabilities on ``image``'s grid."""
        if len(self.models) == 1:
            return self.models[0].segment(image, case_id, overlap, window_batch, tta,
                                          probabilities, progress, largest_component)
        # models of one spec share the preprocessing and are averaged on its grid,
        # so each spec's case is built and restored to the scan's grid once
        groups = {}
        for m in self.models:
            key = m.spec.hash
            if key not in groups:
                groups[key] = [preprocess_case(case_id, image, None, m.spec), 0.0, 0]
            group = groups[key]
            group[1] = group[1] + m.network_probabilities(group[0], overlap, window_batch, tta,
                                                          progress)
            group[2] += 1
        parts = [(_restorer(case), total / n, n) for case, total, n in groups.values()]
        out, full = _argmax_of_restored(parts, self.num_classes, probabilities)
        classes = self.largest_component if largest_component is None else largest_component
        return _keep_largest(out, classes), full
