"""The test helper that reports a crashed child's native backtrace."""

import os
import shutil
import sys

from subproc import _cores_written_to_cwd, run_logged


def test_a_crashing_child_reports_its_native_stack_and_leaves_no_core(tmp_path):
    res = run_logged([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], cwd=tmp_path,
                     capture_output=True, text=True, timeout=120)
    assert res.returncode == -11
    assert not [p for p in os.listdir(tmp_path) if p.startswith("core")]
    if _cores_written_to_cwd() and shutil.which("gdb"):
        assert "native backtrace of the crashed child" in res.stderr
        assert "#0 " in res.stderr, res.stderr[-2000:]


def test_a_normal_child_is_untouched(tmp_path):
    res = run_logged([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], cwd=tmp_path,
                     capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and res.stdout == "out\n" and "backtrace" not in res.stderr
