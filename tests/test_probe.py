"""The frozen-feature probe (rr_tf.training.probe): it separates classes
that the features encode linearly and not random ones, its callback writes
its scalars, it runs on every method's transferable encoder and inside a
tiny pre-training."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from rr_tf.training import probe as pr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blobs(n, shape, k, seed):
    """[n, *shape] labels: k-1 random boxes of organ classes on background."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n,) + shape, np.int32)
    for i in range(n):
        for c in range(1, k):
            s = [rng.integers(0, d // 2) for d in shape]
            y[i, s[0]:s[0] + shape[0] // 3, s[1]:s[1] + shape[1] // 3, s[2]:s[2] + shape[2] // 3] = c
    return y


def test_probe_separates_linearly_encoded_classes_and_not_random_features():
    k, shape = 3, (16, 16, 16)
    ty, vy = _blobs(4, shape, k, 0).reshape(-1), _blobs(4, shape, k, 1).reshape(-1)
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(k, 12))  # classes -> 12 channels, linearly, plus noise

    def feats(y):
        return np.eye(k)[y] @ mix + 0.1 * rng.normal(size=(len(y), 12))

    good = pr.linear_probe(feats(ty), ty, feats(vy), vy, k)
    assert good["mean_dice"] > 0.95 and good["accuracy"] > 0.95, good
    bad = pr.linear_probe(rng.normal(size=(len(ty), 12)), ty, rng.normal(size=(len(vy), 12)), vy, k)
    assert bad["mean_dice"] < 0.5, bad
    assert set(good["dice"]) == {1, 2}


def test_grid_helpers_pool_repeat_and_sample_centres():
    x = tf.reshape(tf.range(2 * 8 * 4 * 2, dtype=tf.float32), (1, 8, 4, 2, 2))
    out = pr.to_grid(x, (4, 4, 4))
    assert out.shape == (1, 4, 4, 4, 2)
    np.testing.assert_allclose(out[0, 0, 0, 0], tf.reduce_mean(x[0, :2, 0, 0], 0))  # pooled D
    np.testing.assert_allclose(out[0, 0, 0, 1], out[0, 0, 0, 0])                    # repeated W
    labels = np.arange(8 ** 3).reshape(1, 8, 8, 8)
    assert pr.grid_labels(labels, 4)[0, 1, 0, 0] == labels[0, 6, 2, 2]
    assert pr.patch_size_for((48, 48, 3)) == (48, 48, 16)


def test_plan_skips_without_labels_and_holds_out_other_cases():
    case = lambda i, split, lab: {"case_id": f"c{i}", "split": split, "has_label": lab}  # noqa: E731
    assert pr.probe_plan({"cases": [case(0, "train", False)]})[2] == "the shards have no labels"
    assert "1 labelled case" in pr.probe_plan({"cases": [case(0, "train", True)]})[2]
    fit, held, why = pr.probe_plan({"cases": [case(i, "train", True) for i in range(4)]})
    assert why is None and not set(fit) & set(held) and len(fit) == len(held) == 2
    fit, held, _ = pr.probe_plan({"cases": [case(0, "train", True), case(1, "val", True)]})
    assert (fit, held) == (["c0"], ["c1"])


class _Tiny(keras.Model):
    """A stand-in method: one conv as its "encoder", exported as a dict."""

    def __init__(self):
        super().__init__(name="tiny")
        self.conv = keras.layers.Conv3D(3, 3, padding="same")
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def export_parts(self):
        conv = self.conv

        class Part:
            def transfer_parts(self):
                return {"unet": conv}

            def __call__(self, x, training=False):
                return {"stride_1": conv(x)}

        return {"cnn_encoder": Part()}


def _probe(config, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(2, 16, 16, 16, 1)).astype("float32")
    labels = _blobs(2, (16, 16, 16), 3, seed)
    return pr.LinearProbe((images, labels), (images + 0.01, labels), 3, config,
                          {1: "liver", 2: "spleen"})


def test_callback_writes_scalars_json_and_metrics(tmp_path):
    model = _Tiny()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model(np.zeros((1, 16, 16, 16, 1), "float32"))
    model.conv(np.zeros((1, 16, 16, 16, 1), "float32"))
    probe = _probe(pr.ProbeConfig(every=2))
    cb = pr.ProbeCallback(probe, 2, str(tmp_path / "tb"), str(tmp_path / "probe.json"), log=lambda m: None)
    x = np.random.default_rng(0).uniform(size=(4, 16, 16, 16, 1)).astype("float32")
    model.fit(x, np.zeros((4, 16, 16, 16, 1), "float32"), batch_size=1, epochs=1, steps_per_epoch=3,
              callbacks=[cb], verbose=0)
    steps = [r["step"] for r in json.load(open(tmp_path / "probe.json"))]
    assert steps == [0, 2, 3]  # baseline, every 2 steps, the end
    tags = set()
    for path in tf.io.gfile.glob(str(tmp_path / "tb" / "*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags |= {v.tag for v in event.summary.value}
    assert {"probe/mean_dice", "probe/accuracy", "probe/seconds", "probe/dice_liver",
            "probe/dice_spleen"} <= tags, tags
    last = cb.last()
    assert last["probe_step"] == 3 and 0 <= last["probe_mean_dice"] <= 1


def _tiny_method(name):
    from method_harness import demo_config

    return demo_config(name)


@pytest.mark.parametrize("name", ["reprec", "mae", "multitask", "genesis", "pcrl", "pcrlv2",
                                  "pgl", "moco", "simclr"])
def test_probe_runs_on_every_methods_transferable_encoder(name):
    from rr_tf import optim

    cls, config, crop = _tiny_method(name)
    method = cls(config, seed=0)
    method.compile(optimizer=optim.build_optimizer("adamw", 1e-3, 2), jit_compile=False)
    method.build_for(cls.example_batch(crop))
    patch = pr.patch_size_for(crop)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2,) + patch + (1,)).astype("float32")
    labels = _blobs(2, patch, 3, 0)
    probe = pr.LinearProbe((images, labels), (images, labels), 3, pr.ProbeConfig(every=1))
    result = probe.evaluate(method)
    assert np.isfinite(result["mean_dice"]) and result["feature_channels"] > 0, result


@pytest.mark.slow  # about 30 s on 2 cores (phantom shards + a 2-step run); run with -m slow
def test_tiny_pretraining_with_probe_logs_it(tmp_path):
    from rr_tf.data.prepare import PrepareConfig, prepare
    from rr_tf.data.spec import PreprocessSpec
    from rr_tf.training.pretrain import PretrainConfig, run_pretraining

    data = str(tmp_path / "shards")
    prepare(PrepareConfig(source="phantom", output_dir=data, num_cases=2, phantom_shape=(48, 48, 48),
                          spec=PreprocessSpec(spacing=(6.0, 6.0, 6.0)), workers=1, progress=False,
                          val_fraction=0.0), log=lambda m: None)
    _, config, _ = _tiny_method("moco")
    lines = []
    run = PretrainConfig(method="moco", data_dir=data, run_dir=str(tmp_path / "run"),
                         method_config=config, train_steps=2, batch_size=2, crop_size=(16, 16, 16),
                         crops_per_volume=2, checkpoint_every=2, verbose=0, export=False,
                         probe_every=2, probe_patches=2)
    metrics = run_pretraining(run, log=lines.append)
    assert metrics["probe_step"] == 2 and 0 <= metrics["probe_mean_dice"] <= 1, metrics
    assert [r["step"] for r in json.load(open(tmp_path / "run" / "probe.json"))] == [0, 2]
    assert any(m.startswith("probe: every 2 steps") for m in lines), lines
    assert json.load(open(tmp_path / "run" / "metrics.json"))["probe_step"] == 2
