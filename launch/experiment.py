"""Does pre-training help? A paired, seeded comparison on phantoms.

Three data sets of disjoint phantom seeds (checked; recorded in
results.json):
  pool      --pool_cases unlabelled-use phantoms (data seed --pool_seed, at
            --pool_spacing, default the fine-tuning spacing so the
            preprocessing specs match): the only data pre-training reads.
  labelled  --finetune_cases phantoms (data seed --labelled_seed) at the
            fine-tuning recipe's spacing (6 mm): the only data fine-tuning
            reads; the budget of --num_labeled cases comes from its
            training split.
  test      --test_cases held-out phantoms (data seed --test_seed) written as
            NIfTI, segmented by launch/infer.py, scored by launch/evaluate.py.

Each method of --methods is pre-trained once on the pool (its
configs/demo_<method>.flags model; steps x batch and wall time recorded).
Every fine-tuning starts from --recipe (configs/demo_finetune.flags, the
measured recipe: patch size, sampling, augmentation, optimiser), overriding
only data_dir, run_dir, num_labeled, seed, train_steps, validation cadence
and --prepare_phantom_if_missing=0. The scratch arm is a U-Net of the
pre-trained CNN's width (--width, else configs/demo.flags' base width) and
4 levels.

Paired design: in every arm the fine-tuning of seed s runs with --seed=s,
and launch/finetune.py's --seed alone picks the labelled subset
(choose_labeled: a permutation of the sorted labelled training cases, which
depends on the seed and the manifest only), the patch stream (sampling and
augmentation) and the Keras global seed. So for one seed every arm
fine-tunes on the same labelled cases with the same patches in the same
order, and arms whose segmenter is the scratch arm's U-Net (same width and
levels) should draw the same initial weights for their new layers, the
encoder being built (then overwritten) first in both; arms with another
segmenter (RepRec's hybrid, MAE's UNETR) share the cases and the stream but
not the draws of their new layers. (The same-draws claim follows from the
shared global seed and build order; it is not checked layer by layer.)
Architecture-matched controls (--controls, on by default): a method whose
segmenter is not the scratch U-Net (RepRec's hybrid, MAE's UNETR) also gets
the arm '<method>-random': the same segmenter, built from the method's
pre-training run with --load_weights=false, i.e. random weights. Its gain
over scratch is the architecture's; the method's gain over its control is
the pre-trained weights' (reported as vs_control). U-Net methods need none:
the scratch arm is their architecture.
The statistics (rr_tf/stats.py) are the paired differences arm - scratch
per seed, their mean and a 95 % percentile bootstrap interval of that mean
(10,000 resamples, seeded), overall and per organ.

Presets (--preset sets defaults; any flag given explicitly wins):
  quick  RepRec vs scratch (and RepRec's control), budgets 1 and 4, 3 seeds
         (18 fine-tunings; 12 before the control arm existed), pool
         of 24, 4 test phantoms, 300 pre-training steps of batch 4, 300
         fine-tuning steps, CNN width 4 (the demo flagfiles'). Measured
         2026-12-03, without the control arm: 28 min on 2 CPU cores
         alone (data 1, pre-training 4.4, 12 fine-tunings 23 min). Earlier estimate, before it was run
         (pre-training 300 x 4 took about 8 min uncontended on 2026-11-22;
         a fine-tuning's fixed cost, i.e. start, 1 validation, export,
         inference on 1 test phantom and scoring, measured 0.8 min in the
         smoke run below; 300 steps at width 4 are estimated at 1.2-1.8 min
         from the recipe's measured 0.37-0.49 s/step at width 8). Its
         intervals are wide: with 3 seeds the half-width is about
         2.0 s / sqrt(3) = 1.15 s, so it resolves gross effects only.
  full   scratch, reprec, mae, moco, genesis, pcrlv2; budgets 1, 2, 4;
         8 seeds (144 fine-tunings); pool of 240; 10 test phantoms; 2000
         pre-training steps of batch 4; the recipe's 3000 fine-tuning steps
         at its width 8, validated 6 times on the recipe's 2 cases.
         ESTIMATED 2.5-3 days on 2 CPU cores (20-25 min per fine-tuning as
         measured for the recipe in docs/results.md), hours on a GPU.
  gpu    a larger preset, not run: the full arms plus simclr, pcrl and pgl,
         budgets 1, 2, 4, 8, 10 seeds, pool of 400, 20000 pre-training steps
         of batch 8 at width 16, the recipe's 3000 fine-tuning steps,
         --hw=configs/hw/gpu1.flags.
Any of the nine methods can be named with --methods in every preset.

Seeds: the paired interval's half-width is about 2.0 s / sqrt(n) for n
seeds whose paired differences (arm - scratch) have std s. Resolving 5 Dice
points at 1 labelled case (half-width <= 0.05) needs
n >= (2.0 s / 0.05) ** 2. The 2026-11-22 experiment (150 steps, 2 seeds,
1 labelled case) measured s = 0.016-0.037 (RepRec, MoCo, Genesis vs
scratch), which n = 3 would already resolve; but those Dice were near 0.08,
and at the recipe's Dice (0.47 with 1 case) the spread is expected to be
larger, so the full preset takes n = 8, which resolves 0.05 for any s up to
0.05 * sqrt(8) / 2 = 0.07. results.md reports each comparison's measured s,
its interval's half-width and the seeds that s needs, so the choice can be
revised from the experiment's own spread.

Smoke run (2026-12-03, 2 CPU cores shared with a fine-tuning): --pool_cases=4
--finetune_cases=5 --test_cases=1 --seeds=1 --num_labeled=1
--pretrain_steps=4 --pretrain_batch=4 --finetune_steps=4 --val_cases=1
--methods=reprec took 2 min 15 s after its data (about 25 s) was made.

  python launch/experiment.py --output_dir=runs/experiment                 # quick
  python launch/experiment.py --output_dir=runs/experiment_full --preset=full
  python launch/experiment.py --output_dir=runs/experiment_gpu --preset=gpu

Resuming: fine-tunings run seed by seed (every arm and budget of seed 0,
then seed 1, ...), so an experiment stopped part-way holds complete pairs.
Every finished fine-tuning leaves its score in
OUTPUT_DIR/scores/<arm>_n<budget>_s<seed>.json (Dice overall and per organ,
no weights) and is never launched again; pre-training compute is kept in
OUTPUT_DIR/scores/pretrain_<method>.json. Copying the scores folder to a
fresh machine and re-running the same command continues the experiment
(the run directories are not needed; a method whose fine-tunings are all
scored is not pre-trained again). Commands are logged in
OUTPUT_DIR/commands.txt. Outputs: OUTPUT_DIR/results.json, results.md and
(with the optional matplotlib, `pip install -e .[plots]`)
dice_vs_labels.png; with --write_docs also docs/results.json, the marked
section of docs/results.md and docs/dice_vs_labels.png.
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
from launch.experiment_report import (  # noqa: E402
    PLOT_HINT, _dump, _write_atomic, write_outputs)

flagutil.quiet_tensorflow(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS

PRESETS = {
    "quick": dict(methods=["reprec"], num_labeled=[1, 4], seeds=3, pool_cases=24,
                  test_cases=4, pretrain_steps=300, pretrain_batch=4, finetune_steps=300,
                  validations=1, val_cases=1, width=0, hw="configs/hw/cpu.flags"),
    "full": dict(methods=["reprec", "mae", "moco", "genesis", "pcrlv2"], num_labeled=[1, 2, 4],
                 seeds=8, pool_cases=240, test_cases=10, pretrain_steps=2000, pretrain_batch=4,
                 finetune_steps=0, validations=6, val_cases=0, width=8,
                 hw="configs/hw/cpu.flags"),
    "gpu": dict(methods=["reprec", "mae", "moco", "genesis", "pcrlv2", "simclr", "pcrl", "pgl"],
                num_labeled=[1, 2, 4, 8], seeds=10, pool_cases=400, test_cases=10,
                pretrain_steps=20000, pretrain_batch=8, finetune_steps=0, validations=6,
                val_cases=0, width=16, hw="configs/hw/gpu1.flags"),
}
# finetune_steps 0 and val_cases 0 mean "the recipe's" (3000 steps, 2 val cases).

flags.DEFINE_string("output_dir", None, "Where data, runs, scores and results go (resumable).")
flags.DEFINE_enum("preset", "quick", sorted(PRESETS), "Defaults of the experiment's size: quick "
                  "(about an hour on 2 CPU cores, estimated), full (every main method, 8 seeds), "
                  "gpu (larger); any flag given explicitly overrides its preset value.")
flags.DEFINE_list("methods", None, "Pre-training methods compared with scratch (each pre-trained "
                  "from configs/demo_<method>.flags); default: the preset's.")
flags.DEFINE_list("num_labeled", None, "Labelled-case budgets, e.g. 1,2,4; default: the preset's.")
flags.DEFINE_integer("seeds", None, "Fine-tuning seeds 0..N-1 per arm and budget (paired across "
                     "arms); default: the preset's.", lower_bound=1)
flags.DEFINE_integer("pool_cases", None, "Phantoms in the pre-training pool; default: the "
                     "preset's.", lower_bound=1)
flags.DEFINE_string("pool_spacing", None, "Spacing (mm) of the pool's shards; default: the "
                    "recipe's --phantom_spacing, so pre-training and fine-tuning specs match.")
flags.DEFINE_integer("finetune_cases", 16, "Phantoms of the labelled fine-tuning shards (20 % "
                     "validation); the budget is drawn from their training split.", lower_bound=4)
flags.DEFINE_integer("test_cases", None, "Held-out test phantoms scored; default: the preset's.",
                     lower_bound=1)
flags.DEFINE_integer("pool_seed", 2000, "Data seed of the pool (launch/prepare_data.py --seed).",
                     lower_bound=0)
flags.DEFINE_integer("labelled_seed", 0, "Data seed of the labelled shards (0: the shards the "
                     "recipe was measured on).", lower_bound=0)
flags.DEFINE_integer("test_seed", 1000, "Data seed of the held-out test phantoms (1000: the set "
                     "the recipe was measured on).", lower_bound=0)
flags.DEFINE_integer("pretrain_steps", None, "Pre-training steps of every method; default: the "
                     "preset's.", lower_bound=1)
flags.DEFINE_integer("pretrain_batch", None, "Pre-training batch size; default: the preset's.",
                     lower_bound=1)
flags.DEFINE_string("crop_size", "48,48,32", "Pre-training crop (the recipe's fine-tuning patch "
                    "size is kept).")
flags.DEFINE_integer("finetune_steps", None, "Fine-tuning steps of every run (0 = the recipe's "
                     "--train_steps); default: the preset's.", lower_bound=0)
flags.DEFINE_integer("validations", None, "Validations per fine-tuning, evenly spaced, the last at "
                     "the end; the best one's weights are scored; default: the preset's.",
                     lower_bound=1)
flags.DEFINE_integer("val_cases", None, "Validation volumes per validation (0 = the recipe's "
                     "--val_cases); default: the preset's.", lower_bound=0)
flags.DEFINE_float("test_overlap", 0.25, "Sliding-window overlap of the test-set inference.",
                   lower_bound=0.0, upper_bound=0.95)
flags.DEFINE_integer("width", None, "Base width of every pre-trained CNN and of the scratch U-Net "
                     "(0 = the demo flagfiles' own); default: the preset's.", lower_bound=0)
flags.DEFINE_string("recipe", "configs/demo_finetune.flags", "Flagfile every fine-tuning starts "
                    "from (the measured recipe).")
flags.DEFINE_string("hw", None, "Hardware flagfile for the launchers; default: the preset's.")
flags.DEFINE_integer("resamples", 10_000, "Bootstrap resamples of the paired intervals.",
                     lower_bound=100)
flags.DEFINE_boolean("controls", True, "Also fine-tune, for each method whose segmenter is not "
                     "the scratch U-Net (RepRec's hybrid, MAE's UNETR), that segmenter from random "
                     "weights (arm '<method>-random', launch/finetune.py --load_weights=false), so a "
                     "gain over scratch splits into architecture and pre-training.")
flags.DEFINE_boolean("write_docs", False, "Also write docs/results.json, the marked section of "
                     "docs/results.md and docs/dice_vs_labels.png.")
flags.mark_flag_as_required("output_dir")
flagutil.register_numbers_validator("pool_spacing", 3, positive=True)
flagutil.register_numbers_validator("crop_size", 3, cast=int, positive=True)

DOCS = os.path.join(ROOT, "docs")


def settings():
    """The experiment's parameters: each flag given explicitly, else its
    preset's value; paths and recipe values resolved. Raises ValueError
    with one line on a bad value."""
    preset = PRESETS[FLAGS.preset]
    s = {"preset": FLAGS.preset}
    for name in ("methods", "num_labeled", "seeds", "pool_cases", "test_cases", "pretrain_steps",
                 "pretrain_batch", "finetune_steps", "validations", "val_cases", "width", "hw"):
        value = FLAGS[name].value
        s[name] = preset[name] if value is None else value
    try:
        s["num_labeled"] = [int(b) for b in s["num_labeled"]]
    except ValueError:
        raise ValueError(f"--num_labeled: need integers, got {','.join(s['num_labeled'])}")
    if not s["num_labeled"] or min(s["num_labeled"]) < 1:
        raise ValueError(f"--num_labeled: need budgets >= 1, got {s['num_labeled']}")
    from rr_tf.methods import method_names

    unknown = [m for m in s["methods"] if m not in method_names()]
    if unknown or not s["methods"]:
        raise ValueError(f"--methods: unknown {unknown or 'none given'}; available: "
                         f"{', '.join(method_names())}")
    recipe = os.path.join(ROOT, FLAGS.recipe)
    if not os.path.exists(recipe):
        raise ValueError(f"--recipe={FLAGS.recipe}: no such flagfile")
    if not os.path.exists(os.path.join(ROOT, s["hw"])):
        raise ValueError(f"--hw={s['hw']}: no such flagfile")
    s["recipe"] = FLAGS.recipe
    s["finetune_spacing"] = flagfile_value(recipe, "phantom_spacing") or "3,3,3"
    s["pool_spacing"] = FLAGS.pool_spacing or s["finetune_spacing"]
    s["finetune_steps"] = s["finetune_steps"] or int(flagfile_value(recipe, "train_steps") or 3000)
    s["val_cases"] = s["val_cases"] or int(flagfile_value(recipe, "val_cases") or 0)
    s["width"] = s["width"] or demo_width()
    for name in ("finetune_cases", "pool_seed", "labelled_seed", "test_seed", "crop_size",
                 "test_overlap", "resamples", "controls"):
        s[name] = FLAGS[name].value
    return s


def flagfile_value(path, name):
    """The value of ``--name=`` in a flagfile (the last one; nested
    flagfiles are not followed), or None."""
    value = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith(f"--{name}="):
                value = line.split("=", 1)[1]
    return value


def demo_width():
    """The CNN width the demo flagfiles pre-train with (scratch uses the same)."""
    return int(flagfile_value(os.path.join(ROOT, "configs", "demo.flags"), "base_width") or 4)


# --------------------------------------------------------------------------- running stages

def _log_command(out, cmd):
    line = " ".join(cmd)
    print(f"$ {line}", file=sys.stderr, flush=True)
    with open(os.path.join(out, "commands.txt"), "a") as f:
        f.write(line + "\n")


def run(out, cmd):
    """Runs a launcher (logged); returns its wall seconds; RuntimeError with
    the output's tail when it fails."""
    _log_command(out, cmd)
    start = time.time()
    res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        tail = "\n".join(res.stdout.strip().splitlines()[-15:])
        raise RuntimeError(f"command failed ({res.returncode}): {' '.join(cmd[:2])}\n{tail}")
    return time.time() - start


