"""The launchers' exit-status contract (README, "Bad input"): 0 success, 1 bad
input cases reported, 2 invalid flags or a problem that stops the whole run,
130 interrupted; every failure is one line naming the flag or path, never a
traceback. Only cheap cases that fail before heavy work run as subprocesses."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from subproc import run_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# as a user runs them: no TF_CPP_MIN_LOG_LEVEL, so TensorFlow's C++ lines are filtered
ENV = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "RR_TF_QUIET_TF")}


def launch(script, *args, env=ENV):
    return run_logged([sys.executable, os.path.join(ROOT, "launch", script), *map(str, args)],
                      capture_output=True, text=True, env=env, timeout=300)


def one_line(res, needle):
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "FATAL" not in res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from method_harness import phantom_shards

    out = tmp_path_factory.mktemp("exit") / "shards"
    phantom_shards(out, 2, (32, 32, 32), (12, 12, 12))
    return out


def test_absl_flag_errors_exit_2_with_one_line(tmp_path):
    res = launch("prepare_data.py", "--source=phantom", "--num_cases=0",
                 f"--output_dir={tmp_path / 'out'}")
    assert res.returncode == 2
    one_line(res, "prepare_data.py: error: flag --num_cases=0")
    res = launch("pretrain.py", "--method=moco", f"--data_dir={tmp_path}",
                 f"--run_dir={tmp_path / 'run'}", "--train_steps=-5")
    assert res.returncode == 2
    one_line(res, "pretrain.py: error: flag --train_steps=-5")
    res = launch("finetune.py", "--nosuch_flag")
    assert res.returncode == 2
    one_line(res, "finetune.py: error: Unknown command line flag 'nosuch_flag'")
    res = launch("prepare_data.py", "--helpfull")
    assert res.returncode == 0 and "--max_voxels" in res.stdout
    assert not os.listdir(tmp_path)


def test_unusable_output_folder_is_one_line_naming_it_exit_2(tmp_path, tiny_data):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    res = launch("prepare_data.py", "--source=phantom", "--num_cases=1", "--phantom_shape=16,16,16",
                 f"--output_dir={a_file / 'out'}", "--noprogress")
    assert res.returncode == 2
    one_line(res, f"{a_file} is not a directory")
    res = launch("pretrain.py", "--method=moco", f"--data_dir={tiny_data}", f"--run_dir={a_file}",
                 "--train_steps=1", "--crop_size=16,16,16")
    assert res.returncode == 2
    one_line(res, f"pretrain.py: error: {a_file}")
    assert a_file.read_text() == "not a folder"
    if os.path.isdir("/sys"):  # sysfs: no folder can be made there, even by root
        res = launch("prepare_data.py", "--source=phantom", "--num_cases=1",
                     "--phantom_shape=16,16,16", "--output_dir=/sys/rr_tf_test_out", "--noprogress")
        if not os.path.exists("/sys/rr_tf_test_out"):
            assert res.returncode == 2
            one_line(res, "prepare_data.py: error: /sys/rr_tf_test_out")


def test_environment_errors_become_one_line_with_the_path():
    import tensorflow as tf

    from launch import flagutil

    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/train-0.tfrecord")
    assert flagutil.environment_error(full) == \
        "/data/out/train-0.tfrecord: No space left on device"
    ro = PermissionError(errno.EROFS, "Read-only file system", "/mnt/ro/manifest.json")
    assert flagutil.environment_error(ro) == "/mnt/ro/manifest.json: Read-only file system"
    disk = tf.errors.ResourceExhaustedError(None, None, "/data/out/x.tmp; No space left on device")
    assert flagutil.environment_error(disk) == \
        "/data/out/x.tmp; No space left on device (ResourceExhaustedError)"
    denied = tf.errors.PermissionDeniedError(None, None, "/ro/run; Permission denied")
    assert "/ro/run" in flagutil.environment_error(denied)
    # not about files: a defect keeps its traceback
    assert flagutil.environment_error(ValueError("x")) is None
    assert flagutil.environment_error(
        tf.errors.FailedPreconditionError(None, None, "Could not read uninitialized variable")) \
        is None


def test_ctrl_c_exits_130_with_one_line_and_publishes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "prepare_data.py"),
                             "--source=phantom", "--num_cases=40", "--phantom_shape=48,48,48",
                             f"--output_dir={out}", "--workers=1", "--noprogress"],
                            env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("preparing"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(seen) + rest
    lines = [l for l in rest.splitlines() if l.strip()]
    assert lines == ["prepare_data.py: error: interrupted (Ctrl-C); nothing was published (a data "
                     "set is only written whole)"], rest
    assert os.listdir(out) == []  # no shard, no temporary file, no manifest


def test_tensorflow_native_log_lines_are_filtered_unless_the_user_sets_the_level(tmp_path):
    """Without TF_CPP_MIN_LOG_LEVEL a launcher that loaded TensorFlow prints
    only its own line; TensorFlow's pre-InitializeLog C++ lines are gone."""
    env = ENV
    args = ("--method=moco", f"--data_dir={tmp_path / 'none'}", f"--run_dir={tmp_path / 'run'}")
    res = launch("pretrain.py", *args, env=env)
    assert res.returncode == 2
    one_line(res, f"--data_dir={tmp_path / 'none'}: no manifest.json here")
    loud = launch("pretrain.py", *args, env=dict(env, TF_CPP_MIN_LOG_LEVEL="0"))
    assert loud.returncode == 2 and "no manifest.json here" in loud.stderr


