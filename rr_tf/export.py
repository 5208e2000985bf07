"""Export of the transferable parts of a trained model.

For each part a method names (``method.export_parts()``: name -> keras
model taking a volume [B, D, H, W, 1] in network units):

    export/<name>.keras          the Keras model (registered classes reload)
    export/<name>/               a TF SavedModel; signature ``serving_default``
                                 takes float32 [B, D, H, W, 1] with any D, H, W
                                 (multiples of the part's stride) and returns
                                 its feature maps; ``preprocess.json`` (the
                                 data spec) is an asset inside, and
                                 ``spec_json`` / ``spec_hash`` are attributes
    export/preprocess.json       the spec again, for people

Every file is written under a temporary name and renamed into place.
"""

import json
import os
import shutil

import keras
import tensorflow as tf

from rr_tf.runs import PARTS_NAME, SPEC_NAME
from rr_tf.utils.files import atomic_write, atomic_write_json


class _Serving(tf.Module):
    def __init__(self, model, spec, spec_path):
        super().__init__()
        self.model = model
        self.spec_json = tf.Variable(spec.to_json(), trainable=False, dtype=tf.string)
        self.spec_hash = tf.Variable(spec.hash, trainable=False, dtype=tf.string)
        self.spec_asset = tf.saved_model.Asset(spec_path)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, None, 1], tf.float32,
                                                name="volume")])
    def serve(self, volume):
        out = self.model(volume, training=False)
        if isinstance(out, dict):
            return {k: tf.cast(v, tf.float32) for k, v in out.items()}
        if isinstance(out, (list, tuple)):
            return {f"output_{i}": tf.cast(v, tf.float32) for i, v in enumerate(out)}
        return {"features": tf.cast(out, tf.float32)}


def _replace_dir(tmp, final):
    old = final + ".old"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def export_model(model, export_dir, name, spec, sample=None):
    """Writes ``<name>.keras`` and the SavedModel ``<name>/``; returns their paths."""
    os.makedirs(export_dir, exist_ok=True)
    if sample is not None:
        model(sample, training=False)  # build
    keras_path = os.path.join(export_dir, f"{name}.keras")
    tmp = os.path.join(export_dir, f".{name}.tmp-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, keras_path)
    spec_path = os.path.join(export_dir, SPEC_NAME)
    atomic_write(spec_path, spec.to_json() + "\n")
    saved = os.path.join(export_dir, name)
    tmp_dir = os.path.join(export_dir, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    module = _Serving(model, spec, spec_path)
    tf.saved_model.save(module, tmp_dir, signatures={"serving_default": module.serve})
    _replace_dir(tmp_dir, saved)
    return keras_path, saved


def export_method(method, export_dir, spec, sample=None):
    """Exports every part of ``method.export_parts()``; ``sample`` is a batch
    from the training stream (its first view builds the parts). Returns
    {name: (keras_path, savedmodel_path)} and writes ``export/parts.json``."""
    volume = method.sample_volume(sample) if sample is not None else None
    paths = {}
    for name, model in method.export_parts().items():
        paths[name] = export_model(model, export_dir, name, spec, volume)
    info = {name: {"keras": os.path.basename(k), "saved_model": os.path.basename(s)}
            for name, (k, s) in paths.items()}
    info["spec_hash"] = spec.hash
    atomic_write(os.path.join(export_dir, PARTS_NAME), json.dumps(info, indent=1))
    return paths


def load_spec(saved_model_dir):
    """The preprocessing spec stored inside an exported SavedModel."""
    from rr_tf.data.spec import PreprocessSpec

    loaded = tf.saved_model.load(saved_model_dir)
    return PreprocessSpec.from_json(loaded.spec_json.numpy().decode())


class _SegmentationServing(tf.Module):
    def __init__(self, model, spec, spec_path, window, overlap):
        super().__init__()
        from rr_tf.data.pipeline import unit_scaler
        from rr_tf.data.views import PAD_HU

        self.model = model
        self.window, self.overlap = tuple(int(w) for w in window), float(overlap)
        self.to_unit = unit_scaler(spec)
        self.pad_value = float(self.to_unit(tf.constant(float(PAD_HU))))
        self.spec_json = tf.Variable(spec.to_json(), trainable=False, dtype=tf.string)
        self.spec_hash = tf.Variable(spec.hash, trainable=False, dtype=tf.string)
        self.spec_asset = tf.saved_model.Asset(spec_path)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name="volume_hu")])
    def serve(self, volume_hu):
        from rr_tf.inference import sliding_window_graph

        probs = sliding_window_graph(self.to_unit(volume_hu),
                                     lambda x: self.model(x, training=False), self.window,
                                     self.model.num_classes, self.overlap,
                                     pad_value=self.pad_value)
        return {"labels": tf.cast(tf.argmax(probs, axis=-1), tf.uint8), "probabilities": probs}


def export_segmenter(model, export_dir, spec, window, overlap=0.5, sample=None,
                     largest_component=(), label_names=None):
    """Writes ``segmenter.keras`` and the SavedModel ``segmenter/`` whose
    ``serving_default`` takes a float32 HU volume [D, H, W] of any size on
    the spec's grid (stored orientation and spacing) and returns
    ``labels`` (uint8 [D, H, W]) and ``probabilities`` (sliding-window
    inference with the training window inside; no postprocessing).
    ``largest_component``: the classes whose largest connected component
    alone ``launch/infer.py`` keeps by default (``segmenter.json``).
    ``label_names``: ``{value: name}`` (int or digit-string keys, e.g. a
    manifest's ``"label_names"``), recorded in ``segmenter.json`` as
    ``"label_names": {"1": "liver", ...}`` ({} when None).
    Returns the two paths."""
    from rr_tf.data.labelnames import check_names

    names = {str(k): v for k, v in check_names(label_names).items()}
    os.makedirs(export_dir, exist_ok=True)
    if sample is not None:
        model(sample, training=False)
    keras_path = os.path.join(export_dir, "segmenter.keras")
    tmp = os.path.join(export_dir, f".segmenter.tmp-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, keras_path)
    spec_path = os.path.join(export_dir, SPEC_NAME)
    atomic_write(spec_path, spec.to_json() + "\n")
    atomic_write_json(os.path.join(export_dir, "segmenter.json"), {
        "window": list(window), "overlap": overlap, "num_classes": model.num_classes,
        "spec_hash": spec.hash, "largest_component": [int(c) for c in largest_component],
        "label_names": names})
    saved = os.path.join(export_dir, "segmenter")
    tmp_dir = os.path.join(export_dir, f".segmenter.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    module = _SegmentationServing(model, spec, spec_path, window, overlap)
    tf.saved_model.save(module, tmp_dir, signatures={"serving_default": module.serve})
    _replace_dir(tmp_dir, saved)
    return keras_path, saved