def finished(run_dir):
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return bool(json.load(f).get("finished"))


def _read_json(path):
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- data

def planned_seeds(s):
    """The phantom seeds each data set will hold: ``{set: [seed, ...]}``."""
    from rr_tf.data.sources import phantom_seed

    return {"pool": [phantom_seed(s["pool_seed"], i) for i in range(s["pool_cases"])],
            "labelled": [phantom_seed(s["labelled_seed"], i) for i in range(s["finetune_cases"])],
            "test": [phantom_seed(s["test_seed"], i) for i in range(s["test_cases"])]}


def check_disjoint(seed_sets):
    """Raises ValueError (one line) when two data sets share a phantom seed."""
    names = list(seed_sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sorted(set(seed_sets[a]) & set(seed_sets[b]))
            if common:
                raise ValueError(f"the {a} and {b} phantoms overlap: {len(common)} shared phantom "
                                 f"seed(s) ({', '.join(map(str, common[:3]))}"
                                 f"{', ...' if len(common) > 3 else ''}); give them other data "
                                 "seeds (--pool_seed, --labelled_seed, --test_seed)")


def manifest_seeds(data_dir):
    """The ``phantom_seed`` of every case in a data set's manifest."""
    cases = _read_json(os.path.join(data_dir, "manifest.json"))["cases"]
    missing = [c["case_id"] for c in cases if "phantom_seed" not in c]
    if missing:
        raise ValueError(f"{data_dir}: manifest.json records no phantom_seed for {missing[0]} "
                         "(not phantom data?)")
    return [int(c["phantom_seed"]) for c in cases]


def prepare_data(out, s):
    """Generates the pool and labelled shards and the test NIfTI pairs
    (each skipped when present), checks their phantom seeds are disjoint
    and records them in OUTPUT_DIR/data.json. Returns the three paths."""
    check_disjoint(planned_seeds(s))  # before spending minutes on generation
    py = sys.executable
    pool, labelled, test = (os.path.join(out, "data", n) for n in ("pool", "labelled", "test"))
    if not os.path.exists(os.path.join(pool, "manifest.json")):
        run(out, [py, "launch/prepare_data.py", "--source=phantom", f"--output_dir={pool}",
                  f"--num_cases={s['pool_cases']}", f"--spacing={s['pool_spacing']}",
                  f"--seed={s['pool_seed']}", "--val_fraction=0", "--progress=false"])
    if not os.path.exists(os.path.join(labelled, "manifest.json")):
        run(out, [py, "launch/prepare_data.py", "--source=phantom", f"--output_dir={labelled}",
                  f"--num_cases={s['finetune_cases']}", f"--spacing={s['finetune_spacing']}",
                  f"--seed={s['labelled_seed']}", "--val_fraction=0.2", "--progress=false"])
    if len(_nifti(os.path.join(test, "labels"))) < s["test_cases"]:
        run(out, [py, "launch/prepare_data.py", "--source=phantom", f"--write_nifti={test}",
                  f"--num_cases={s['test_cases']}", f"--seed={s['test_seed']}",
                  "--progress=false"])
    seeds = {"pool": manifest_seeds(pool), "labelled": manifest_seeds(labelled),
             "test": planned_seeds(s)["test"]}
    check_disjoint(seeds)
    record = data_record(s, seeds)
    _write_atomic(os.path.join(out, "data.json"), _dump(record))
    return pool, labelled, test


def _nifti(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".nii.gz")) if os.path.isdir(folder) else []


