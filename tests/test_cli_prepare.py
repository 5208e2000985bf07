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
