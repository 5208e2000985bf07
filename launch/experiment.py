"""Does pre-training help? Pre-train each method on phantom shards with one
budget, fine-tune from it (and from scratch) with a few labelled cases over
several seeds, segment held-out phantoms, score them, and write the table
and a plot.

  python launch/experiment.py --output_dir=runs/experiment      # RepRec vs scratch, ~1 h on 2 cores (measured)
  python launch/experiment.py --output_dir=runs/experiment --methods=reprec,moco,genesis
  python launch/experiment.py --output_dir=runs/exp_gpu --methods=reprec,mae,moco,simclr,\\
      genesis,pcrl,pcrlv2,pgl --num_labeled=1,2,4,8 --seeds=3 --pretrain_steps=20000 \\
      --finetune_steps=5000 --crop_size=96,96,96 --width=32 --hw=configs/hw/gpu1.flags

Every stage runs the project's own launchers as subprocesses (the commands
are printed and logged in OUTPUT_DIR/commands.txt) and is skipped when its
result exists, so re-running the same command continues an interrupted
experiment. Results: OUTPUT_DIR/results.json, results.md, dice_vs_labels.png;
with --write_docs also docs/results.md and docs/dice_vs_labels.png.
"""

import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from launch import flagutil  # noqa: E402

flagutil.quiet_tensorflow(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", None, "Where data, runs and results go (resumable).")
flags.DEFINE_list("methods", ["reprec"], "Pre-training methods compared (each with its "
                  "configs/demo_<method>.flags model size); 'scratch' is always added. The "
                  "default (RepRec vs scratch) took about 61 min on 2 CPU cores (measured); each "
                  "more method adds about 40 min there.")
flags.DEFINE_list("num_labeled", ["1", "2", "4"], "Labelled-case budgets of the fine-tunings.")
flags.DEFINE_integer("seeds", 2, "Fine-tuning seeds per method and budget (labelled subset, "
                     "initialisation, data order).", lower_bound=1)
flags.DEFINE_integer("pretrain_cases", 16, "Phantom cases for pre-training and fine-tuning "
                     "(the labelled budget is drawn from their training split).", lower_bound=4)
flags.DEFINE_integer("test_cases", 4, "Held-out phantom cases (other seeds) scored.", lower_bound=1)
flags.DEFINE_string("spacing", "3,3,3", "Spacing (mm) of the phantom shards.")
flags.DEFINE_integer("pretrain_steps", 300, "Pre-training steps of every method.", lower_bound=1)
flags.DEFINE_integer("finetune_steps", 150, "Fine-tuning steps of every run.", lower_bound=1)
flags.DEFINE_string("crop_size", "48,48,32", "Pre-training crop and fine-tuning patch size.")
flags.DEFINE_integer("pretrain_batch", 4, "Pre-training batch size.", lower_bound=1)
flags.DEFINE_integer("finetune_batch", 2, "Fine-tuning batch size.", lower_bound=1)
flags.DEFINE_integer("val_cases", 1, "Validation volumes each fine-tuning scores to pick its "
                     "best checkpoint (0 = every val case).", lower_bound=0)
flags.DEFINE_float("finetune_lr", 1e-3, "Fine-tuning learning rate.", lower_bound=0.0)
flags.DEFINE_integer("validations", 1, "Validations per fine-tuning, evenly spaced, the last at "
                     "the end; the best one's weights are scored (1 = the final weights).",
                     lower_bound=1)
flags.DEFINE_float("test_overlap", 0.25, "Sliding-window overlap of the test-set inference.",
                   lower_bound=0.0, upper_bound=0.95)
flags.DEFINE_integer("width", 0, "Override the demo flagfiles' base width (0 = keep).", lower_bound=0)
flags.DEFINE_string("hw", "configs/hw/cpu.flags", "Hardware flagfile for the launchers.")
flags.DEFINE_boolean("write_docs", False, "Also write docs/results.md and docs/dice_vs_labels.png.")
flags.DEFINE_integer("seed", 0, "Data seed.")
flags.mark_flag_as_required("output_dir")
flagutil.register_numbers_validator("spacing", 3, positive=True)
flagutil.register_numbers_validator("crop_size", 3, cast=int, positive=True)


def _log_command(cmd):
    line = " ".join(cmd)
    print(f"$ {line}", file=sys.stderr, flush=True)
    with open(os.path.join(FLAGS.output_dir, "commands.txt"), "a") as f:
        f.write(line + "\n")


def run(cmd):
    _log_command(cmd)
    start = time.time()
    res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        tail = "\n".join(res.stdout.strip().splitlines()[-15:])
        raise RuntimeError(f"command failed ({res.returncode}):\n{tail}")
    return time.time() - start


def finished(run_dir):
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return bool(json.load(f).get("finished"))


def prepare_data(out):
    py = sys.executable
    shards = os.path.join(out, "shards")
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        run([py, "launch/prepare_data.py", "--source=phantom", f"--output_dir={shards}",
             f"--num_cases={FLAGS.pretrain_cases}", f"--spacing={FLAGS.spacing}",
             f"--seed={FLAGS.seed}", "--val_fraction=0.2"])
    test = os.path.join(out, "test")
    if not os.path.isdir(os.path.join(test, "labels")):
        from rr_tf.data.phantom import PhantomConfig, generate_phantom, write_phantom_nifti

        os.makedirs(test, exist_ok=True)
        for i in range(FLAGS.test_cases):
            seed = 10_000 + FLAGS.seed * 1000 + i  # never a seed of the shards
            write_phantom_nifti(generate_phantom(seed, PhantomConfig()), test, f"test_{i:02d}")
    return shards, test


def pretrain(method, shards, out):
    run_dir = os.path.join(out, "pretrain", method)
    if finished(run_dir):
        return run_dir, None
    cmd = [sys.executable, "launch/pretrain.py", f"--flagfile=configs/demo_{method}.flags"
           if method != "reprec" else "--flagfile=configs/demo.flags", f"--flagfile={FLAGS.hw}",
           f"--data_dir={shards}", f"--run_dir={run_dir}", f"--train_steps={FLAGS.pretrain_steps}",
           f"--batch_size={FLAGS.pretrain_batch}", f"--crop_size={FLAGS.crop_size}",
           f"--checkpoint_every={max(FLAGS.pretrain_steps // 3, 1)}", "--warmup_steps=0",
           "--verbose=none", "--prepare_phantom_if_missing=0"]
    if FLAGS.width:
        cmd.append(f"--base_width={FLAGS.width}")
    return run_dir, run(cmd)


def finetune(source, budget, seed, shards, out):
    name = f"{source}_n{budget}_s{seed}"
    run_dir = os.path.join(out, "finetune", name)
    ran = not finished(run_dir)
    if ran:
        cmd = [sys.executable, "launch/finetune.py", f"--flagfile={FLAGS.hw}", f"--data_dir={shards}",
               f"--run_dir={run_dir}", f"--num_labeled={budget}", f"--seed={seed}",
               f"--train_steps={FLAGS.finetune_steps}", f"--crop_size={FLAGS.crop_size}",
               f"--batch_size={FLAGS.finetune_batch}", f"--learning_rate={FLAGS.finetune_lr}",
               f"--val_every={max(FLAGS.finetune_steps // FLAGS.validations, 1)}",
               f"--val_cases={FLAGS.val_cases}",
               f"--checkpoint_every={FLAGS.finetune_steps}", "--verbose=none"]
        if source == "scratch":
            width = FLAGS.width or _demo_width()
            cmd += [f"--base_width={width}", "--levels=4"]
        else:
            cmd.append(f"--pretrained={os.path.join(out, 'pretrain', source)}")
        run(cmd)
    return run_dir, ran


def _demo_width():
    """The CNN width the demo flagfiles pre-train with (scratch uses the same)."""
    with open(os.path.join(ROOT, "configs", "demo.flags")) as f:
        for line in f:
            if line.startswith("--base_width="):
                return int(line.split("=")[1])
    return 4


def score(run_dir, test):
    pred = os.path.join(run_dir, "test_predictions")
    metrics = os.path.join(run_dir, "test_metrics", "metrics.json")
    ran = not os.path.exists(metrics)
    if ran:
        run([sys.executable, "launch/infer.py", f"--model={run_dir}",
             f"--input={os.path.join(test, 'images')}", f"--output={pred}",
             f"--overlap={FLAGS.test_overlap}"])
        run([sys.executable, "launch/evaluate.py", f"--pred={pred}",
             f"--ref={os.path.join(test, 'labels')}", f"--output={os.path.dirname(metrics)}",
             "--label_names=phantom", f"--image={os.path.join(test, 'images')}"])
    with open(metrics) as f:
        return json.load(f), ran


def summarise(results, budgets, sources):
    table = {}
    for src in sources:
        for b in budgets:
            vals = [r["dice"] for r in results if r["source"] == src and r["budget"] == b]
            if vals:
                table[(src, b)] = (float(sum(vals) / len(vals)),
                                   float((sum((v - sum(vals) / len(vals)) ** 2 for v in vals)
                                          / max(len(vals) - 1, 1)) ** 0.5), len(vals))
    return table


def per_run_lines(results, timings):
    """One markdown row per fine-tuning: segmenter, variables loaded, test
    Dice (mean and three organs), the validation step kept, wall time."""
    organs = ("liver", "spleen", "bone")
    lines = ["| run | segmenter | variables loaded | mean Dice | " + " | ".join(organs)
             + " | best val step (Dice) | wall s |", "|---|---|---|---|" + "---|" * len(organs)
             + "---|---|"]
    for r in results:
        d = r["run_dir"]
        with open(os.path.join(d, "test_metrics", "metrics.json")) as f:
            classes = json.load(f)["summary"]["classes"]
        with open(os.path.join(d, "run.json")) as f:
            kind = json.load(f).get("kind")
        loaded = 0
        if os.path.exists(os.path.join(d, "transfer.json")):
            with open(os.path.join(d, "transfer.json")) as f:
                loaded = len(json.load(f)["matched"])
        with open(os.path.join(d, "metrics.json")) as f:
            best = json.load(f).get("best") or {}
        dice = [classes[o]["dice_mean"] for o in organs]
        name = os.path.basename(d)
        val = (f"{best['step']} ({best['mean_dice']:.3f})" if best.get("step") is not None
               else "–")
        lines.append(f"| {name} | {kind} | {loaded} | {r['dice']:.3f} | "
                     + " | ".join("–" if v is None else f"{v:.3f}" for v in dice)
                     + f" | {val} | {timings.get('finetune/' + name, '–')} |")
    return lines


def _write_atomic(path, data, mode="w"):
    with open(path + ".tmp", mode) as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def write_report(out, results, budgets, sources, timings):
    from rr_tf.utils.png import line_plot, encode_png

    table = summarise(results, budgets, sources)
    lines = ["| pre-training | " + " | ".join(f"{b} labelled" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for src in sources:
        cells = []
        for b in budgets:
            if (src, b) in table:
                m, s, n = table[(src, b)]
                cells.append(f"{m:.3f} ± {s:.3f} (n={n})")
            else:
                cells.append("–")
        lines.append(f"| {src} | " + " | ".join(cells) + " |")
    series = {src: [table.get((src, b), (math.nan,))[0] for b in budgets] for src in sources}
    img, colours = line_plot(series, budgets, y_range=(0.0, max(0.1, min(1.0, max(
        (v for vs in series.values() for v in vs if not math.isnan(v)), default=1.0) * 1.2))),
        x_label="labelled cases", y_label="mean Dice (test)",
        title="Dice vs labelled cases")
    png = encode_png(img)
    legend = ", ".join(f"{name}: rgb{c}" for name, c in colours.items())
    _write_atomic(os.path.join(out, "dice_vs_labels.png"), png, "wb")
    report = {"table": "\n".join(lines), "legend": legend, "timings_s": timings,
              "results": results,
              "settings": {k: FLAGS[k].value for k in ("methods", "num_labeled", "seeds",
                                                       "pretrain_cases", "test_cases", "spacing",
                                                       "pretrain_steps", "finetune_steps",
                                                       "crop_size", "pretrain_batch",
                                                       "finetune_batch", "finetune_lr", "val_cases",
                                                       "validations", "test_overlap", "width",
                                                       "hw", "seed")}}
    _write_atomic(os.path.join(out, "results.json"), json.dumps(report, indent=1))
    ran = [f"finetune/{os.path.basename(r['run_dir'])}" for r in results] + [
        f"pretrain/{m}" for m in FLAGS.methods]
    total = sum(timings.get(k, 0) for k in ran)
    md = ["Mean foreground Dice (mean over the 10 organ labels, then over the "
          f"{FLAGS.test_cases} held-out phantoms; mean ± std over seeds):", "",
          *lines, "", f"Plot colours: {legend}.", "",
          "Per fine-tuning (test Dice; the validation step whose weights were kept; wall "
          "time of fine-tuning + inference + scoring):", "", *per_run_lines(results, timings),
          "", f"Wall time of these stages (pre-training, fine-tuning, inference, scoring): "
          f"{total / 60:.0f} min, plus data preparation."]
    _write_atomic(os.path.join(out, "results.md"), "\n".join(md) + "\n")
    return "\n".join(md), png


def write_results_section(path, md):
    """Replace the table between ``<!-- experiment:begin/end -->`` in
    ``path`` (the prose around it stays), or append it; written atomically."""
    begin, end = "<!-- experiment:begin -->", "<!-- experiment:end -->"
    section = f"{begin}\n{md}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Results\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    _write_atomic(path, text)


def main(argv):
    if len(argv) > 1:
        flagutil.fail(__file__, f"unexpected arguments {argv[1:]}")
    from rr_tf.methods import method_names

    unknown = [m for m in FLAGS.methods if m not in method_names()]
    if unknown:
        flagutil.fail(__file__, f"--methods: unknown {unknown}; available: {', '.join(method_names())}")
    try:
        budgets = [int(b) for b in FLAGS.num_labeled]
    except ValueError:
        flagutil.fail(__file__, f"--num_labeled: need integers, got {FLAGS.num_labeled}")
    out = os.path.abspath(FLAGS.output_dir)
    os.makedirs(out, exist_ok=True)
    sources = ["scratch"] + list(FLAGS.methods)
    timings = {}  # stage -> wall seconds, kept from earlier invocations of this experiment
    if os.path.exists(os.path.join(out, "results.json")):
        with open(os.path.join(out, "results.json")) as f:
            timings = json.load(f).get("timings_s", {})
    try:
        shards, test = prepare_data(out)
        for method in FLAGS.methods:
            _, seconds = pretrain(method, shards, out)
            if seconds:
                timings[f"pretrain/{method}"] = round(seconds)
        results = []
        for src in sources:
            for b in budgets:
                for seed in range(FLAGS.seeds):
                    start = time.time()
                    run_dir, trained = finetune(src, b, seed, shards, out)
                    metrics, scored = score(run_dir, test)
                    if trained or scored:  # else the time of an earlier invocation stays
                        timings[f"finetune/{src}_n{b}_s{seed}"] = round(time.time() - start)
                    results.append({"source": src, "budget": b, "seed": seed,
                                    "dice": metrics["summary"]["overall"]["dice_class_mean"]
                                    if "summary" in metrics else metrics["overall"]["dice_class_mean"],
                                    "run_dir": run_dir})
                    print(f"{src} n={b} seed={seed}: Dice {results[-1]['dice']:.3f}", file=sys.stderr)
    except RuntimeError as err:
        flagutil.fail(__file__, str(err), code=1)
    md, png = write_report(out, results, budgets, sources, timings)
    print(md)
    if FLAGS.write_docs:
        _write_atomic(os.path.join(ROOT, "docs", "dice_vs_labels.png"), png, "wb")
        write_results_section(os.path.join(ROOT, "docs", "results.md"), md)


if __name__ == "__main__":
    flagutil.main(__file__, main)
