"""Every registered method through the pre-training engine, as its demo
flagfile configures it (shrunk): trains, resumes with a longer schedule,
exports parts that reload, and its transfer parts feed a segmenter."""

import dataclasses
import json
import os

import numpy as np
import pytest

from launch.flagutil import flagfile_config
from rr_tf.data.prepare import PrepareConfig, prepare
from rr_tf.data.spec import PreprocessSpec
from rr_tf.methods import get_method, method_names
from rr_tf.training.pretrain import PretrainConfig, run_pretraining

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods") / "shards"
    prepare(PrepareConfig(source="phantom", output_dir=str(out), num_cases=2,
                          phantom_shape=(64, 64, 64), spec=PreprocessSpec(spacing=(4.0, 4.0, 4.0)),
                          workers=1, progress=False, val_fraction=0.0), log=lambda m: None)
    return str(out)


def _tiny(name):
    cls = get_method(name)
    demo = "demo.flags" if name == "reprec" else f"demo_{name}.flags"
    values, crop = flagfile_config(os.path.join(ROOT, "configs", demo), cls.Config)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    if "base_width" in fields:
        values["base_width"] = 2
    if "queue_size" in fields:
        values["queue_size"] = 8
    if "key_bn_groups" in fields:
        values["key_bn_groups"] = 1  # batch 2: one BatchNorm group of keys
    crop = (32, 32, crop[2] if crop[2] < 16 else 32)  # multitask: X, Y, slices
    return cls, cls.Config(**values), crop


def test_every_method_has_both_flagfiles():
    for name in method_names():
        assert os.path.exists(os.path.join(ROOT, "configs", f"{name}.flags")), name
        demo = "demo.flags" if name == "reprec" else f"demo_{name}.flags"
        text = open(os.path.join(ROOT, "configs", demo)).read()
        assert f"--flagfile=configs/{name}.flags" in text or name in text, name


@pytest.mark.slow  # about 1-3 min per method on 2 cores; run with -m slow
@pytest.mark.parametrize("name", method_names())
def test_method_trains_resumes_and_exports(name, shards, tmp_path):
    import keras

    import rr_tf.models  # noqa: F401
    from rr_tf.transfer import source_parts

    cls, config, crop = _tiny(name)
    run = PretrainConfig(method=name, data_dir=shards, run_dir=str(tmp_path / "run"),
                         method_config=config, train_steps=2, batch_size=2, crop_size=crop,
                         crops_per_volume=2, checkpoint_every=2, verbose=0, export=False,
                         optimizer="adamw", learning_rate=1e-3)
    first = run_pretraining(run, log=lambda m: None)
    assert first["step"] == 2 and np.isfinite(first["loss"]), first
    lines = []
    second = run_pretraining(dataclasses.replace(run, train_steps=3, export=True), log=lines.append)
    assert second["step"] == 3 and any("resuming at step 2" in m for m in lines), lines
    info = json.load(open(tmp_path / "run" / "export" / "parts.json"))
    for part, entry in info.items():
        if isinstance(entry, dict):
            keras.saving.load_model(tmp_path / "run" / "export" / entry["keras"])
    # what fine-tuning and HPT load: the run directory's parts, with weights
    parts, spec = source_parts(str(tmp_path / "run"))
    assert parts and spec is not None
    assert all(p in ("unet", "hybrid", "vit", "unet2d") for p in parts), parts