def data_record(s, seeds):
    """What results.json says about the three data sets."""
    return {
        "pool": {"use": "pre-training only (no labels read)", "data_seed": s["pool_seed"],
                 "cases": len(seeds["pool"]), "spacing_mm": s["pool_spacing"],
                 "phantom_seeds": seeds["pool"]},
        "labelled": {"use": "fine-tuning only (budget from the training split)",
                     "data_seed": s["labelled_seed"], "cases": len(seeds["labelled"]),
                     "spacing_mm": s["finetune_spacing"], "phantom_seeds": seeds["labelled"]},
        "test": {"use": "held-out scoring (NIfTI, own grid)", "data_seed": s["test_seed"],
                 "cases": len(seeds["test"]), "phantom_seeds": seeds["test"]},
        "disjoint": True}


# --------------------------------------------------------------------------- training

def score_path(out, arm, budget, seed):
    return os.path.join(out, "scores", f"{arm}_n{budget}_s{seed}.json")


def pretrain_record_path(out, method):
    return os.path.join(out, "scores", f"pretrain_{method}.json")


def pretrain(out, s, method, pool):
    """Pre-trains ``method`` on the pool unless finished; records its
    compute (steps x batch, wall time of the invocations that trained)."""
    run_dir = os.path.join(out, "pretrain", method)
    record_path = pretrain_record_path(out, method)
    record = _read_json(record_path) if os.path.exists(record_path) else {"wall_s": 0.0}
    if not finished(run_dir):
        flagfile = "configs/demo.flags" if method == "reprec" else f"configs/demo_{method}.flags"
        cmd = [sys.executable, "launch/pretrain.py", f"--flagfile={flagfile}",
               f"--flagfile={s['hw']}", f"--data_dir={pool}", f"--run_dir={run_dir}",
               f"--train_steps={s['pretrain_steps']}", f"--batch_size={s['pretrain_batch']}",
               f"--crop_size={s['crop_size']}",
               f"--checkpoint_every={max(s['pretrain_steps'] // 3, 1)}", "--warmup_steps=0",
               "--probe_every=0", "--verbose=none", "--prepare_phantom_if_missing=0"]
        if has_width(method):  # not MAE's ViT (a flag of another method is an error)
            cmd.append(f"--base_width={s['width']}")
        record["wall_s"] = float(record.get("wall_s", 0.0)) + run(out, cmd)
    record.update(method=method, steps=s["pretrain_steps"], batch=s["pretrain_batch"],
                  steps_x_batch=s["pretrain_steps"] * s["pretrain_batch"])
    os.makedirs(os.path.dirname(record_path), exist_ok=True)
    _write_atomic(record_path, _dump(record))
    return run_dir


