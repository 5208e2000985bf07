"""Benchmarks; results are written into docs/benchmarks.md.

  python launch/benchmark.py --mode=data
      phantom generation time per volume (128^3 and 64^3, median over seeds)
      and preprocessing throughput (NIfTI files -> int16 shards, volumes/s,
      with 1 worker and with one per core), plus peak RSS.

Modes 'model' and 'e2e' arrive with the pre-training issues and are refused
with a clear message until then.
"""

import datetime
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from launch import flagutil  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", None, ["data", "model", "e2e"], "What to measure.")
flags.DEFINE_integer("repeats", 5, "Phantoms timed per size (median reported).", lower_bound=1)
flags.DEFINE_integer("num_cases", 12, "NIfTI cases in the preprocessing throughput run.", lower_bound=2)
flags.DEFINE_string("spacing", "3,3,3", "Target spacing of the throughput run (mm).")
flags.DEFINE_string("output", "docs/benchmarks.md", "Markdown file whose section for this mode "
                    "is replaced by the new results ('' = print only).")
flags.mark_flag_as_required("mode")
flagutil.register_numbers_validator("spacing", 3, positive=True)


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def peak_rss_mb():
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return self_mb, child_mb


def bench_phantom(shape, repeats):
    from rr_tf.data.phantom import PhantomConfig, generate_phantom

    cfg = PhantomConfig(shape=shape)
    generate_phantom(12345, cfg)  # warm-up (imports, FFT plans)
    times = []
    for seed in range(repeats):
        t0 = time.perf_counter()
        generate_phantom(seed, cfg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def bench_preprocess(num_cases, spacing, workers, src, out):
    from rr_tf.data.prepare import PrepareConfig, prepare
    from rr_tf.data.spec import PreprocessSpec

    shutil.rmtree(out, ignore_errors=True)
    cfg = PrepareConfig(source=src, output_dir=out, spec=PreprocessSpec(spacing=spacing),
                        workers=workers, progress=False, val_fraction=0.0)
    t0 = time.perf_counter()
    res = prepare(cfg, log=lambda m: None)
    elapsed = time.perf_counter() - t0
    assert res.published and len(res.manifest["cases"]) == num_cases
    return num_cases / elapsed, elapsed


def run_data():
    from rr_tf.data.phantom import PhantomConfig, generate_phantom, write_phantom_nifti

    lines = []
    for shape in [(128, 128, 128), (64, 64, 64)]:
        med, lo, hi = bench_phantom(shape, FLAGS.repeats)
        lines.append(f"| phantom generation {'x'.join(map(str, shape))} | {med:.3f} s/volume "
                     f"(min {lo:.3f}, max {hi:.3f}, {FLAGS.repeats} seeds) | about 1 s (128^3), "
                     "0.15 s (64^3) |")
    tmp = tempfile.mkdtemp(prefix="rr_tf_bench_")
    try:
        for i in range(FLAGS.num_cases):
            write_phantom_nifti(generate_phantom(1000 + i, PhantomConfig()), tmp, f"case_{i:03d}")
        src = os.path.join(tmp, "images")
        spacing = flagutil.parse_numbers(FLAGS.spacing, 3)
        for workers in (1, os.cpu_count() or 1):
            rate, elapsed = bench_preprocess(FLAGS.num_cases, spacing, workers, src,
                                             os.path.join(tmp, f"out{workers}"))
            lines.append(f"| preprocessing 128^3 .nii.gz -> int16 shards at "
                         f"{FLAGS.spacing} mm, {workers} worker(s) | {rate:.2f} volumes/s "
                         f"({FLAGS.num_cases} volumes in {elapsed:.1f} s) | - |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    self_mb, child_mb = peak_rss_mb()
    lines.append(f"| peak RSS | {self_mb:.0f} MB main process, {child_mb:.0f} MB largest worker | "
                 "phantom < 1 GB per process |")
    return lines


def write_section(path, mode, lines):
    header = [f"<!-- {mode}:begin -->", f"## `--mode={mode}`", "",
              f"Command: `python launch/benchmark.py --mode={mode} "
              f"--repeats={FLAGS.repeats} --num_cases={FLAGS.num_cases} --spacing={FLAGS.spacing}`  ",
              f"Machine: {machine()}  ",
              f"Date: {datetime.date.today().isoformat()}", "",
              "| what | measured | target |", "|---|---|---|"]
    section = "\n".join(header + lines + [f"<!-- {mode}:end -->"])
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    begin, end = f"<!-- {mode}:begin -->", f"<!-- {mode}:end -->"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv):
    del argv
    if FLAGS.mode != "data":
        flagutil.fail(__file__, f"--mode={FLAGS.mode} is not available yet (it comes with the "
                      "model/pre-training work); only --mode=data is implemented")
    lines = run_data()
    print("\n".join(lines))
    if FLAGS.output:
        write_section(FLAGS.output, FLAGS.mode, lines)
        print(f"written to {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
