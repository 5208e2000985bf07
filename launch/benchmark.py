"""Benchmarks; results are written into docs/benchmarks.md.

  python launch/benchmark.py --mode=data
      phantom generation time per volume (128^3 and 64^3, median over seeds);
      preprocessing throughput (NIfTI files -> int16 shards, volumes/s, with
      1 worker and with one per core); tf.data stream throughput from those
      shards (plain 96^3 crops/s, PCRLv2 samples/s) with each stream's peak
      RSS, measured in a fresh process.

  python launch/benchmark.py --mode=model --method=reprec
      train steps/s and samples/s on synthetic in-memory batches and end to
      end from phantom shards, peak RSS, and achieved GFLOP/s (FLOPs of one
      train step counted by TensorFlow's profiler on its graph) against this
      machine's measured float32 matmul peak; at 64x64x32 and 96^3, for the
      demo-size and the published-size model (96^3: batch 1).

  python launch/benchmark.py --mode=model --method=all
      every method at its demo model size, batch 4, at its demo crop and at
      64x64x32: samples/s (synthetic and end to end) and peak RSS.

  python launch/benchmark.py --mode=finetune --torch_python=/path/to/venv/bin/python
      the fine-tuning step of configs/demo_finetune.flags' network (U-Net
      width, levels, norm, patch, batch): seconds per step on a synthetic
      in-memory batch and end to end from the shards (--finetune_data_dir),
      and, with --torch_python, the same network's step in PyTorch
      (../shared/bench/torch_unet_step.py), alternated with ours over
      --rounds rounds in one run; the ratio is of the medians.

  python launch/benchmark.py --mode=memory --method=all
      the memory each method's published configuration (configs/<method>.flags:
      model, crop, optimizer) needs, measured on this CPU: parameters, the
      bytes of every variable (weights, EMA copies, queues) and optimizer
      slot, and the peak resident-memory growth over two train steps at
      batch 1 and batch 2, whose difference is the activation memory per
      sample; from them an estimate at the published batch (per replica:
      divide the batch by the replicas). CPU TensorFlow, not GPU XLA: the
      figures bound the parameter/activation part, not cuDNN workspaces or
      XLA's fusion savings.

Mode 'e2e' (a whole pre-train -> fine-tune -> infer timing) is not
implemented and is refused with a clear message.
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

from absl import flags  # noqa: E402

from launch import flagutil  # noqa: E402

flagutil.quiet_tensorflow(__name__)

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_enum("mode", None, ["data", "model", "finetune", "memory", "e2e"],
                  "What to measure.")
flags.DEFINE_integer("repeats", 5, "Phantoms timed per size (median reported).", lower_bound=1)
flags.DEFINE_integer("num_cases", 12, "NIfTI cases in the preprocessing throughput run.", lower_bound=2)
flags.DEFINE_string("spacing", "3,3,3", "Target spacing of the throughput run (mm).")
flags.DEFINE_string("method", "reprec", "Method for --mode=model (a registered name), or 'all': "
                    "every method at its demo model size, one comparison table.")
flags.DEFINE_string("data_dir", "rr_tf_data/phantom_demo", "Shards for the end-to-end model "
                    "figures (made by launch/prepare_data.py --flagfile=configs/demo_data.flags).")
flags.DEFINE_integer("steps", 5, "Timed train steps per model figure (after one warm-up step).",
                     lower_bound=1)
flags.DEFINE_float("seconds", 20.0, "Seconds each stream is timed (after warm-up).", lower_bound=1.0)
flags.DEFINE_string("output", "docs/benchmarks.md", "Markdown file whose section for this mode "
                    "is replaced by the new results ('' = print only).")
flags.DEFINE_string("finetune_flagfile", "configs/demo_finetune.flags", "--mode=finetune: the "
                    "fine-tuning flagfile whose network, patch and batch are timed.")
flags.DEFINE_string("finetune_data_dir", "rr_tf_data/phantom_6mm", "--mode=finetune: shards for "
                    "the end-to-end figure (skipped when absent).")
flags.DEFINE_string("torch_python", "", "--mode=finetune: a Python with PyTorch that runs the "
                    "peer step (../shared/bench/torch_unet_step.py); '' = no comparison.")
flags.DEFINE_string("peer_script", os.path.join(os.path.dirname(ROOT), "shared", "bench",
                                                "torch_unet_step.py"),
                    "--mode=finetune: the PyTorch peer script.")
flags.DEFINE_integer("rounds", 3, "--mode=finetune: alternating rounds (ours, peer).", lower_bound=1)
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


STREAMS = {
    # name: (recipe factory, StreamConfig kwargs, samples per batch, what one sample is)
    "plain96_k4": ("random_crop", {"crop_size": (96, 96, 96)}, dict(batch_size=8, crops_per_volume=4),
                   "plain 96^3 crops (4 per volume read)"),
    "plain96_k1": ("random_crop", {"crop_size": (96, 96, 96)}, dict(batch_size=8, crops_per_volume=1),
                   "plain 96^3 crops (1 per volume read)"),
    "pcrlv2": ("pcrlv2_views", {}, dict(batch_size=4, crops_per_volume=4),
               "PCRLv2 samples (2 globals 64x64x32 + 6 locals 16^3, full augmentation)"),
}


def _stream_child(name, data_dir, seconds, queue):
    """Runs in a fresh process: times one stream, reports rate and RSS."""
    import tensorflow as tf  # noqa: F401  (baseline RSS includes the TF runtime)
    from rr_tf.data import recipes
    from rr_tf.data.pipeline import StreamConfig, view_dataset

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

    factory, kwargs, cfg, _ = STREAMS[name]
    base = rss_mb()
    ds, _ = view_dataset(data_dir, "train", getattr(recipes, factory)(**kwargs), StreamConfig(**cfg))
    it = iter(ds)
    for _ in range(3):  # warm-up: tracing, XLA compilation, buffers filling
        next(it)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += cfg["batch_size"]
    rate = n / (time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((rate, base, peak))


def _in_child(target, *args):
    """Runs ``target(*args, queue)`` in a fresh spawned process (so its peak
    RSS is its own) and returns what it put on the queue; fails with one line
    if the child dies without a result."""
    import multiprocessing
    import queue as queue_mod

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=args + (queue,))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                flagutil.fail(__file__, f"benchmark child {target.__name__}{args[:3]} died "
                              f"(exit code {proc.exitcode}) without a result")
    proc.join()
    return result


def bench_stream(name, data_dir, seconds):
    return _in_child(_stream_child, name, data_dir, seconds)


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
        self_mb, child_mb = peak_rss_mb()
        lines.append(f"| peak RSS of the preparation | {self_mb:.0f} MB main process, {child_mb:.0f} MB "
                     "largest worker | phantom < 1 GB per process |")
        targets = {"plain96_k4": 400, "plain96_k1": 400, "pcrlv2": 100}
        for name, (_, _, cfg, what) in STREAMS.items():
            rate, base, peak = bench_stream(name, os.path.join(tmp, "out1"), FLAGS.seconds)
            lines.append(f"| stream: {what}, batch {cfg['batch_size']}, default buffers | "
                         f"{rate:.0f} samples/s; peak RSS {peak:.0f} MB ({base:.0f} MB of it the "
                         f"TF runtime before the stream) | >= {targets[name]}/s; < 2 GB |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lines


MODEL_CASES = [
    # (label, crop, batch, config overrides)
    ("demo-size model (base 4, transformer 96x2)", (64, 64, 32), 8,
     dict(base_width=4, queue_size=256, proj_dim=64, transformer_dim=96, transformer_depth=2,
          transformer_heads=4, decoder_dim=64, decoder_depth=1)),
    ("demo-size model (base 4, transformer 96x2)", (96, 96, 96), 2,
     dict(base_width=4, queue_size=256, proj_dim=64, transformer_dim=96, transformer_depth=2,
          transformer_heads=4, decoder_dim=64, decoder_depth=1, key_bn_groups=1)),
    ("published-size model (base 32, transformer 384x6)", (64, 64, 32), 2,
     dict(queue_size=256, key_bn_groups=1)),
    ("published-size model (base 32, transformer 384x6)", (96, 96, 96), 1,
     dict(queue_size=256, key_bn_groups=1)),
]
# (batches of 1-2 take their keys' BatchNorm statistics over the whole batch)


def matmul_peak_gflops(n=2048, reps=10):
    import tensorflow as tf

    a = tf.random.uniform([n, n])
    b = tf.random.uniform([n, n])
    f = tf.function(lambda: tf.matmul(a, b))
    f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f().numpy()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def _built_method(method_name, crop, batch, overrides, optimizer):
    """(method, synthetic batch): ``method_name`` with ``overrides`` on its
    Config, compiled with ``optimizer`` and built on a random batch."""
    import dataclasses

    import tensorflow as tf
    from rr_tf.methods import get_method
    from rr_tf.optim import build_optimizer

    cls = get_method(method_name)
    cfg = dataclasses.replace(cls.Config(), **overrides)
    if getattr(cfg, "mid_decay_steps", None) == 0:  # PCRLv2: 0 = "the run's train_steps"
        cfg = dataclasses.replace(cfg, mid_decay_steps=1000)  # the optimizer schedule's length
    method = cls(cfg)
    method.compile(optimizer=build_optimizer(optimizer, 1e-4, 1000), jit_compile=False)
    example = cls.example_batch(crop, batch)
    synthetic = tf.nest.map_structure(  # random volumes; integer fields keep their example values
        lambda t: tf.random.uniform(t.shape, dtype=t.dtype) if t.dtype.is_floating else t, example)
    method.build_for(synthetic)
    return method, synthetic


def _model_child(method_name, crop, batch, overrides, steps, data_dir, queue):
    import tensorflow as tf
    from rr_tf.data.pipeline import StreamConfig, view_dataset

    method, synthetic = _built_method(method_name, crop, batch, overrides, "adamw")
    cls, cfg = type(method), method.config
    step = tf.function(method.train_step)
    concrete = step.get_concrete_function(synthetic)
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    flops = tf.compat.v1.profiler.profile(graph=concrete.graph, options=opts).total_float_ops

    def timed(next_batch):
        step(next_batch())  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            float(step(next_batch())["loss"])
        return steps / (time.perf_counter() - t0)

    synth_rate = timed(lambda: synthetic)
    e2e_rate = None
    if os.path.exists(os.path.join(data_dir, "manifest.json")):
        ds, _ = view_dataset(data_dir, "train", cls.recipe(cfg, crop),
                             StreamConfig(batch_size=batch, crops_per_volume=4))
        it = iter(ds)
        e2e_rate = timed(lambda: next(it))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((synth_rate, e2e_rate, flops, peak))


def _memory_child(method_name, crop, batch, overrides, optimizer, queue):
    """Peak resident-memory growth (kB) of building ``method_name`` and two
    train steps at ``batch`` on random volumes, over the process after
    TensorFlow's start; with the parameter count and the bytes of every
    model and optimizer variable."""
    import numpy as np
    import tensorflow as tf
    from rr_tf.utils.memory import rss_bytes

    tf.constant(1.0) + 1.0  # the runtime's own memory is the baseline
    base = rss_bytes()
    method, synthetic = _built_method(method_name, crop, batch, overrides, optimizer)
    step = tf.function(method.train_step)
    float(step(synthetic)["loss"])  # traces; the optimizer makes its slots
    t0 = time.perf_counter()
    float(step(synthetic)["loss"])
    seconds = time.perf_counter() - t0

    def nbytes(variables):
        return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables))

    queue.put({"params": int(sum(np.prod(v.shape) for v in method.trainable_variables)),
               "model_bytes": nbytes(method.variables),
               "optimizer_bytes": nbytes(method.optimizer.variables),
               "peak_kb": (rss_bytes("VmHWM") - base) // 1024, "step_s": seconds})


def run_memory():
    """Every method (or --method) at its published configuration: batch g
    and 2g in fresh processes (g = 1, or the key BatchNorm groups); the
    difference / g is the activation memory per sample."""
    from rr_tf.methods import get_method, method_names

    names = method_names() if FLAGS.method == "all" else (FLAGS.method,)
    lines = []
    for name in names:
        path = os.path.join(ROOT, "configs", f"{name}.flags")
        overrides, crop = flagutil.flagfile_config(path, get_method(name).Config)
        values = flagutil.flagfile_values(path)
        optimizer, published = values.get("optimizer", "adamw"), int(values["batch_size"])
        # the smallest batch the method accepts (its key BatchNorm groups must divide it) and twice it
        g = max(int(getattr(get_method(name).Config(**overrides), "key_bn_groups", 1) or 1), 1)
        one, two = (_in_child(_memory_child, name, tuple(crop), b, overrides, optimizer)
                    for b in (g, 2 * g))
        per_sample = max(two["peak_kb"] - one["peak_kb"], 0) / 1024 ** 2 / g
        fixed = one["peak_kb"] / 1024 ** 2 - g * per_sample
        state = (one["model_bytes"] + one["optimizer_bytes"]) / 1024 ** 3
        lines.append(
            f"| {name}, published config, crop {'x'.join(map(str, crop))}, {optimizer} | "
            f"{one['params'] / 1e6:.1f} M parameters; variables {one['model_bytes'] / 1024 ** 2:.0f} "
            f"MB + optimizer {one['optimizer_bytes'] / 1024 ** 2:.0f} MB; peak growth batch {g} / {2 * g}: "
            f"{one['peak_kb'] / 1024 ** 2:.2f} / {two['peak_kb'] / 1024 ** 2:.2f} GB "
            f"(second step {one['step_s']:.1f} / {two['step_s']:.1f} s); activations "
            f"{per_sample:.2f} GB per sample; **estimated at the published batch {published}: "
            f"{fixed + published * per_sample:.1f} GB** ({fixed:.2f} GB fixed, of which "
            f"{state:.2f} GB variables and optimizer state) | - |")
        print(lines[-1], flush=True)
    return lines


def demo_overrides(name):
    """The method-Config values and crop size of the method's demo flagfile."""
    from rr_tf.methods import get_method

    demo = "demo.flags" if name == "reprec" else f"demo_{name}.flags"
    return flagutil.flagfile_config(os.path.join(ROOT, "configs", demo), get_method(name).Config)


