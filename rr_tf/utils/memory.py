"""Host memory: what is available, what the process holds, and a guard
that stops a run with one line before the kernel's OOM killer does.

A step that needs more memory than the machine has (a crop, batch or width
too large) does not fail on CPU: the process grows until the kernel kills
it without a message (a 512^3 crop on 3 mm phantoms: 21.6 GB, killed after
4 minutes). :class:`MemoryGuard` watches the resident set size from a
background thread and calls its ``on_exceed`` once when it passes a limit,
which the launchers set to what was available when they started. GPU and
TPU memory is not watched here: TensorFlow raises ResourceExhaustedError
there, which the launchers already report in one line.

Linux only (``/proc``, cgroup files); elsewhere the figures are None and
the guard does nothing.
"""

import os
import threading

GIB = 1024 ** 3


def rss_bytes(field="VmRSS"):
    """Resident set size of this process (VmRSS; ``field="VmHWM"``: its
    peak), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _read_int(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def available_bytes():
    """Memory this process can still take: the kernel's MemAvailable,
    lowered to the room left under a cgroup limit (containers, Slurm,
    Kubernetes) when there is one; None when neither can be read."""
    figures = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    figures.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            figures.append(max(limit - usage, 0))
            break
    return min(figures) if figures else None


def default_limit(margin=0.05):
    """The guard's limit when the user gives none: what the process holds
    now plus what is available, less ``margin`` of it (the kernel, page
    cache and other processes need some); None when unknown."""
    held, free = rss_bytes(), available_bytes()
    if held is None or free is None:
        return None
    return int((held + free) * (1.0 - margin))


class MemoryGuard:
    """Calls ``on_exceed(rss_bytes, limit_bytes)`` once, from a daemon
    thread, when the process's resident set size passes ``limit_bytes``
    (polled every ``every`` seconds). ``on_exceed`` typically prints one
    line and ends the process (``os._exit``): checkpoints and shards are
    written under temporary names and renamed, so nothing half written is
    left as if complete."""

    def __init__(self, limit_bytes, on_exceed, every=0.2):
        self.limit = int(limit_bytes)
        self.on_exceed = on_exceed
        self.every = float(every)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        if rss_bytes() is None or self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._watch, name="rr_tf-memory-guard",
                                        daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(self.every):
            rss = rss_bytes() or 0
            self.peak = max(self.peak, rss)
            if rss > self.limit:
                self.on_exceed(rss, self.limit)
                return

    def stop(self):
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def describe(nbytes):
    """'21.62 GB' (GiB, two decimals)."""
    return f"{nbytes / GIB:.2f} GB"


def exit_over_limit(script, hint, code=2, origin="--memory_limit_gb"):
    """An ``on_exceed`` for launchers: one line on stderr naming the peak,
    the limit and the flags that reduce memory, then ``os._exit(code)``
    (from the guard's thread: no Python cleanup that could hang on the
    busy main thread)."""
    def on_exceed(rss, limit):
        line = (f"{os.path.basename(script)}: error: out of memory: the process reached "
                f"{describe(rss)}, over its limit of {describe(limit)} ({origin}); {hint}\n")
        try:
            os.write(2, line.encode())
        finally:
            os._exit(code)
    return on_exceed
