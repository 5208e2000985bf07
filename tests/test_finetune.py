"""Fine-tuning, whole-scan inference and the segmentation export.

Geometry checks use a segmenter whose output is a fixed function of the
voxel intensity (a threshold), so a label map that comes back on the wrong
grid, flipped or shifted disagrees with the input scan voxel by voxel."""

import json
import os
import sys

import keras
import numpy as np
import pytest

from rr_tf.data import nifti
from rr_tf.data.prepare import PrepareConfig, prepare
from rr_tf.data.spec import PreprocessSpec
from rr_tf.data.volume import Volume
from rr_tf.errors import ConfigError, SpecMismatchError
from rr_tf.models.segmenters import UNetSegmenter
from rr_tf.models.unet3d import UNet3D
from rr_tf.predict import SegmentationEnsemble, SegmentationModel
from rr_tf.data.records import read_manifest
from rr_tf.training.finetune import (FinetuneConfig, choose_labeled, load_pretrained,
                                     parse_budget, run_finetuning, validation_cases)
from method_harness import phantom_shards
from subproc import run_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


# ------------------------------------------------------------ labelled budget
def _manifest(n=6):
    return {"cases": [{"case_id": f"c{i}", "split": "train" if i < n - 1 else "val",
                       "has_label": i != 2} for i in range(n)]}


def test_labelled_budget_is_reproducible_and_checked():
    m = _manifest()
    assert choose_labeled(m, "all", 0) == ["c0", "c1", "c3", "c4"]
    two = choose_labeled(m, "2", seed=1)
    assert len(two) == 2 and two == choose_labeled(m, 2, seed=1)
    assert set(two) <= {"c0", "c1", "c3", "c4"}
    picks = {tuple(choose_labeled(m, "2", seed=s)) for s in range(10)}
    assert len(picks) > 1  # the seed matters
    assert len(choose_labeled(m, "0.5", seed=0)) == 2 and len(choose_labeled(m, "0.1", 0)) == 1
    with pytest.raises(ConfigError, match="num_labeled"):
        choose_labeled(m, "5", 0)
    for bad in ("0", "-1", "1.5", "x"):
        with pytest.raises(ConfigError, match="num_labeled"):
            parse_budget(bad)


# ------------------------------------------------------------ load_pretrained
def test_load_pretrained_refuses_another_spec_and_reports(tmp_path):
    enc = UNet3D(base_width=2, levels=3, encoder_only=True, name="cnn")
    enc.build((None, 16, 16, 16, 1))
    from rr_tf.models.parts import CNNPyramid

    wrapper = CNNPyramid(enc)
    path = str(tmp_path / "cnn_encoder.keras")
    wrapper(np.zeros((1, 16, 16, 16, 1), "float32"))
    wrapper.save(path)
    spec_a, spec_b = PreprocessSpec(spacing=(3.0, 3.0, 3.0)), PreprocessSpec(spacing=(1.5, 1.5, 2.0))
    (tmp_path / "preprocess.json").write_text(spec_a.to_json())
    seg = UNetSegmenter(3, base_width=2, levels=3)
    seg.build((None, 16, 16, 16, 1))
    with pytest.raises(SpecMismatchError, match="allow_spec_mismatch"):
        load_pretrained(seg, path, spec=spec_b)
    report = load_pretrained(seg, path, spec=spec_b, allow_spec_mismatch=True)
    assert report.matched and all(k.startswith("unet/enc") for k in report.matched)
    assert any(k.startswith("unet/dec") for k in report.missing)
    report = load_pretrained(seg, path, spec=spec_a)
    np.testing.assert_array_equal(seg.unet.get_layer("enc1").weights[0].numpy(),
                                  enc.get_layer("enc1").weights[0].numpy())
    wide = UNetSegmenter(3, base_width=3, levels=3)
    wide.build((None, 16, 16, 16, 1))
    with pytest.raises(ConfigError, match="no variable matches"):
        load_pretrained(wide, path, spec=spec_a)


# ------------------------------------------------------------ geometry
def _threshold_model(threshold=0.55):
    """Class 1 where the (unit-scaled) intensity exceeds ``threshold``."""
    x = keras.Input((None, None, None, 1))
    logit = keras.layers.Lambda(lambda v: (v - threshold) * 50.0)(x)
    out = keras.layers.Concatenate()([-logit, logit])
    model = keras.Model(x, out)
    model.num_classes = 2
    return model


def _scan(shape=(40, 36, 30), seed=0):
    """A blobby HU volume: bright structures that break every symmetry."""
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    hu = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    hu = (hu / hu.std() * 400).astype(np.float32)
    hu[2:9, 3:7, 4:25] = 600.0  # an off-centre bar
    return hu


def _expected(hu, threshold=0.55):
    return ((np.clip(hu, -1000, 1000) + 1000) / 2000 > threshold).astype(np.uint8)


