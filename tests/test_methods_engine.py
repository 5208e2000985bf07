"""Every registered method through the pre-training engine, as its demo
flagfile configures it (shrunk): trains, resumes with a longer schedule,
exports parts that reload, and its transfer parts feed a segmenter."""

import dataclasses
import json
import os

import numpy as np
import pytest

from rr_tf.data.prepare import PrepareConfig, prepare
from rr_tf.data.spec import PreprocessSpec
from rr_tf.methods import method_names
from rr_tf.training.pretrain import PretrainConfig, run_pretraining
from method_harness import demo_config, phantom_shards, wait_for_checkpoint
from subproc import run_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods") / "shards"
    phantom_shards(out, 2, (64, 64, 64), (4.0, 4.0, 4.0))
    return str(out)


def _tiny(name):
    # PCRLv2's mid_decay_steps: resolved from the run when driven by the engine
    return demo_config(name, mid_decay_steps=10)


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
    from rr_tf.runs import source_parts

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


@pytest.mark.slow  # about 1-2 min per method on 2 cores; run with -m slow
@pytest.mark.parametrize("name", method_names())
def test_method_resumes_after_sigkill(name, shards, tmp_path):
    """launch/pretrain.py from the method's demo flagfile (shrunk), killed
    with SIGKILL after its first checkpoint, then the same command again:
    it resumes from a checkpoint and finishes."""
    import signal
    import subprocess
    import sys
    import time

    cls, config, crop = _tiny(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    demo = "demo.flags" if name == "reprec" else f"demo_{name}.flags"
    run_dir = tmp_path / "run"
    # long enough that the kill lands before the end: at tiny size Genesis, MAE and the
    # multi-task method ran 8 steps in under the 1 s slept below and had finished
    STEPS = 60
    cmd = [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), f"--flagfile=configs/{demo}",
           f"--data_dir={shards}", f"--run_dir={run_dir}", "--prepare_phantom_if_missing=0",
           f"--crop_size={','.join(map(str, crop))}", "--batch_size=2", "--crops_per_volume=2",
           f"--train_steps={STEPS}", "--warmup_steps=0", "--checkpoint_every=2",
           "--image_every=20",
           "--verbose=none", "--noexport"]
    cmd += [f"--{k}={v}" for k, v in (("base_width", 2), ("queue_size", 8), ("key_bn_groups", 1))
            if k in fields]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, run_dir, 2, 600)
    time.sleep(1.0)  # inside a later step (or a later save)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.load(open(run_dir / "run.json"))["finished"]
    res = run_logged(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming at step" in res.stderr, res.stderr[-2000:]
    resumed = int(res.stderr.split("resuming at step ")[1].split()[0])
    assert resumed >= 2 and resumed % 2 == 0
    state = json.load(open(run_dir / "run.json"))
    assert state["finished"] and state["last_step"] == STEPS
    assert np.isfinite(json.load(open(run_dir / "metrics.json"))["loss"])


# ---------------------------------------------------------------------------
# XLA: what a GPU user gets by default (jit_compile=auto turns it on for one GPU / TPU)

# PCRL and PCRLv2 take 1-2 min each to compile on 2 CPU cores: slow-marked
_XLA_SLOW = {"pcrl", "pcrlv2"}
STEPS = 2


@pytest.fixture(scope="module")
def full_size_shards(tmp_path_factory):
    """4 phantoms at the default 128^3 shape, stored at 4 mm (~96^3 voxels):
    the crops hold body, as in real use (the 64^3 fixture's 32^3 crops are
    mostly padding, where the normalised embeddings of near-constant inputs
    are ill-conditioned and XLA's reassociation alone moves MoCo's loss)."""
    out = tmp_path_factory.mktemp("xla") / "shards"
    prepare(PrepareConfig(source="phantom", output_dir=str(out), num_cases=4,
                          spec=PreprocessSpec(spacing=(4.0, 4.0, 4.0)), workers=1,
                          progress=False, val_fraction=0.0), log=lambda m: None)
    return str(out)


def _two_steps(cls, config, crop, shards, jit):
    import keras

    from rr_tf.data.pipeline import StreamConfig, view_dataset
    from rr_tf.training.loop import device_batches
    from rr_tf.optim import build_optimizer

    keras.utils.set_random_seed(0)  # before the stream: its reshuffling draws from the global seed
    dataset, _ = view_dataset(shards, "train", cls.recipe(config, crop),
                              StreamConfig(batch_size=2, crops_per_volume=2, seed=5))
    preview = next(iter(dataset))
    assert preview["case_id"].dtype.name == "string"  # the stream carries strings; the step must not
    method = cls(config, seed=0)
    # SGD: its update is proportional to the gradient, so it compares gradients; Adam's first
    # step is about lr * sign(g) and flips wherever a gradient is near 0 in either run
    method.compile(optimizer=build_optimizer("sgd", 1e-2, 10), jit_compile=jit)
    method.build_for(preview)
    before = [v.numpy().copy() for v in method.trainable_variables]
    logs = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None, _out=logs):
            _out.append({k: float(v) for k, v in logs.items()})

    method.fit(device_batches(dataset), epochs=1, steps_per_epoch=STEPS, verbose=0,
               callbacks=[Record()])
    after = [v.numpy() for v in method.trainable_variables]
    return logs, before, after


