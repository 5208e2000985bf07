"""The memory guard: a run that outgrows the machine stops with one line
(peak, limit, the flags that reduce it) instead of being killed silently by
the kernel (issue 15: a 512^3 crop grew to 21.6 GB and was OOM-killed)."""

import os
import sys
import time

import numpy as np
import pytest

from rr_tf.utils import memory
from subproc import run_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
linux = pytest.mark.skipif(memory.rss_bytes() is None, reason="needs /proc (Linux)")


@linux
def test_figures_are_plausible():
    rss, free = memory.rss_bytes(), memory.available_bytes()
    assert 10 * 2**20 < rss < 64 * memory.GIB and 0 < free < 4096 * memory.GIB
    assert memory.default_limit() == pytest.approx(0.95 * (rss + free), rel=0.05)
    assert memory.describe(int(21.62 * memory.GIB)) == "21.62 GB"


@linux
def test_guard_fires_once_past_the_limit_and_not_below():
    hits = []
    base = memory.rss_bytes()
    with memory.MemoryGuard(base + 400 * 2**20, lambda rss, limit: hits.append((rss, limit)),
                            every=0.02) as guard:
        small = np.ones(50 * 2**20 // 8)  # +50 MiB: under the limit
        time.sleep(0.3)
        assert hits == [] and guard.peak >= base
        big = np.ones(600 * 2**20 // 8)  # +600 MiB, pages touched
        deadline = time.time() + 10
        while not hits and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
    assert len(hits) == 1, hits  # once
    rss, limit = hits[0]
    assert rss > limit == base + 400 * 2**20
    del small, big


@linux
def test_pretraining_past_its_memory_limit_stops_with_one_line(tmp_path):
    """A real step too big for its limit (a 2x crop of 64^3 volumes, batch 4,
    width 8: several GB): exit 2, one line naming the peak, the limit and the
    flags to lower, no traceback, and the process ends near the limit."""
    from rr_tf.data.prepare import PrepareConfig, prepare
    from rr_tf.data.spec import PreprocessSpec

    shards = tmp_path / "shards"
    prepare(PrepareConfig(source="phantom", output_dir=str(shards), num_cases=2,
                          phantom_shape=(64, 64, 64), spec=PreprocessSpec(spacing=None), workers=1,
                          progress=False, val_fraction=0.0), log=lambda m: None)
    cmd = [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--method=reprec",
           f"--data_dir={shards}", f"--run_dir={tmp_path / 'run'}", "--base_width=8",
           "--crop_size=128,128,128", "--batch_size=4", "--crops_per_volume=2", "--queue_size=8",
           "--key_bn_groups=1", "--train_steps=3", "--verbose=none", "--jit_compile=false",
           "--memory_limit_gb=2.5"]
    start = time.time()
    res = run_logged(cmd, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    errors = [l for l in res.stderr.splitlines() if "error:" in l]
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and len(errors) == 1, res.stderr[-3000:]
    assert errors[0].startswith("pretrain.py: error: out of memory: the process reached ")
    assert "over its limit of 2.50 GB (--memory_limit_gb); lower --batch_size, --crop_size or " \
           "--base_width" in errors[0]
    peak = float(errors[0].split("reached ")[1].split(" GB")[0])
    assert 2.5 < peak < 3.5, errors[0]
    assert time.time() - start < 300