@pytest.mark.parametrize("variant", ["plain", "flipped_permuted", "oblique", "anisotropic"])
def test_labels_come_back_on_the_input_grid(variant):
    hu = _scan()
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = (-30, 20, 5)
    if variant == "flipped_permuted":  # LPI-like storage of the same anatomy
        hu = np.flip(np.transpose(hu, (1, 0, 2)), axis=(0, 2)).copy()
        perm = np.zeros((4, 4))
        perm[0, 1] = perm[1, 0] = perm[2, 2] = perm[3, 3] = 1
        flip = np.diag([-1.0, 1.0, -1.0, 1.0])
        flip[0, 3], flip[2, 3] = hu.shape[0] - 1, hu.shape[2] - 1
        affine = affine @ perm @ flip
    elif variant == "oblique":
        a = np.deg2rad(12.0)
        rot = np.array([[np.cos(a), -np.sin(a), 0, 0], [np.sin(a), np.cos(a), 0, 0],
                        [0, 0, 1, 0], [0, 0, 0, 1]])
        affine = rot @ affine
    spacing = (2.0, 2.0, 2.0) if variant == "anisotropic" else None
    model = SegmentationModel(_threshold_model(), PreprocessSpec(spacing=spacing), (16, 16, 16))
    labels, probs = model.segment(Volume(hu, affine, "t"), probabilities=True)
    assert labels.shape == hu.shape and labels.dtype == np.uint8
    assert probs.shape == hu.shape + (2,)
    want = _expected(hu)
    agree = (labels == want).mean()
    if variant == "anisotropic":  # resampled to 2 mm and back: nearest-neighbour edges differ
        assert agree > 0.9, agree
    else:  # canonical reorientation is exact
        assert agree > 0.999, agree
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)


def _anisotropic_scan():
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = (-30, 20, 5)
    return Volume(_scan(), affine, "t")


def test_an_ensemble_labels_the_argmax_of_the_mean_probabilities_of_its_models():
    """Two models with their own specs (native grid and 2 mm) and thresholds: the
    ensemble's probabilities are the mean of each model's on the scan's grid, its
    label their argmax, and it differs from both members where they disagree."""
    scan = _anisotropic_scan()
    a = SegmentationModel(_threshold_model(0.52), PreprocessSpec(), (16, 16, 16), source="a")
    b = SegmentationModel(_threshold_model(0.58), PreprocessSpec(spacing=(2.0, 2.0, 2.0)),
                          (16, 16, 16), source="b")
    la, pa = a.segment(scan, probabilities=True, largest_component=[])
    lb, pb = b.segment(scan, probabilities=True, largest_component=[])
    labels, probs = SegmentationEnsemble([a, b]).segment(scan, probabilities=True,
                                                          largest_component=[])
    assert labels.shape == scan.shape and labels.dtype == np.uint8
    mean = (pa + pb) / 2
    np.testing.assert_allclose(probs, mean, atol=1e-6)
    clear = np.abs(mean[..., 1] - mean[..., 0]) > 1e-6
    np.testing.assert_array_equal(labels[clear], np.argmax(mean, axis=-1)[clear])
    assert (labels != la).any() and (labels != lb).any()  # not just one of the members


def test_an_ensemble_of_one_model_twice_segments_as_the_model():
    scan = _anisotropic_scan()
    for spec in (PreprocessSpec(), PreprocessSpec(spacing=(2.0, 2.0, 2.0))):
        model = SegmentationModel(_threshold_model(), spec, (16, 16, 16), largest_component=[1])
        alone, _ = model.segment(scan)
        twice, _ = SegmentationEnsemble([model, model]).segment(scan)
        np.testing.assert_array_equal(twice, alone)


def test_an_ensemble_refuses_other_classes_and_votes_the_largest_component_classes():
    spec, w = PreprocessSpec(), (16, 16, 16)
    two = SegmentationModel(_threshold_model(), spec, w, source="two")
    x = keras.Input((None, None, None, 1))
    three_net = keras.Model(x, keras.layers.Concatenate()([x, x, x]))
    three_net.num_classes = 3
    with pytest.raises(ConfigError, match="three: 3 classes, but two has 2"):
        SegmentationEnsemble([two, SegmentationModel(three_net, spec, w, source="three")])
    named = SegmentationModel(_threshold_model(), spec, w, source="n",
                              label_names={1: "liver"})
    other = SegmentationModel(_threshold_model(), spec, w, source="o",
                              label_names={1: "spleen"})
    with pytest.raises(ConfigError, match="label names"):
        SegmentationEnsemble([named, other])
    assert SegmentationEnsemble([named, two]).label_names == {1: "liver"}
    votes = [SegmentationModel(_threshold_model(), spec, w, largest_component=c)
             for c in ([1, 3], [1], [3, 4])]
    assert SegmentationEnsemble(votes).largest_component == [1, 3]  # 2 of 3 models each
    assert SegmentationEnsemble(votes[:2]).largest_component == [1, 3]  # half of 2 is enough


