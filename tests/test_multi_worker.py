"""Multi-worker training on loopback (launch/local_workers.py): 2 worker
processes x 1 CPU device train like 1 process with 2 logical CPU devices,
only the chief writes the run directory, a killed worker stops the job with
one line naming it and the same command then resumes.

The training checks start TensorFlow in 3 processes (about 6 s each to
import, plus the first step's tracing), so they use a width-2 MoCo on 32^3
crops of 64^3 phantoms with SGD (updates are the gradients themselves)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from subproc import run_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch import local_workers  # noqa: E402
from rr_tf.errors import ConfigError  # noqa: E402
from rr_tf.training.strategy import worker_role  # noqa: E402


def _env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, **extra)


# ---------------------------------------------------------------- no TensorFlow run


def test_worker_role_follows_tensorflows_chief_rule():
    def role(cluster, task):
        return worker_role("multi_worker", {"TF_CONFIG": json.dumps({"cluster": cluster,
                                                                     "task": task})})

    workers = {"worker": ["h:1", "h:2"]}
    assert role(workers, {"type": "worker", "index": 0}) == ("worker", 0, True)
    assert role(workers, {"type": "worker", "index": 1}) == ("worker", 1, False)
    with_chief = dict(workers, chief=["h:0"])
    assert role(with_chief, {"type": "chief", "index": 0})[2]
    assert not role(with_chief, {"type": "worker", "index": 0})[2]
    assert worker_role("mirrored", {}) == ("", 0, True)
    for bad in ("{not json", json.dumps({"cluster": workers, "task": {"type": "ps", "index": 0}}),
                json.dumps({"cluster": workers, "task": {"type": "worker", "index": 5}})):
        with pytest.raises(ConfigError, match="TF_CONFIG"):
            worker_role("multi_worker", {"TF_CONFIG": bad})


def test_local_workers_gives_each_worker_its_task_on_distinct_ports():
    ports = local_workers.free_ports(3)
    assert len(set(ports)) == 3
    configs = [json.loads(c) for c in local_workers.tf_configs(ports)]
    assert [c["task"]["index"] for c in configs] == [0, 1, 2]
    assert all(c["cluster"]["worker"] == [f"127.0.0.1:{p}" for p in ports] for c in configs)
    cmd = local_workers.worker_command(["launch/pretrain.py", "--strategy=default"])
    assert cmd[0] == sys.executable and cmd[-1] == "--strategy=multi_worker"


# a worker that fails (status 3, or SIGKILL) while the others would run for a minute
_FAILING = ("import json, os, signal, sys, time; i = json.loads(os.environ['TF_CONFIG'])"
            "['task']['index']; print('hello from', i, flush=True); time.sleep(0.5)\n"
            "if i == 1: {}\ntime.sleep(60)")


@pytest.mark.parametrize("action, status, words", [
    ("sys.exit(3)", 3, "exited with status 3"),
    ("os.kill(os.getpid(), signal.SIGKILL)", 2, "was killed by SIGKILL")])
def test_a_failing_worker_stops_the_job_with_one_line_naming_it(action, status, words):
    start = time.monotonic()
    res = subprocess.run([sys.executable, "launch/local_workers.py", "--workers=3",
                          "--grace_seconds=5", "--noadd_strategy_flag", "--", sys.executable,
                          "-c", _FAILING.format(action)],
                         cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=120)
    assert time.monotonic() - start < 30, "the other workers were not stopped"
    assert res.returncode == status, res.stderr
    assert re.search(rf"error: worker 1 \(pid \d+\) {words}; stopped the other", res.stderr)
    assert "[w0] hello from 0" in res.stdout and "[w2] hello from 2" in res.stdout


def test_local_workers_refuses_a_missing_command():
    res = subprocess.run([sys.executable, "launch/local_workers.py", "--workers=2"], cwd=ROOT,
                         capture_output=True, text=True, env=_env(), timeout=60)
    assert res.returncode == 2 and "no command" in res.stderr
    res = subprocess.run([sys.executable, "launch/local_workers.py", "--workers=0", "--", "x.py"],
                         cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=60)
    assert res.returncode == 2 and "workers" in res.stderr


# ---------------------------------------------------------------- training

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from rr_tf.data.prepare import PrepareConfig, prepare
    from rr_tf.data.spec import PreprocessSpec

    out = tmp_path_factory.mktemp("phantoms") / "shards"
    prepare(PrepareConfig(source="phantom", output_dir=str(out), num_cases=3,
                          phantom_shape=(64, 64, 64), spec=PreprocessSpec(spacing=None), workers=1,
                          progress=False, val_fraction=0.0), log=lambda m: None)
    return str(out)


def _flags(data_dir, run_dir, steps, every):
    return ["launch/pretrain.py", "--method=moco", f"--data_dir={data_dir}", f"--run_dir={run_dir}",
            "--base_width=2", "--crop_size=32,32,32", "--batch_size=4", "--crops_per_volume=2",
            "--proj_dim=8", "--proj_hidden_dim=8", "--queue_size=16", "--momentum=0.9",
            "--optimizer=sgd", "--learning_rate=0.01", "--weight_decay=0", "--warmup_steps=0",
            f"--train_steps={steps}", f"--checkpoint_every={every}", "--probe_every=0",
            "--export=false", "--jit_compile=false", "--verbose=line", "--log_every=1"]


# one process, 2 logical CPU devices, MirroredStrategy: the reference
_TWO_DEVICES = r'''
import runpy, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def _weights(run_dir, step):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(run_dir, "checkpoints", f"ckpt-{step}"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith("model")}


def test_two_workers_train_like_two_devices_and_only_the_chief_writes(data_dir, tmp_path):
    """3 SGD steps of MoCo (queue keys gathered across replicas, EMA): the
    weights of 2 workers x 1 device equal those of 1 process x 2 devices
    within 1e-5 (float32 summation order; measured: bit-identical)."""
    ref = run_logged([sys.executable, "-c", _TWO_DEVICES] + _flags(data_dir, tmp_path / "ref", 3, 3)
                     + ["--strategy=mirrored"], cwd=ROOT, capture_output=True, text=True,
                     env=_env(), timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "2 replica(s)" in ref.stderr
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run = tmp_path / "mw"
    res = run_logged([sys.executable, "launch/local_workers.py", "--workers=2", "--"]
                     + _flags(data_dir, run, 3, 3), cwd=ROOT, capture_output=True, text=True,
                     env=_env(TMPDIR=str(scratch)), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[w0] moco: new run" in res.stderr and "2 replica(s)" in res.stderr
    assert "[w1] moco: new run" in res.stderr and "this worker's copies go to" in res.stderr
    assert re.search(r"\[w0\] .*loss", res.stdout) and not re.search(r"\[w1\] .*loss", res.stdout)
    one, two = _weights(tmp_path / "ref", 3), _weights(run, 3)
    assert len(one) > 50 and one.keys() == two.keys()
    diff = max(float(np.max(np.abs(one[k] - two[k]))) for k in one)
    assert diff < 1e-5, diff
    # the chief's run directory is complete; the other worker left nothing behind
    assert json.loads((run / "run.json").read_text())["finished"]
    assert (run / "metrics.json").exists() and (run / "flags.txt").exists()
    assert os.listdir(run / "tensorboard")
    assert os.listdir(scratch) == []


def _start(cmd, env):
    """Popen with stderr collected line by line in a list (read live)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")),
                              daemon=True)
    reader.start()
    return proc, lines, reader


@pytest.mark.slow
def test_a_killed_worker_stops_the_job_and_the_same_command_resumes(data_dir, tmp_path):
    run = tmp_path / "run"
    cmd = ([sys.executable, "launch/local_workers.py", "--workers=2", "--grace_seconds=5", "--"]
           + _flags(data_dir, run, 40, 2))
    proc, lines, reader = _start(cmd, _env())
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "ckpt-2.index").exists():
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        pid = int(re.search(r"worker 1: pid (\d+)", "".join(lines)).group(1))
        os.kill(pid, signal.SIGKILL)
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    text = "".join(lines)
    assert status == 2, text[-3000:]
    assert f"error: worker 1 (pid {pid}) was killed by SIGKILL" in text
    stopped_at = json.loads((run / "run.json").read_text())["last_step"]
    assert 2 <= stopped_at < 40
    res = run_logged(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = int(re.search(r"\[w0\] moco: resuming at step (\d+)", res.stderr).group(1))
    assert resumed >= stopped_at
    assert f"[w1] moco: resuming at step {resumed}" in res.stderr
    state = json.loads((run / "run.json").read_text())
    assert state["finished"] and state["last_step"] == 40