def has_width(method):
    """Whether ``method``'s Config has a CNN ``base_width``."""
    import dataclasses

    from rr_tf.methods import get_method

    return "base_width" in {f.name for f in dataclasses.fields(get_method(method).Config)}


def finetune_and_score(out, s, arm, budget, seed, labelled, test):
    """One fine-tuning from the recipe, its inference on the test phantoms
    and its scoring; writes and returns the score record."""
    py = sys.executable
    name = f"{arm}_n{budget}_s{seed}"
    run_dir = os.path.join(out, "finetune", name)
    start = time.time()
    if not finished(run_dir):
        steps = s["finetune_steps"]
        cmd = [py, "launch/finetune.py", f"--flagfile={s['recipe']}", f"--flagfile={s['hw']}",
               f"--data_dir={labelled}", f"--run_dir={run_dir}", f"--num_labeled={budget}",
               f"--seed={seed}", f"--train_steps={steps}", "--prepare_phantom_if_missing=0",
               f"--val_every={max(steps // s['validations'], 1)}",
               f"--val_cases={s['val_cases']}", f"--checkpoint_every={steps}", "--verbose=none"]
        if arm == "scratch":
            cmd += [f"--base_width={s['width']}", "--levels=4"]
        else:
            cmd.append(f"--pretrained={os.path.join(out, 'pretrain', method_of(arm))}")
            if arm.endswith(CONTROL):
                cmd.append("--load_weights=false")
        run(out, cmd)
    pred = os.path.join(run_dir, "test_predictions")
    metrics_dir = os.path.join(run_dir, "test_metrics")
    run(out, [py, "launch/infer.py", f"--model={run_dir}", f"--input={os.path.join(test, 'images')}",
              f"--output={pred}", f"--overlap={s['test_overlap']}"])
    run(out, [py, "launch/evaluate.py", f"--pred={pred}", f"--ref={os.path.join(test, 'labels')}",
              f"--output={metrics_dir}", "--label_names=phantom", "--progress=false",
              f"--image={os.path.join(test, 'images')}"])
    record = score_record(arm, budget, seed, run_dir, time.time() - start, s["finetune_steps"])
    path = score_path(out, arm, budget, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_atomic(path, _dump(record))
    return record


def score_record(arm, budget, seed, run_dir, wall_s, steps):
    """The small JSON a finished fine-tuning leaves: test Dice overall and per
    organ, segmenter, variables loaded, validation step kept, wall time."""
    summary = _read_json(os.path.join(run_dir, "test_metrics", "metrics.json"))["summary"]
    run_json = _read_json(os.path.join(run_dir, "run.json"))
    transfer = os.path.join(run_dir, "transfer.json")
    best = {}
    if os.path.exists(os.path.join(run_dir, "metrics.json")):
        best = _read_json(os.path.join(run_dir, "metrics.json")).get("best") or {}
    return {"arm": arm, "budget": budget, "seed": seed,
            "dice": summary["overall"]["dice_class_mean"],
            "organs": {k: v.get("dice_mean") for k, v in summary["classes"].items()},
            "segmenter": run_json.get("kind"),
            "loaded": len(_read_json(transfer)["matched"]) if os.path.exists(transfer) else 0,
            "best_val": {"step": best.get("step"), "dice": best.get("mean_dice")},
            "finetune_steps": steps, "wall_s": round(wall_s, 1), "run_dir": run_dir}


def load_scores(out):
    """Every fine-tuning score record under OUTPUT_DIR/scores."""
    folder = os.path.join(out, "scores")
    if not os.path.isdir(folder):
        return []
    return [_read_json(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
            if f.endswith(".json") and not f.startswith("pretrain_")]


CONTROL = "-random"


def controls(s):
    """{method: its architecture-matched random-initialisation arm} for the
    methods whose segmenter is not the scratch arm's U-Net (none unless
    ``s["controls"]``)."""
    from rr_tf.models.segmenter_base import segmenter_kind_for_method

    if not s.get("controls"):
        return {}
    return {m: m + CONTROL for m in s["methods"] if segmenter_kind_for_method(m) != "unet"}


def arms_of(s):
    """scratch, the methods, then their controls."""
    return ["scratch"] + list(s["methods"]) + list(controls(s).values())


def method_of(arm):
    """The pre-training an arm fine-tunes from (None for scratch)."""
    if arm == "scratch":
        return None
    return arm[:-len(CONTROL)] if arm.endswith(CONTROL) else arm


def run_experiment(out, s):
    """Runs what is missing, arm by arm; returns the score records of this
    experiment's grid. A fine-tuning whose score JSON exists is skipped, and
    so is any data preparation or pre-training only it would need (a
    control arm needs its method's pre-training run for the architecture)."""
    arms = arms_of(s)
    # seed-major: each seed's arms finish together, so an experiment stopped part-way
    # (and resumed in another sitting) already holds complete pairs
    grid = [(a, b, seed) for seed in range(s["seeds"]) for b in s["num_labeled"] for a in arms]
    todo = [g for g in grid if not os.path.exists(score_path(out, *g))]
    for g in grid:
        if g not in todo:
            steps = _read_json(score_path(out, *g)).get("finetune_steps")
            if steps != s["finetune_steps"]:
                raise ValueError(f"{score_path(out, *g)} was scored after {steps} fine-tuning "
                                 f"steps, this run asks {s['finetune_steps']}; use another "
                                 "--output_dir (or the same settings)")
    for arm, budget, seed in grid:
        if (arm, budget, seed) not in todo:
            print(f"{arm} n={budget} seed={seed}: scored before, skipped", file=sys.stderr)
    if todo:
        pool, labelled, test = prepare_data(out, s)
        for method in s["methods"]:
            if any(method_of(a) == method for a, _, _ in todo):
                pretrain(out, s, method, pool)
        for arm, budget, seed in todo:
            rec = finetune_and_score(out, s, arm, budget, seed, labelled, test)
            print(f"{arm} n={budget} seed={seed}: Dice {rec['dice']:.3f} "
                  f"({rec['wall_s'] / 60:.1f} min)", file=sys.stderr, flush=True)
    wanted = set(grid)
    return [r for r in load_scores(out) if (r["arm"], r["budget"], r["seed"]) in wanted]


# --------------------------------------------------------------------------- statistics

def _paired(recs, base, resamples, seed):
    """Paired difference recs - base (both {seed: score record}) overall
    and per organ."""
    from rr_tf import stats

    p = stats.paired_difference({sd: r["dice"] for sd, r in recs.items()},
                                {sd: r["dice"] for sd, r in base.items()}, resamples, seed)
    out = dict(paired_seeds=p["seeds"], diffs=p["diffs"], diff_mean=p["diff_mean"],
               diff_std=p["diff_std"], diff_ci95=p["diff_ci95"], organs={})
    for o in sorted({o for r in recs.values() for o in r.get("organs", {})}):
        q = stats.paired_difference({sd: r.get("organs", {}).get(o) for sd, r in recs.items()},
                                    {sd: r.get("organs", {}).get(o) for sd, r in base.items()},
                                    resamples, seed)
        out["organs"][o] = {"diff_mean": q["diff_mean"], "diff_ci95": q["diff_ci95"]}
    return out


def summarise(scores, arms, budgets, resamples=10_000, seed=0, control_of=None):
    """Per budget and arm: per-seed Dice, mean (with a bootstrap interval),
    and for every arm but scratch the paired difference arm - scratch per
    seed with its mean and 95 % bootstrap interval; the same per organ.
    For a method with a control arm (``control_of``: {method: arm}) also
    ``vs_control``: the paired difference method - control (the gain of the
    pre-trained weights in the same architecture).
    ``{str(budget): {arm: {...}}}`` (budgets and arms without scores left out)."""
    from rr_tf import stats

    control_of = control_of or {}
    out = {}
    for b in budgets:
        by_arm = {a: {r["seed"]: r for r in scores if r["arm"] == a and r["budget"] == b}
                  for a in arms}
        base = by_arm.get("scratch", {})
        row = {}
        for a in arms:
            recs = by_arm[a]
            if not recs:
                continue
            seeds = sorted(recs)
            dice = {sd: recs[sd]["dice"] for sd in seeds}
            d = stats.describe([dice[sd] for sd in seeds], resamples, seed)
            entry = {"seeds": seeds, "dice": [dice[sd] for sd in seeds], "mean": d["mean"],
                     "std": d["std"], "mean_ci95": d["ci95"], "organs": {}}
            vs = _paired(recs, base, resamples, seed) if a != "scratch" else {"organs": {}}
            entry.update({k: v for k, v in vs.items() if k != "organs"})
            for o in sorted({o for r in recs.values() for o in r.get("organs", {})}):
                od = [recs[sd].get("organs", {}).get(o) for sd in seeds]
                vals = [v for v in od if v is not None]
                entry["organs"][o] = dict(
                    {"dice": od, "mean": float(sum(vals) / len(vals)) if vals else math.nan},
                    **vs["organs"].get(o, {}))
            if by_arm.get(control_of.get(a)):
                entry["vs_control"] = dict(_paired(recs, by_arm[control_of[a]], resamples, seed),
                                           arm=control_of[a])
            row[a] = entry
        if row:
            out[str(b)] = row
    return out


def power_notes(table, target=0.05):
    """Per budget and method: the paired std, the interval's half-width with
    the seeds run (2.0 s / sqrt(n)) and the seeds that would resolve
    ``target`` Dice ((2.0 s / target) ** 2)."""
    from rr_tf import stats

    notes = {}
    for b, row in table.items():
        for a, e in row.items():
            if a == "scratch" or "diff_std" not in e:
                continue
            n, sd = len(e["diffs"]), e["diff_std"]
            notes.setdefault(b, {})[a] = {
                "n": n, "diff_std": sd,
                "half_width": stats.half_width(sd, n) if n >= 2 else math.nan,
                "ci_half_width": ((e["diff_ci95"][1] - e["diff_ci95"][0]) / 2
                                  if e["diff_ci95"][0] is not None
                                  and not math.isnan(e["diff_ci95"][0]) else math.nan),
                "seeds_for_0.05": stats.seeds_needed(sd, target)}
    return notes


def build_results(s, scores, pretraining, data, timings=None):
    """The results.json document."""
    arms = arms_of(s)
    table = summarise(scores, arms, s["num_labeled"], s["resamples"], control_of=controls(s))
    return {
        "preset": s["preset"],
        "arms": arms,
        "controls": controls(s),
        "settings": {k: v for k, v in s.items()},
        "data": data,
        "pretraining": pretraining,
        "bootstrap": {"resamples": s["resamples"], "rng_seed": 0, "level": 0.95,
                      "kind": "percentile, over seeds, of the mean paired difference"},
        "results": table,
        "power": power_notes(table),
        "runs": sorted(({k: r.get(k) for k in ("arm", "budget", "seed", "dice", "segmenter",
                                                "loaded", "best_val", "wall_s")}
                        for r in scores), key=lambda r: (r["arm"], r["budget"], r["seed"])),
        "wall_s": timings or {},
    }


def main(argv):
    if len(argv) > 1:
        flagutil.fail(__file__, f"unexpected arguments {argv[1:]}")
    try:
        s = settings()
        check_disjoint(planned_seeds(s))
    except ValueError as err:
        flagutil.fail(__file__, str(err))
    out = os.path.abspath(FLAGS.output_dir)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    try:
        scores = run_experiment(out, s)
    except ValueError as err:
        flagutil.fail(__file__, str(err))
    except RuntimeError as err:
        flagutil.fail(__file__, str(err), code=1)
    pretraining = {m: _read_json(pretrain_record_path(out, m)) for m in s["methods"]
                   if os.path.exists(pretrain_record_path(out, m))}
    data_json = os.path.join(out, "data.json")
    data = _read_json(data_json) if os.path.exists(data_json) else data_record(s, planned_seeds(s))
    res = build_results(s, scores, pretraining, data, {"this_invocation": round(time.time() - start)})
    md, plotted = write_outputs(out, res, DOCS if FLAGS.write_docs else None)
    print(md)
    if not plotted:
        print(f"plot skipped: matplotlib is not installed ({PLOT_HINT})", file=sys.stderr)


if __name__ == "__main__":
    flagutil.main(__file__, main)