def run_model_all():
    """Every method at its demo model size, batch 4, at its demo crop and at
    64x64x32 (multitask: 64x64 windows of its demo slab depth): one table."""
    from rr_tf.methods import method_names

    lines = []
    for name in method_names():
        overrides, demo_crop = demo_overrides(name)
        crops = [tuple(demo_crop)]
        other = (64, 64, demo_crop[2]) if name == "multitask" else (64, 64, 32)
        if other != tuple(demo_crop):
            crops.append(other)
        for crop in crops:
            synth, e2e, _, peak = _in_child(_model_child, name, crop, 4, overrides, FLAGS.steps,
                                            FLAGS.data_dir)
            e2e_text = f"{e2e * 4:.2f} samples/s" if e2e else "no shards"
            which = "demo crop" if crop == tuple(demo_crop) else "crop"
            lines.append(f"| {name}, demo model, {which} {'x'.join(map(str, crop))}, batch 4 | "
                         f"synthetic {synth * 4:.2f} samples/s; end to end {e2e_text}; "
                         f"peak RSS {peak:.0f} MB | - |")
    return lines


def run_model():
    peak_gflops = matmul_peak_gflops()
    lines = [f"| float32 matmul peak (2048^2, TF) | {peak_gflops:.1f} GFLOP/s | - |"]
    for label, crop, batch, overrides in MODEL_CASES:
        synth, e2e, flops, peak = _in_child(_model_child, FLAGS.method, crop, batch, overrides,
                                            FLAGS.steps, FLAGS.data_dir)
        gflops = flops * synth / 1e9
        e2e_text = f"{e2e:.3f} steps/s ({e2e * batch:.2f} samples/s)" if e2e else "no shards"
        lines.append(
            f"| {FLAGS.method} {label}, crop {'x'.join(map(str, crop))}, batch {batch} | "
            f"synthetic: {synth:.3f} steps/s ({synth * batch:.2f} samples/s); end to end: "
            f"{e2e_text}; {flops / 1e9:.1f} GFLOP per step -> {gflops:.1f} GFLOP/s "
            f"({100 * gflops / peak_gflops:.0f} % of matmul peak); peak RSS {peak:.0f} MB | - |")
    return lines


