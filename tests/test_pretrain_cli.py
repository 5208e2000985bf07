"""launch/pretrain.py as a user runs it: SIGKILL mid-run, resume with the same
command, refuse a finished run, load the export in a fresh process."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rr_tf.data.prepare import PrepareConfig, prepare
from rr_tf.data.spec import PreprocessSpec
from method_harness import wait_for_checkpoint
from subproc import run_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms") / "shards"
    prepare(PrepareConfig(source="phantom", output_dir=str(out), num_cases=3, phantom_shape=(64, 64, 64),
                          spec=PreprocessSpec(spacing=None), workers=1, progress=False,
                          val_fraction=0.0), log=lambda m: None)
    return str(out)


def _cmd(data_dir, run_dir, *extra):
    return [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--method=reprec",
            f"--data_dir={data_dir}", f"--run_dir={run_dir}", "--base_width=2", "--crop_size=32,32,32",
            "--batch_size=2", "--crops_per_volume=2", "--queue_size=8", "--proj_dim=8",
            "--transformer_dim=16", "--transformer_depth=1", "--transformer_heads=2",
            "--decoder_dim=8", "--decoder_depth=1", "--key_bn_groups=1", "--train_steps=12", "--checkpoint_every=3",
            "--image_every=6", "--verbose=none", "--jit_compile=false", *extra]


def test_sigkill_resume_finish_and_export(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cmd(data_dir, run_dir), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, run_dir, 3, 300)
    time.sleep(1.0)  # somewhere inside a later step (or a later save)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.load(open(run_dir / "run.json"))
    assert not state["finished"]

    res = run_logged(_cmd(data_dir, run_dir), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming at step" in res.stderr
    resumed = int(res.stderr.split("resuming at step ")[1].split()[0])
    assert resumed >= 3 and resumed % 3 == 0
    state = json.load(open(run_dir / "run.json"))
    assert state["finished"] and state["last_step"] == 12
    metrics = json.load(open(run_dir / "metrics.json"))
    assert metrics["step"] == 12 and np.isfinite(metrics["loss"])
    flags_txt = (run_dir / "flags.txt").read_text()
    assert flags_txt.count("--train_steps=12") == 1 and "overwrite" not in flags_txt
    # the method's hyper-parameters are recorded too (those given; the rest are its defaults)
    assert "--transformer_dim=16\n" in flags_txt and "--key_bn_groups=1\n" in flags_txt
    assert "--mask_ratio" not in flags_txt
    assert any(f.startswith("events.out") for f in os.listdir(run_dir / "tensorboard" / "images"))

    # the same command on a finished run is refused with one line
    res = run_logged(_cmd(data_dir, run_dir), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "finished run" in res.stderr and "Traceback" not in res.stderr
    # a crop far beyond every stored volume (64^3 here) is one line, before any run file
    res = run_logged(_cmd(data_dir, tmp_path / "huge", "--crop_size=512,512,512"), env=ENV,
                     capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "crop_size: 512x512x512" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not (tmp_path / "huge").exists()

    # export: .keras in this process vs SavedModel in a fresh one, at another size
    import keras
    import rr_tf.models  # noqa: F401  (registers the classes)
    import rr_tf.models.parts  # noqa: F401

    x = np.random.default_rng(0).uniform(size=(1, 48, 32, 64, 1)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    script = (
        "import json, sys, numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({str(run_dir / 'export' / 'hybrid_encoder')!r})\n"
        f"x = tf.constant(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "serve = m.signatures['serving_default']\n"
        "out = serve(volume=x)\n"
        "xla = tf.function(lambda v: serve(volume=v), jit_compile=True)(x)\n"
        f"np.savez({str(tmp_path / 'y.npz')!r}, **{{k: v.numpy() for k, v in out.items()}})\n"
        f"np.savez({str(tmp_path / 'yx.npz')!r}, **{{k: v.numpy() for k, v in xla.items()}})\n"
        "print(json.dumps({'spec_hash': m.spec_hash.numpy().decode()}))\n")
    res = run_logged([sys.executable, "-c", script], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    served = np.load(tmp_path / "y.npz")
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    assert json.loads(res.stdout.strip().splitlines()[-1])["spec_hash"] == manifest["spec_hash"]
    model = keras.models.load_model(run_dir / "export" / "hybrid_encoder.keras")
    direct = model(x)
    assert served["transformer_stride_16"].shape == (1, 3, 2, 4, 16)
    compiled = np.load(tmp_path / "yx.npz")  # the signature under XLA
    for key, value in direct.items():
        np.testing.assert_allclose(served[key], np.asarray(value), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(compiled[key], np.asarray(value), rtol=1e-3, atol=1e-3)

    # launch/export.py rebuilds the method from the run directory and exports again
    res = run_logged([sys.executable, os.path.join(ROOT, "launch", "export.py"),
                          f"--run_dir={run_dir}", f"--output={tmp_path / 'exp2'}"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    again = keras.models.load_model(tmp_path / "exp2" / "hybrid_encoder.keras")
    for key, value in again(x).items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(direct[key]), rtol=1e-5, atol=1e-5)

    # HPT: a new run starts from this run's encoder
    res = run_logged(_cmd(data_dir, tmp_path / "hpt", f"--init_from={run_dir}",
                              "--train_steps=3", "--noexport"),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "init_from" in res.stderr and "variables loaded from" in res.stderr
    report = json.load(open(tmp_path / "hpt" / "init_from.json"))
    assert set(report["parts"]) == {"hybrid", "unet"} and not report["shape_mismatch"]
    assert any(k.startswith("hybrid/cnn/enc1/") for k in report["matched"])


def test_same_command_same_seed_gives_bit_identical_weights(data_dir, tmp_path):
    """Determinism on CPU: data order, crops, augmentation, masks, key
    groups and initialisation all derive from --seed (and the step)."""
    import tensorflow as tf

    weights = []
    for name in ("a", "b"):
        res = run_logged(_cmd(data_dir, tmp_path / name, "--train_steps=2",
                                  "--checkpoint_every=2", "--export=false"),
                             env=ENV, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(tmp_path / name / "checkpoints"))
        weights.append({k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                        if "OPTIMIZER_SLOT" not in k and "save_counter" not in k})
    assert len(weights[0]) > 100 and weights[0].keys() == weights[1].keys()
    moved = 0
    for key, value in weights[0].items():
        np.testing.assert_array_equal(value, weights[1][key], err_msg=key)
    # a different seed gives different weights (the comparison can fail)
    res = run_logged(_cmd(data_dir, tmp_path / "c", "--train_steps=2", "--checkpoint_every=2",
                              "--export=false", "--seed=1"),
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(tmp_path / "c" / "checkpoints"))
    for key, value in weights[0].items():
        other = reader.get_tensor(key)
        if np.asarray(value).dtype.kind == "f" and not np.array_equal(value, other):
            moved += 1
    assert moved > 10


def test_bad_flag_values_are_named_before_data_or_run_files(tmp_path):
    """The demo's warm-up (20 steps) with --train_steps=3: one line, before
    the phantom shards are generated or the run directory is made."""
    res = run_logged([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"),
                      "--flagfile=configs/demo.flags", "--train_steps=3",
                      f"--data_dir={tmp_path / 'data'}", f"--run_dir={tmp_path / 'run'}"],
                     env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "warmup_steps: (20) must be smaller than train_steps (3)" \
        in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