# ------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "shards"
    result = phantom_shards(out, 4, (48, 48, 48), (8.0, 8.0, 8.0), val_fraction=0.25, seed=3)
    assert result.ok
    return str(out)


def test_finetune_resume_export_and_infer(shards, tmp_path):
    run = tmp_path / "ft"
    cfg = FinetuneConfig(data_dir=shards, run_dir=str(run), num_labeled="2",
                         segmenter_args={"base_width": 2, "levels": 3}, train_steps=2,
                         batch_size=2, crop_size=(16, 16, 16), checkpoint_every=2, val_every=2,
                         verbose=0, seed=1)
    metrics = run_finetuning(cfg, log=lambda m: None)
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
    labelled = json.load(open(run / "labelled_cases.json"))
    assert len(labelled) == 2
    best = json.load(open(run / "best" / "best.json"))
    assert best["step"] == 2 and 0.0 <= best["mean_dice"] <= 1.0
    # a longer schedule resumes from step 2
    import dataclasses

    more = run_finetuning(dataclasses.replace(cfg, train_steps=3, export=True), log=lambda m: None)
    assert more["step"] == 3
    assert json.load(open(run / "run.json"))["last_step"] == 3

    # whole-scan inference on a NIfTI with a flipped, anisotropic affine
    hu = _scan((30, 26, 20), seed=4)
    affine = np.array([[-2.0, 0, 0, 40], [0, 0, 3.0, -20], [0, 2.5, 0, 10], [0, 0, 0, 1]])
    src = tmp_path / "scan.nii.gz"
    nifti.write_nifti(src, hu.astype(np.int16), affine)
    out = tmp_path / "seg.nii.gz"
    res = run_logged([sys.executable, os.path.join(ROOT, "launch", "infer.py"),
                          f"--model={run}", f"--input={src}", f"--output={out}",
                          "--save_probabilities"], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    seg = nifti.read_nifti(str(out), kind="label")
    assert seg.shape == hu.shape
    np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
    assert os.path.exists(tmp_path / "seg_probabilities.nii.gz")
    # the Python API gives the same map
    direct, _ = SegmentationModel.load(str(run)).segment(nifti.read_nifti(str(src)))
    np.testing.assert_array_equal(seg.array, direct)
    # an ensemble of the run with itself (its export dir) through the command line: the same map
    ens = tmp_path / "ens.nii.gz"
    res = run_logged([sys.executable, os.path.join(ROOT, "launch", "infer.py"),
                      f"--model={run},{run / 'export'}", f"--input={src}", f"--output={ens}"],
                     env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    np.testing.assert_array_equal(nifti.read_nifti(str(ens), kind="label").array, direct)
    # resampled grid: the label is the argmax of the linearly resampled probabilities
    plain, probs = SegmentationModel.load(str(run)).segment(
        nifti.read_nifti(str(src)), probabilities=True, largest_component=[])
    top = np.sort(probs, axis=-1)
    clear = top[..., -1] - top[..., -2] > 1e-6  # ties aside
    np.testing.assert_array_equal(plain[clear], np.argmax(probs, axis=-1)[clear])
    # the largest-component choice was made on the validation case and travels in the export
    post = json.load(open(run / "postprocess.json"))
    exported = json.load(open(run / "export" / "segmenter.json"))
    assert exported["largest_component"] == post["largest_component"] == more["largest_component"]
    from rr_tf.data.phantom import LABEL_NAMES  # the manifest's names travel into the export

    assert exported["label_names"] == {str(k): v for k, v in LABEL_NAMES.items()}
    assert SegmentationModel.load(str(run)).label_names == LABEL_NAMES
    import glob

    import tensorflow as tf

    tags = {v.tag for e in glob.glob(str(run / "tensorboard" / "validation" / "events.*"))
            for ev in tf.compat.v1.train.summary_iterator(e) for v in ev.summary.value}
    assert "val/mean_dice" in tags and "val/dice_1_liver" in tags, tags
    assert set(post["dice_without_with"]) == {str(c) for c in range(1, 11)}
    assert set(post["largest_component"]) <= set(range(1, 11))

    # the SavedModel (sliding window inside) in a fresh process = the Keras model, also
    # when the signature is compiled by XLA
    stored = np.random.default_rng(0).uniform(-1000, 1000, (20, 18, 24)).astype("float32")
    np.save(tmp_path / "v.npy", stored)
    script = (
        "import numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({str(run / 'export' / 'segmenter')!r})\n"
        f"v = tf.constant(np.load({str(tmp_path / 'v.npy')!r}))\n"
        "serve = m.signatures['serving_default']\n"
        "out = serve(volume_hu=v)\n"
        "xla = tf.function(lambda x: serve(volume_hu=x), jit_compile=True)(v)\n"
        f"np.save({str(tmp_path / 'p.npy')!r}, out['probabilities'].numpy())\n"
        f"np.save({str(tmp_path / 'px.npy')!r}, xla['probabilities'].numpy())\n")
    res = run_logged([sys.executable, "-c", script], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    served = np.load(tmp_path / "p.npy")
    model = SegmentationModel.load(str(run))
    from rr_tf.inference import sliding_window_inference

    want = sliding_window_inference(model.to_unit(stored), model._predict, model.window,
                                    overlap=model.overlap, pad_value=0.0)
    np.testing.assert_allclose(served, want, atol=1e-4)
    # the same signature compiled by XLA (what a GPU serving stack may do)
    np.testing.assert_allclose(np.load(tmp_path / "px.npy"), want, atol=1e-4)


def test_infer_cli_errors(tmp_path):
    res = run_logged([sys.executable, os.path.join(ROOT, "launch", "infer.py"),
                          f"--model={tmp_path}", f"--input={tmp_path / 'none.nii.gz'}",
                          f"--output={tmp_path / 'o.nii.gz'}"], env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "no such file" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "x.nii.gz").write_bytes(b"junk")
    res = run_logged([sys.executable, os.path.join(ROOT, "launch", "infer.py"),
                          f"--model={tmp_path}", f"--input={tmp_path / 'x.nii.gz'}",
                          f"--output={tmp_path / 'o.nii.gz'}"], env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "segmenter.keras missing" in res.stderr
    res = run_logged([sys.executable, os.path.join(ROOT, "launch", "infer.py"),
                      f"--model={tmp_path},", f"--input={tmp_path / 'x.nii.gz'}",
                      f"--output={tmp_path / 'o.nii.gz'}"], env=ENV, capture_output=True,
                     text=True, timeout=120)
    assert res.returncode == 2 and "an empty model path" in res.stderr


def test_validation_cases_limit(tmp_path):
    out = tmp_path / "shards"
    assert prepare(PrepareConfig(source="phantom", output_dir=str(out), num_cases=4,
                                 phantom_shape=(32, 32, 32),
                                 spec=PreprocessSpec(spacing=(10.0, 10.0, 10.0)), workers=1,
                                 progress=False, val_fraction=0.5, seed=5), log=lambda m: None).ok
    spec = PreprocessSpec(spacing=(10.0, 10.0, 10.0))
    manifest = read_manifest(str(out))
    val_ids = [c["case_id"] for c in manifest["cases"] if c["split"] == "val"]
    assert len(val_ids) == 2
    every = validation_cases(str(out), spec)
    assert sorted(c["case_id"] for c in every) == sorted(val_ids)
    first = validation_cases(str(out), spec, limit=1)
    assert [c["case_id"] for c in first] == val_ids[:1]
    assert first[0]["image"].ndim == 3 and first[0]["label"].shape == first[0]["image"].shape
    with pytest.raises(ConfigError, match="val_cases"):
        FinetuneConfig(data_dir=str(out), run_dir=str(tmp_path / "r"), val_cases=-1).validate()


def test_tensorboard_panels_overlay_labels_in_the_figure_colours():
    from rr_tf.training.segmentation import SegmentationTask
    from rr_tf.utils.figures import PALETTE, tensorboard_overlay

    image = np.full((1, 4, 4, 1), 0.5, np.float32)
    labels = np.zeros((1, 4, 4), np.int32)
    labels[0, 1, 2] = 2
    out = tensorboard_overlay(image, labels, 3, alpha=0.5).numpy()
    np.testing.assert_allclose(out[0, 0, 0], [0.5, 0.5, 0.5])  # background stays grey
    np.testing.assert_allclose(out[0, 1, 2], 0.5 * 0.5 + 0.5 * np.asarray(PALETTE[1]) / 255.0,
                               rtol=1e-6)
    task = SegmentationTask(UNetSegmenter(3, base_width=2, levels=3), 3)
    vol = np.random.default_rng(0).uniform(size=(2, 16, 12, 8, 1)).astype(np.float32)
    lab = np.zeros((2, 16, 12, 8), np.int32)
    lab[:, 4:8, 4:8, 4] = 1
    panel = task.summary_images({"image": vol, "label": lab})["image_label_prediction"].numpy()
    assert panel.shape == (2, 16, 36, 3)  # image | label overlay | prediction overlay
    grey = vol[:, :, :, 4, 0]
    np.testing.assert_allclose(panel[..., :12, 0], grey, rtol=1e-6)
    labelled = panel[:, 4:8, 12 + 4:12 + 8]
    expected = 0.45 * grey[:, 4:8, 4:8, None] + 0.55 * np.asarray(PALETTE[0]) / 255.0
    np.testing.assert_allclose(labelled, expected, rtol=1e-5)


def test_training_dice_leaves_out_classes_absent_from_label_and_prediction():
    from rr_tf.training.segmentation import foreground_dice

    label = np.zeros((1, 4, 1, 1, 1), "int32")
    label[0, :2] = 1                        # class 1 on voxels 0, 1; class 2 nowhere
    pred = np.array([1, 0, 0, 0])           # class 1 predicted on voxel 0 only
    logits = np.eye(3, dtype="float32")[pred].reshape(1, 4, 1, 1, 3)
    # class 1: 2*1 / (1 + 2); class 2 is absent from both and does not count
    np.testing.assert_allclose(float(foreground_dice(logits, label, 3)), 2 / 3, rtol=1e-6)
    pred = np.array([1, 2, 0, 0])           # a false class-2 voxel now counts as a 0
    logits = np.eye(3, dtype="float32")[pred].reshape(1, 4, 1, 1, 3)
    np.testing.assert_allclose(float(foreground_dice(logits, label, 3)), (2 / 3 + 0) / 2, rtol=1e-6)
    background = np.eye(3, dtype="float32")[np.zeros(4, int)].reshape(1, 4, 1, 1, 3)
    assert float(foreground_dice(background, np.zeros_like(label), 3)) == 1.0


REPLICA_SCRIPT = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from rr_tf import losses
from rr_tf.models.segmenters import UNetSegmenter
from rr_tf.training.segmentation import SegmentationTask

class LocalDice(SegmentationTask):  # what a naive port does: each replica's own batch Dice
    def segmentation_loss(self, logits, label, dice_weight=1.0):
        return losses.dice_ce_loss(logits, label, self.num_classes, self.class_weights,
                                   dice_weight=dice_weight)

rng = np.random.default_rng(0)
batch = {"image": rng.uniform(size=(4, 16, 16, 16, 1)).astype("float32"),
         "label": rng.integers(0, 3, (4, 16, 16, 16)).astype("int32")}
batch["label"][:2] = 0  # replica 0's half has no foreground: local and global Dice differ

def run(strategy, cls):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        seg = UNetSegmenter(3, base_width=2, levels=3, norm="group")
        task = cls(seg, 3, class_weights=(0.2, 1.0, 2.0))
        task.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=False)
        task.build_for(batch)
    before = [w.numpy() for w in seg.weights]
    ds = tf.data.Dataset.from_tensor_slices(batch).batch(4)
    logs = task.fit(ds, epochs=1, verbose=0).history
    return [w.numpy() for w in seg.weights], before, float(logs["loss"][0])

one, init, loss1 = run(tf.distribute.OneDeviceStrategy("/cpu:0"), SegmentationTask)
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])  # one: collective keys restart
two, _, loss2 = run(mirrored, SegmentationTask)
naive, _, _ = run(mirrored, LocalDice)
diff = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
print(json.dumps({"moved": diff(one, init), "two": diff(one, two), "naive": diff(one, naive),
                  "loss": [loss1, loss2]}))
"""


def test_finetuning_step_is_the_same_on_one_and_two_replicas():
    """Batch Dice and class-weighted CE are ratios of sums over the batch:
    each replica must use the global sums, not its own half (which would
    change the step here by far more than rounding)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    res = run_logged([sys.executable, "-c", REPLICA_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["moved"] > 1e-3, out
    np.testing.assert_allclose(out["loss"][0], out["loss"][1], rtol=1e-5)
    assert out["two"] < 1e-3 * out["moved"], out
    assert out["naive"] > 100 * out["two"], out


def test_demo_finetune_flagfile_generates_its_data_trains_and_exports(tmp_path):
    """configs/demo_finetune.flags as a user runs it, shrunk (2 steps, 4
    small phantoms): the shards are generated in the empty --data_dir at the
    flagfile's 6 mm, the run validates, chooses its postprocessing and exports."""
    data, run = tmp_path / "data", tmp_path / "run"
    res = run_logged([sys.executable, os.path.join(ROOT, "launch", "finetune.py"),
                      f"--flagfile={os.path.join(ROOT, 'configs', 'demo_finetune.flags')}",
                      f"--data_dir={data}", f"--run_dir={run}", "--prepare_phantom_if_missing=5",
                      "--num_labeled=2", "--train_steps=2", "--checkpoint_every=2",
                      "--val_every=2", "--base_width=2", "--crop_size=16,16,16", "--verbose=none"],
                     cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no data yet; generating 5 phantom cases first (6x6x6 mm)" in res.stderr
    spec = json.load(open(data / "preprocess.json"))
    assert spec["spacing"] == [6.0, 6.0, 6.0]
    state = json.load(open(run / "run.json"))
    assert state["finished"] and state["last_step"] == 2
    assert os.path.exists(run / "export" / "segmenter.keras")
    assert os.path.exists(run / "postprocess.json")
    assert "--patch_sampling=class_balanced" in open(run / "flags.txt").read()


def test_finetune_under_a_read_time_normalisation_exports_and_refuses_it(shards, tmp_path):
    """nnU-Net's CT scheme from the same shards: the run, its export and
    inference use the derived spec; a stored-normalisation pre-training is
    refused for it (the inputs would differ), unless explicitly allowed."""
    manifest = read_manifest(shards)
    ct = manifest["spec_obj"].with_normalization("ct", manifest["intensity_properties"])
    run = tmp_path / "ct"
    cfg = FinetuneConfig(data_dir=shards, run_dir=str(run), num_labeled="2", normalization="ct",
                         segmenter_args={"base_width": 2, "levels": 3}, train_steps=1,
                         batch_size=2, crop_size=(16, 16, 16), checkpoint_every=1, val_every=1,
                         verbose=0, seed=1, export=True, intensity_augment=True,
                         tissue_shift_hu=50.0, flip_axes=(1, 2), scale_range=(0.8, 1.25),
                         rotation_degrees=20.0, anisotropy=0.1, elastic_voxels=2.0)
    run_finetuning(cfg, log=lambda m: None)
    exported = PreprocessSpec.from_json(open(run / "export" / "preprocess.json").read())
    assert exported == ct and exported.scaling == "ct"
    model = SegmentationModel.load(str(run))
    hu = np.array([[[-1000.0, 0.0, 500.0]]], np.float32)
    np.testing.assert_allclose(model.to_unit(hu), ct.scale(hu), rtol=1e-6)
    # the plain (stored) normalisation's weights do not load silently into it
    seg = UNetSegmenter(11, base_width=2, levels=3)
    seg.build((None, 16, 16, 16, 1))
    with pytest.raises(SpecMismatchError, match="allow_spec_mismatch"):
        load_pretrained(seg, str(run / "export" / "segmenter.keras"), spec=manifest["spec_obj"])
    with pytest.raises(ConfigError, match="^normalization:"):
        FinetuneConfig(data_dir=shards, run_dir=str(run), normalization="zscore").validate()
    with pytest.raises(ConfigError, match="^flip_axes:"):
        FinetuneConfig(data_dir=shards, run_dir=str(run), flip_axes=(0, 3)).validate()
    with pytest.raises(ConfigError, match="^tissue_shift_hu:"):
        FinetuneConfig(data_dir=shards, run_dir=str(run), tissue_shift_hu=-1.0).validate()
    for bad in (dict(scale_range=(1.2, 0.9)), dict(scale_range=(0.0, 1.0)),
                dict(rotation_degrees=-1.0), dict(anisotropy=0.6), dict(elastic_voxels=-2.0)):
        with pytest.raises(ConfigError, match=f"^{next(iter(bad))}:"):
            FinetuneConfig(data_dir=shards, run_dir=str(run), **bad).validate()


def test_nnunet_sgd_is_nesterov_099_with_polynomial_decay():
    from rr_tf.optim import build_optimizer

    opt = build_optimizer("nnunet_sgd", 1e-2, 100, weight_decay=3e-5)
    assert isinstance(opt, keras.optimizers.SGD) and opt.nesterov and opt.momentum == 0.99
    sched = opt._learning_rate
    for step, want in [(0, 1e-2), (50, 1e-2 * 0.5 ** 0.9), (90, 1e-2 * 0.1 ** 0.9), (100, 0.0)]:
        assert abs(float(sched(step)) - want) < 1e-8, (step, float(sched(step)))
    with pytest.raises(ConfigError, match="^warmup_steps:"):
        build_optimizer("nnunet_sgd", 1e-2, 100, warmup_steps=10)
    with pytest.raises(ConfigError, match="^warmup_steps:"):
        FinetuneConfig(data_dir="d", run_dir="r", optimizer="nnunet_sgd", warmup_steps=5).validate()
    with pytest.raises(ConfigError, match="^optimizer:"):
        FinetuneConfig(data_dir="d", run_dir="r", optimizer="adam").validate()


def test_a_crop_far_beyond_every_volume_is_refused_before_building(shards, tmp_path):
    manifest = read_manifest(shards)
    largest = [max(c["shape"][i] for c in manifest["cases"]) for i in range(3)]
    big = (largest[0] * 3, 16, 16)
    with pytest.raises(ConfigError, match=r"^crop_size: .*largest stored volume"):
        run_finetuning(FinetuneConfig(data_dir=shards, run_dir=str(tmp_path / "big"),
                                      crop_size=big, train_steps=1, verbose=0),
                       log=lambda m: None)
    assert not (tmp_path / "big").exists()  # nothing written


def test_a_wrong_pretrained_source_names_the_flag_and_writes_nothing(shards, tmp_path):
    """--pretrained pointing at a folder that is no run, export or .keras
    file: one ConfigError naming --pretrained (not the library's init_from),
    before the run directory exists."""
    other = tmp_path / "not_a_run"
    other.mkdir()
    with pytest.raises(ConfigError, match=r"^pretrained: .*not_a_run: not a pre-training run"):
        run_finetuning(FinetuneConfig(data_dir=shards, run_dir=str(tmp_path / "ft"),
                                      pretrained=str(other), train_steps=1, verbose=0),
                       log=lambda m: None)
    assert not (tmp_path / "ft").exists()


def _finetune_two_steps(shards, jit):
    from rr_tf.data import recipes
    from rr_tf.data.pipeline import StreamConfig, view_dataset
    from rr_tf.models.segmenters import build_segmenter
    from rr_tf.training.loop import device_batches
    from rr_tf.optim import build_optimizer
    from rr_tf.training.segmentation import SegmentationTask

    keras.utils.set_random_seed(0)
    recipe = recipes.finetune_patch((16, 16, 16), spatial=recipes.finetune_augmentation((), True),
                                    tissue_shift_hu=100.0)
    ds, _ = view_dataset(shards, "train", recipe, StreamConfig(batch_size=2, crops_per_volume=2,
                                                               seed=5), labelled=True)
    assert ds.element_spec["case_id"].dtype.name == "string"  # stripped before the step
    task = SegmentationTask(build_segmenter("unet", 11, base_width=2, levels=3), 11)
    task.compile(optimizer=build_optimizer("sgd", 1e-2, 10), jit_compile=jit)
    preview = next(iter(ds))
    task.build_for(preview)
    before = [v.numpy().copy() for v in task.trainable_variables]
    history = task.fit(device_batches(ds), steps_per_epoch=1, epochs=2, verbose=0, shuffle=False)
    return history.history, before, [v.numpy() for v in task.trainable_variables]


def test_finetuning_step_compiles_under_xla_and_matches_the_plain_graph(shards):
    """What a GPU user gets by default (jit_compile=auto -> XLA): the
    fine-tuning step from the real stream (string case ids, the recipe's
    augmentation) compiles; first-step losses equal the plain graph's; the
    weight updates agree within 10 % of their size."""
    plain, w0, w_plain = _finetune_two_steps(shards, False)
    xla, w0_xla, w_xla = _finetune_two_steps(shards, True)
    for a, b in zip(w0, w0_xla):
        np.testing.assert_array_equal(a, b)
    for key in ("loss", "loss_ce"):
        assert abs(plain[key][0] - xla[key][0]) <= 1e-3 * max(1.0, abs(plain[key][0])), (key, plain, xla)
        assert all(np.isfinite(v) for v in xla[key])
    moved = np.concatenate([(b - a).ravel() for a, b in zip(w0, w_plain)])
    moved_xla = np.concatenate([(b - a).ravel() for a, b in zip(w0, w_xla)])
    assert np.linalg.norm(moved) > 0
    assert np.linalg.norm(moved - moved_xla) <= 0.1 * np.linalg.norm(moved), \
        np.linalg.norm(moved - moved_xla) / np.linalg.norm(moved)


def _saved_hybrid(path):
    from rr_tf.models.hybrid import HybridEncoder

    keras.utils.set_random_seed(11)
    enc = HybridEncoder(base_width=2, levels=2, dim=8, depth=1, heads=2, decoder_dim=8,
                        decoder_depth=1, decoder_heads=2, name="hybrid")
    enc(np.zeros((1, 16, 16, 16, 1), "float32"))
    enc.save(path)
    return {v.path: v.numpy() for v in enc.weights}


def test_load_weights_false_builds_the_pretrained_architecture_with_random_weights(shards,
                                                                                   tmp_path):
    """The architecture-matched control of a pre-trained arm: --pretrained
    with load_weights=False builds the same hybrid segmenter (same variable
    shapes) but loads nothing; with load_weights=True the encoder's
    variables are the saved ones."""
    import dataclasses

    saved = _saved_hybrid(str(tmp_path / "hybrid_encoder.keras"))
    cfg = FinetuneConfig(data_dir=shards, run_dir=str(tmp_path / "control"),
                         pretrained=str(tmp_path / "hybrid_encoder.keras"), load_weights=False,
                         num_labeled="2", train_steps=1, batch_size=2, crop_size=(16, 16, 16),
                         checkpoint_every=1, val_every=1, verbose=0, seed=1, learning_rate=0.0, export=True)
    run_finetuning(cfg, log=lambda m: None)
    run_finetuning(dataclasses.replace(cfg, run_dir=str(tmp_path / "loaded"), load_weights=True),
                   log=lambda m: None)
    state = json.load(open(tmp_path / "control" / "run.json"))
    assert state["kind"] == "hybrid" and state["load_weights"] is False
    assert not (tmp_path / "control" / "transfer.json").exists()
    assert (tmp_path / "loaded" / "transfer.json").exists()

    def cnn_kernels(run):
        from rr_tf.predict import SegmentationModel

        model = SegmentationModel.load(str(run)).model
        return {v.path: v.numpy() for v in model.weights
                if "cnn/" in v.path and v.path.endswith("kernel")}

    control, loaded = cnn_kernels(tmp_path / "control"), cnn_kernels(tmp_path / "loaded")
    assert control.keys() == loaded.keys() and control
    assert all(control[k].shape == loaded[k].shape for k in control)
    saved_cnn = {k: v for k, v in saved.items() if "cnn/" in k and k.endswith("kernel")}
    assert any(not np.array_equal(control[k], loaded[k]) for k in control)
    # at learning rate 0 the loaded run keeps the saved kernels exactly
    matched = [k for k in loaded if any(np.array_equal(loaded[k], v) for v in saved_cnn.values())]
    assert len(matched) == len(loaded), (sorted(loaded), sorted(saved_cnn))
    assert not any(any(np.array_equal(control[k], v) for v in saved_cnn.values())
                   for k in control)


def test_load_weights_false_needs_pretrained(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"^load_weights: "):
        run_finetuning(FinetuneConfig(data_dir=shards, run_dir=str(tmp_path / "ft"),
                                      load_weights=False, train_steps=1, verbose=0),
                       log=lambda m: None)
    assert not (tmp_path / "ft").exists()


# ------------------------------------------------------------ deep supervision
def test_deep_supervision_loss_is_the_weighted_sum_over_strides_and_trains_every_head():
    import tensorflow as tf

    from rr_tf import losses
    from rr_tf.models.segmenters import build_segmenter
    from rr_tf.optim import build_optimizer
    from rr_tf.training.segmentation import SegmentationTask, deep_supervision_weights

    assert deep_supervision_weights(0) == [1.0]
    np.testing.assert_allclose(deep_supervision_weights(2), [4 / 7, 2 / 7, 1 / 7])
    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(0)
    image = rng.random((2, 16, 16, 16, 1), dtype=np.float32)
    label = rng.integers(0, 4, (2, 16, 16, 16, 1)).astype("int32")
    seg = build_segmenter("unet", 4, base_width=2, levels=4, deep_supervision=2)
    task = SegmentationTask(seg, 4)
    task.compile(optimizer=build_optimizer("sgd", 1e-2, 10), jit_compile=False)
    task.build_for({"image": image, "label": label})
    # by hand: stride-s outputs against the label subsampled at every s-th voxel
    outs = seg.deep_outputs(image, training=True)
    want = sum(w * float(losses.dice_ce_loss(o, label[:, ::s, ::s, ::s], 4))
               for w, o, s in zip([4 / 7, 2 / 7, 1 / 7], outs, (1, 2, 4)))
    with tf.GradientTape() as tape:
        loss, logits = task.supervised(image, label)
    assert abs(float(loss) - want) < 1e-5 * max(1.0, want)
    assert tuple(logits.shape) == (2, 16, 16, 16, 4)
    grads = dict(zip([v.path for v in seg.trainable_variables],
                     tape.gradient(loss, seg.trainable_variables)))
    for k in (1, 2):
        g = [g for p, g in grads.items() if f"ds_head{k}" in p]
        assert g and all(x is not None and float(tf.reduce_max(tf.abs(x))) > 0 for x in g), k
    # the same step compiles under XLA (what a GPU user gets) and gives the same loss
    xla = SegmentationTask(seg, 4)
    xla.compile(optimizer=build_optimizer("sgd", 0.0, 10), jit_compile=True)
    step = tf.function(lambda i, lab: xla.supervised(i, lab)[0], jit_compile=True)
    assert abs(float(step(image, label)) - float(task.supervised(image, label)[0])) < 1e-4


def test_finetune_with_deep_supervision_exports_a_main_head_segmenter(shards, tmp_path):
    run = tmp_path / "ft_ds"
    cfg = FinetuneConfig(data_dir=shards, run_dir=str(run), num_labeled="2",
                         segmenter_args={"base_width": 2, "levels": 3, "deep_supervision": 1},
                         train_steps=2, batch_size=2, crop_size=(16, 16, 16), checkpoint_every=2,
                         val_every=2, verbose=0, seed=1, export=True)
    metrics = run_finetuning(cfg, log=lambda m: None)
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
    assert json.load(open(run / "run.json"))["segmenter_args"]["deep_supervision"] == 1
    model = SegmentationModel.load(str(run))
    volume = Volume(np.zeros((20, 20, 20), np.float32), np.eye(4))
    labels, _ = model.segment(volume)
    assert labels.shape == (20, 20, 20)
    # a segmenter without the heads refuses it by name, before the run directory exists
    with pytest.raises(ConfigError, match="deep_supervision"):
        run_finetuning(FinetuneConfig(data_dir=shards, run_dir=str(tmp_path / "bad"),
                                      segmenter="hybrid",
                                      segmenter_args={"base_width": 2, "deep_supervision": 1},
                                      train_steps=1, verbose=0), log=lambda m: None)
    assert not (tmp_path / "bad").exists()
