"""launch/prepare_data.py as a user runs it (real subprocesses)."""

import json
import os
import sys

import numpy as np
import pytest

from nifti_factory import ramp_volume, write
from subproc import run_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "prepare_data.py")


def run(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return run_logged([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["--source=phantom", "--output_dir=X", "--spacing=1,2"], "--spacing needs 3"),
    (["--source=phantom", "--output_dir=X", "--spacing=1,-2,1"], "--spacing values must be > 0"),
    (["--source=phantom", "--output_dir=X", "--hu_window=a,b"], "--hu_window needs 2"),
    (["--source=phantom", "--output_dir=X", "--num_cases=0"], "num_cases"),
    (["--source=phantom", "--output_dir=X", "--compression=zip"], "compression"),
    (["--output_dir=X"], "--source must have a value"),
    (["--source=/no/such/dir", "--output_dir=X"], "source: '/no/such/dir' is neither"),
    (["--source=phantom", "--output_dir=X", "--spec=/no/spec.json"], "--spec=/no/spec.json"),
    (["--source=phantom", "--output_dir=X", "--spec=a.json", "--spacing=1,1,1"], "--spec excludes"),
    (["--source=phantom"], "--output_dir is required"),
    (["--source=/tmp", "--write_nifti=X"], "--output_dir is required"),
    (["--source=/tmp", "--output_dir=X", "--write_nifti=X"], "--write_nifti needs --source=phantom"),
])
def test_invalid_flags_fail_fast_with_a_clear_line(tmp_path, args, needle):
    args = [a.replace("X", str(tmp_path / "out")) for a in args]
    res = run(*args)
    assert res.returncode != 0
    hits = [l for l in res.stderr.splitlines() if needle in l]
    assert hits, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_nifti_folder_run_rerun_and_bad_case(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write(src / f"c{i}.nii.gz", ramp_volume((10, 8, 8), seed=i), np.diag([0.8, 0.8, 2.5, 1]),
              dtype=np.int16)
    out = tmp_path / "out"
    common = [f"--source={src}", f"--output_dir={out}", "--spacing=1.6,1.6,2.5", "--workers=1"]
    res = run(*common)
    assert res.returncode == 0, res.stderr
    manifest = json.load(open(out / "manifest.json"))
    assert len(manifest["cases"]) == 3 and manifest["spec"]["spacing"] == [1.6, 1.6, 2.5]
    assert manifest["cases"][0]["shape"] == [5, 4, 8]
    res = run(*common)
    assert res.returncode == 0 and "up to date" in res.stderr
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    res = run(*common)
    assert res.returncode == 1
    assert any(l.startswith("bad input:") and "broken.nii.gz" in l for l in res.stderr.splitlines())
    assert json.load(open(out / "manifest.json")) == manifest  # the old data set is untouched
    res = run(*common, "--skip_bad")
    assert res.returncode == 0, res.stderr
    assert len(json.load(open(out / "manifest.json"))["bad_cases"]) == 1


def test_write_nifti_gives_the_phantom_cases_as_viewable_pairs(tmp_path):
    """The NIfTI pairs are the same phantoms (seeds) the shards hold; other
    --seed values give other phantoms (held-out sets); a second run keeps
    what is there."""
    import nibabel as nib

    from rr_tf.data.phantom import PhantomConfig, generate_phantom
    from rr_tf.data.sources import phantom_tasks

    out = tmp_path / "nifti"
    args = ["--source=phantom", "--num_cases=2", "--phantom_shape=32,32,24", "--seed=3",
            f"--write_nifti={out}"]
    res = run(*args)
    assert res.returncode == 0, res.stderr
    assert "2 written" in res.stderr and not (tmp_path / "shards").exists()
    tasks = phantom_tasks(2, 3, (32, 32, 24))
    for task in tasks:
        img = nib.load(out / "images" / f"{task.case_id}.nii.gz")
        lab = nib.load(out / "labels" / f"{task.case_id}.nii.gz")
        ph = generate_phantom(task.seed, PhantomConfig(shape=(32, 32, 24)))
        np.testing.assert_array_equal(np.asarray(img.dataobj), ph.image)
        np.testing.assert_array_equal(np.asarray(lab.dataobj), ph.labels)
        np.testing.assert_allclose(img.affine, ph.affine)
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    other = phantom_tasks(2, 4, (32, 32, 24))
    assert not {t.seed for t in tasks} & {t.seed for t in other}
    again = run(*args)
    assert again.returncode == 0 and "0 written, 2 already there" in again.stderr
    assert not [n for n in os.listdir(out / "images") if n.startswith(".")]


def _children(pid):
    """{pid: command line} of the live processes whose parent is ``pid``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found[int(entry)] = cmd
    return found


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_workers_die_with_a_killed_parent(tmp_path):
    """prepare_data.py --workers=2 killed with SIGKILL cannot shut its pool
    down; its worker processes notice and end within seconds."""
    import signal
    import subprocess
    import time

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--source=phantom", "--num_cases=40",
                             "--phantom_shape=64,64,64", f"--output_dir={tmp_path / 'out'}",
                             "--workers=2", "--noprogress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    workers = {}
    try:
        for line in proc.stderr:
            if line.startswith("preparing"):
                break
        deadline = time.time() + 60
        while time.time() < deadline and len(workers) < 2:
            workers = {p: c for p, c in _children(proc.pid).items() if "multiprocessing" in c}
            time.sleep(0.2)
        assert len(workers) >= 2, _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 20
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), workers
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in workers:  # the ones this test started, should the check have failed
            if _alive(p):
                os.kill(p, signal.SIGKILL)