# Under XLA the first step's *gradients* of these methods differ from the plain
# graph's by 25-55 % in norm, mostly in the first encoder stages' kernels and
# normalisation parameters, while their losses agree to 1e-5: float32 rounding
# of a nearly cancelling sum (normalisation after every conv, near-constant CT
# input), which both graphs carry; XLA's is no larger (tests/test_models.py::
# test_xla_gradient_is_as_close_to_float64_as_the_plain_graphs, docs/gpu.md).
# The update check is limited to the methods where the two roundings happen to
# agree. The losses of every method agree since the step's random draws
# (masks, key shuffles, mixup, decoder stages) come from rr_tf.models.rng:
# TensorFlow's stateless ops drew other numbers under XLA (RepRec's recovery
# loss was 2-4 % apart, PCRL's 1 %, PCRLv2's beyond 1e-3).
_XLA_UPDATE_DIFFERS = {"reprec", "moco", "simclr", "pgl", "pcrl", "pcrlv2", "mae"}
_XLA_LOSS_TOL = {}


def _xla_marks(name):
    return [pytest.mark.slow] if name in _XLA_SLOW else []


@pytest.mark.parametrize("name", [pytest.param(n, marks=_xla_marks(n)) for n in method_names()])
def test_method_step_compiles_under_xla_and_matches_the_plain_graph(name, full_size_shards):
    """Two SGD steps with jit_compile=True from the real (string-carrying)
    stream compile and run: the first step's losses (same weights, same
    batch, same random draws) equal the plain graph's within 1e-3 relative,
    both steps are finite and the weights move. Where it holds (see
    _XLA_UPDATE_DIFFERS), the weight updates also agree to 10 % of their size
    (float32 reassociation amplified by BatchNorm over 2 samples in these
    2-channel nets; a wrong graph or random draw is far outside it)."""
    cls, config, crop = _tiny(name)
    plain_logs, w0, plain = _two_steps(cls, config, crop, full_size_shards, jit=False)
    xla_logs, w0_xla, xla = _two_steps(cls, config, crop, full_size_shards, jit=True)
    for a, b in zip(w0, w0_xla):
        np.testing.assert_array_equal(a, b)  # same initialisation
    assert len(plain_logs) == len(xla_logs) == STEPS
    tol = _XLA_LOSS_TOL.get(name, 1e-3)
    for key, value in plain_logs[0].items():
        if "loss" in key:
            got = xla_logs[0][key]
            assert abs(value - got) <= tol * max(1.0, abs(value)), (key, value, got)
    assert all(np.isfinite(v) for logs in xla_logs for v in logs.values()), xla_logs
    moved = np.concatenate([(b - a).ravel() for a, b in zip(w0, plain)])
    moved_xla = np.concatenate([(b - a).ravel() for a, b in zip(w0, xla)])
    assert np.linalg.norm(moved) > 0 and np.linalg.norm(moved_xla) > 0
    if name not in _XLA_UPDATE_DIFFERS:
        assert np.linalg.norm(moved - moved_xla) <= 0.1 * np.linalg.norm(moved), \
            np.linalg.norm(moved - moved_xla) / np.linalg.norm(moved)
