"""``run_logged``: subprocess.run for tests that start Python/TensorFlow
children, with a native backtrace when a child crashes.

A child killed by a signal (e.g. SIGSEGV inside a TensorFlow thread) shows
only its Python frames, which do not say which native code crashed. Here the
child may write a core file: the test process raises its own soft
RLIMIT_CORE to the hard limit, and children inherit it (a ``preexec_fn``
would run Python between fork and exec in a process full of TensorFlow
threads, which can deadlock). When the child dies of a signal and a core
file appears in its working directory, gdb (when installed) prints the
crashing thread's native stack, which is appended to the child's stderr,
and the core file is deleted. Nothing changes for a child that exits
normally.
"""

import glob
import os
import resource
import shutil
import subprocess
import time

_CORE_PATTERN = "/proc/sys/kernel/core_pattern"


def _allow_core():
    """Raises this process's soft core-size limit to the hard one (children
    inherit it); False when the hard limit forbids core files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    return hard != 0


def _cores_written_to_cwd():
    try:
        with open(_CORE_PATTERN) as f:
            pattern = f.read().strip()
    except OSError:
        return False
    return bool(pattern) and not pattern.startswith("|") and "/" not in pattern


def _backtrace(executable, core):
    if shutil.which("gdb") is None:
        return "(no gdb installed: no native backtrace)"
    try:
        out = subprocess.run(["gdb", "-batch", "-nx", "-q", "-ex", "bt 40", executable, core],
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"(gdb failed: {err})"
    frames = [line for line in out.stdout.splitlines() if line.startswith("#")]
    return "\n".join(frames)[:2500] or out.stderr[-1500:]


def run_logged(cmd, **kwargs):
    """``subprocess.run(cmd, **kwargs)``; on death by a signal, the child's
    native backtrace (from its core file) is appended to ``stderr``."""
    cwd = kwargs.get("cwd") or os.getcwd()
    start = time.time()
    collect = _cores_written_to_cwd() and _allow_core()
    res = subprocess.run(cmd, **kwargs)
    if res.returncode >= 0 or not collect:
        return res
    cores = [c for c in glob.glob(os.path.join(str(cwd), "core*"))
             if os.path.isfile(c) and os.path.getmtime(c) >= start - 1]
    for core in cores:
        trace = _backtrace(cmd[0], core)
        os.remove(core)
        if isinstance(res.stderr, str):
            res.stderr += f"\n--- native backtrace of the crashed child ({core}) ---\n{trace}\n"
    return res