def test_native_stderr_filter_drops_noise_and_passes_the_rest():
    from launch import flagutil

    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
        "I0000 00:00:1796233415.737334   31505 port.cc:153] oneDNN custom operations are on. "
        "You may see slightly different numerical results.\n",
        "E0000 00:00:1796233415.737334   31505 mkl_util.h:1] oneDNN supports DT_INT64 only on "
        "platforms with AVX-512. Falling back to the default Eigen-based implementation if "
        "present.\n",
    ]
    keep = ["E0000 00:00:1796233415.7 1 op.cc:9] real error\n", "F0000 check failed\n",
            "progress 3/10\r", "plain line\n", "no newline at the end"]
    read_end, write_end = os.pipe()
    out_read, out_write = os.pipe()
    os.write(write_end, "".join([noise[0], keep[0], noise[1], keep[1], keep[2], noise[2],
                                 keep[3], keep[4]]).encode())
    os.close(write_end)
    flagutil._copy_filtered(read_end, out_write)
    os.close(out_write)
    got = b""
    while True:
        chunk = os.read(out_read, 1 << 16)
        if not chunk:
            break
        got += chunk
    os.close(read_end)
    os.close(out_read)
    assert got.decode() == "".join(keep)


def test_corrupt_shard_stops_pretraining_with_one_line_naming_it(tmp_path, tiny_data):
    """Three flipped bytes keep the shard's size: the default size check
    passes and the stream names the shard and the byte offset (exit 2, not
    a DataLossError traceback); --verify_shards=sha256 finds it before
    reading, and with --skip_corrupt_shards the shard is left out with a
    warning (here the only one, so nothing is left to train on)."""
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = data / json.load(open(data / "manifest.json"))["shards"][0]["name"]
    raw = bytearray(shard.read_bytes())
    for i in range(3):
        raw[len(raw) // 2 + i] ^= 0xFF
    shard.write_bytes(bytes(raw))
    common = ("pretrain.py", "--method=moco", f"--data_dir={data}", "--train_steps=1",
              "--crop_size=16,16,16", "--verbose=none")
    res = launch(*common, f"--run_dir={tmp_path / 'a'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]  # after the run's own "new run" line
    assert line.startswith(f"pretrain.py: error: {shard}: record ") and \
        "corrupted record at byte" in line, res.stderr[-3000:]
    res = launch(*common, f"--run_dir={tmp_path / 'c'}", "--verify_shards=sha256",
                 "--skip_corrupt_shards")
    assert res.returncode == 2
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert any(l.startswith(f"warning: skipping {shard}: sha256") for l in lines), res.stderr
    assert lines[-1].startswith("pretrain.py: error:") and "no usable train shard" in lines[-1]