def _finetune_child(net, crop, batch, steps, data_dir, queue):
    """Seconds per fine-tuning step of the segmenter ``net`` (synthetic
    batch; end to end from ``data_dir``'s shards with the recipe's patches
    and augmentation when they exist), in a fresh process."""
    import keras
    import tensorflow as tf

    from rr_tf.data import recipes
    from rr_tf.data.pipeline import StreamConfig, view_dataset
    from rr_tf.models.segmenters import build_segmenter
    from rr_tf.optim import build_optimizer
    from rr_tf.training.segmentation import SegmentationTask

    keras.utils.set_random_seed(0)
    task = SegmentationTask(build_segmenter("unet", 11, **net), 11)
    task.compile(optimizer=build_optimizer("adamw", 1e-3, 1000), jit_compile=False)
    synthetic = {"image": tf.random.uniform((batch,) + crop + (1,)),
                 "label": tf.random.uniform((batch,) + crop, 0, 11, tf.int32)}
    task.build_for(synthetic)
    step = tf.function(task.train_step)

    def timed(next_batch):
        for _ in range(2):
            float(step(next_batch())["loss"])  # warm-up
        times = []
        for _ in range(steps):
            b = next_batch()
            t0 = time.perf_counter()
            float(step(b)["loss"])
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    synth = timed(lambda: synthetic)
    e2e = None
    if os.path.exists(os.path.join(data_dir, "manifest.json")):
        ds, _ = view_dataset(data_dir, "train", recipes.finetune_patch(
            crop, spatial=recipes.finetune_augmentation(())),
            StreamConfig(batch_size=batch, crops_per_volume=2), labelled=True)
        it = iter(ds.map(lambda b: {"image": b["image"], "label": b["label"]}))
        for _ in range(2):
            float(step(next(it))["loss"])
        t0 = time.perf_counter()
        for _ in range(steps):
            float(step(next(it))["loss"])
        e2e = (time.perf_counter() - t0) / steps
    queue.put((synth, e2e, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def _torch_step(net, crop, batch, steps):
    import json
    import subprocess

    norm = net.get("norm", "batch")
    cmd = [FLAGS.torch_python, FLAGS.peer_script, f"--crop={','.join(map(str, crop))}",
           f"--batch={batch}", f"--base={net['base_width']}", f"--levels={net['levels']}",
           f"--norm={'none' if norm not in ('batch', 'instance') else norm}",
           f"--steps={steps}", "--warmup=2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        flagutil.fail(__file__, f"--torch_python: the peer step failed: "
                      f"{(res.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_finetune():
    values = flagutil.flagfile_values(os.path.join(ROOT, FLAGS.finetune_flagfile))
    net = {"base_width": int(values.get("base_width", 32)), "levels": int(values.get("levels", 4)),
           "norm": values.get("norm", "batch")}
    crop = tuple(int(v) for v in values.get("crop_size", "48,48,32").split(","))
    batch = int(values.get("batch_size", 2))
    ours, e2e, peer, rss = [], [], [], 0.0
    for _ in range(FLAGS.rounds):
        synth, end, peak = _in_child(_finetune_child, net, crop, batch, FLAGS.steps,
                                     FLAGS.finetune_data_dir)
        ours.append(synth)
        rss = max(rss, peak)
        if end is not None:
            e2e.append(end)
        if FLAGS.torch_python:
            peer.append(_torch_step(net, crop, batch, FLAGS.steps))
    what = (f"U-Net width {net['base_width']}, {net['levels']} levels, {net['norm']} norm, "
            f"patch {'x'.join(map(str, crop))}, batch {batch}, 11 classes")
    med = statistics.median(ours)
    lines = [f"| rr_tf fine-tuning step ({what}), synthetic batch | median of {FLAGS.rounds} "
             f"rounds {med:.3f} s/step (rounds {', '.join(f'{v:.3f}' for v in ours)}); peak RSS "
             f"{rss:.0f} MB | - |"]
    if e2e:
        lines.append(f"| same, end to end from {FLAGS.finetune_data_dir} (class-balanced "
                     f"patches, affine augmentation) | {statistics.median(e2e):.3f} s/step | - |")
    if peer:
        pmed = statistics.median(p["step_s_median"] for p in peer)
        lines.append(f"| PyTorch {peer[0]['torch_version']} peer, same network (1 output channel, "
                     f"MSE, SGD), {peer[0]['torch_num_threads']} threads | median {pmed:.3f} "
                     f"s/step (rounds {', '.join(str(p['step_s_median']) for p in peer)}) | - |")
        lines.append(f"| ratio rr_tf / PyTorch (medians, same run) | {med / pmed:.2f} | <= 1.2 |")
    return lines


def write_section(path, mode, lines):
    title = "--mode=model --method=all" if mode == "model-all" else f"--mode={mode}"
    header = [f"<!-- {mode}:begin -->", f"## `{title}`", "",
              f"Command: `python launch/benchmark.py --mode={mode.split('-')[0]} "
              + (f"--repeats={FLAGS.repeats} --num_cases={FLAGS.num_cases} "
                 f"--spacing={FLAGS.spacing} --seconds={FLAGS.seconds:g}`  " if mode == "data" else
                 f"--finetune_flagfile={FLAGS.finetune_flagfile} --steps={FLAGS.steps} "
                 f"--rounds={FLAGS.rounds} --finetune_data_dir={FLAGS.finetune_data_dir}"
                 + (" --torch_python=PYTHON_WITH_TORCH" if FLAGS.torch_python else "") + "`  "
                 if mode == "finetune" else
                 f"--method={FLAGS.method}`  " if mode == "memory" else
                 f"--method={FLAGS.method} --steps={FLAGS.steps} --data_dir={FLAGS.data_dir}`  "),
              f"Machine: {machine()}  ",
              f"Date: {datetime.date.today().isoformat()}", "",
              "| what | measured | target |", "|---|---|---|"]
    section = "\n".join(header + lines + [f"<!-- {mode}:end -->"])
    from rr_tf.utils.files import atomic_write

    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    begin, end = f"<!-- {mode}:begin -->", f"<!-- {mode}:end -->"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write(path, text)


def main(argv):
    del argv
    if FLAGS.mode == "e2e":
        flagutil.fail(__file__, "--mode=e2e is not implemented; use --mode=data or --mode=model "
                      "(launch/experiment.py records the timings of a whole experiment)")
    from rr_tf.methods import method_names

    if FLAGS.mode in ("model", "memory") and FLAGS.method not in method_names() + ("all",):
        flagutil.fail(__file__, f"--method={FLAGS.method}: unknown; available: "
                      f"{', '.join(method_names())}, all")
    if FLAGS.mode == "data":
        lines = run_data()
    elif FLAGS.mode == "finetune":
        lines = run_finetune()
    elif FLAGS.mode == "memory":
        lines = run_memory()
    else:
        lines = run_model_all() if FLAGS.method == "all" else run_model()
    print("\n".join(lines))
    if FLAGS.output:
        section = "model-all" if FLAGS.mode == "model" and FLAGS.method == "all" else FLAGS.mode
        write_section(FLAGS.output, section, lines)
        print(f"written to {FLAGS.output}")


if __name__ == "__main__":
    flagutil.main(__file__, main)
