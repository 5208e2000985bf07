"""A dependency-free progress line for long loops (stderr)."""

import sys
import time


class Progress:
    """``Progress(total, "cases")``; call ``update()`` per item, ``close()`` at the end.

    On a terminal it redraws one line; otherwise (logs, CI) it prints a line
    about every 10 % so log files stay short.
    """

    def __init__(self, total, unit="items", stream=None, enabled=True):
        self.total = max(int(total), 0)
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.total > 0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.count = 0
        self.start = time.perf_counter()
        self._next_report = 0.1

    def update(self, n=1):
        self.count += n
        if not self.enabled:
            return
        frac = self.count / self.total
        if self.tty:
            self._draw(frac, end="\r")
        elif frac >= self._next_report or self.count == self.total:
            self._draw(frac, end="\n")
            while self._next_report <= frac:
                self._next_report += 0.1

    def _draw(self, frac, end):
        elapsed = time.perf_counter() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else float("nan")
        width = 30
        bar = "=" * int(width * frac) + ">" + " " * (width - int(width * frac))
        self.stream.write(f"[{bar[:width]}] {self.count}/{self.total} {self.unit} "
                          f"{rate:.2f}/s ETA {eta:.0f}s   {end}")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
