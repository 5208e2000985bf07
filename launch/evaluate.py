r"""Score predicted label maps against reference label maps: Dice, HD95, volumes.

Examples:
  python launch/evaluate.py --pred=runs/ft/predictions --ref=/data/ct/labels \
      --output=runs/ft/evaluation --image=/data/ct/images
  python launch/evaluate.py --pred=case_07_pred.nii.gz --ref=case_07.nii.gz \
      --labels=1,2,3 --label_names=liver,spleen,kidney_right
  # the names recorded by prepare_data.py (manifest.json) or in the model's export:
  python launch/evaluate.py --pred=runs/ft/predictions --ref=/data/ct/labels \
      --label_names=from:runs/ft

--pred and --ref are both NIfTI files, or both folders whose files are
matched by case name (the file name without .nii / .nii.gz). Every
prediction must lie on its reference's grid (same shape and affine): write
predictions back in the reference geometry (launch/infer.py does).

Writes to --output (each file atomically):
  per_case.csv  one row per case and label: status, dice, hd95_mm, pred_ml, ref_ml
  summary.csv   one row per label (n, mean and std of Dice and HD95, counts of
                missed / false-positive cases), then 'overall' (statistics of
                the per-case means) and 'class_mean' (mean of the label means).
                HD95 twice: hd95_mean / hd95_std over the cases where both
                masks hold the label (n_hd95 of them; a missed or false-positive
                label is left out as MONAI does, so the mean compares with
                published MONAI-based numbers), and hd95_mean_penalised /
                hd95_std_penalised with the image diagonal for those
  metrics.json  all of the above, per-case means, paths and the definitions
  overlays.png  a few cases (worst to best mean Dice), one row each, an axial
                slice: image | reference | prediction (white = reference
                contour) | errors (green right, red wrong label, blue missed)
The summary table is printed either way. Definitions and the empty-mask
conventions (both empty: not scored; one empty: Dice 0, per-case HD95 = image
diagonal in mm, left out of hd95_mean, counted in hd95_mean_penalised) are in
rr_tf/metrics.py.

Exit status: 0 on success; 2 on an invalid flag or an unusable input, with
one line on stderr naming the flag or file and the reason.
"""

import csv
import io
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from launch import flagutil  # noqa: E402
from rr_tf.utils.files import atomic_write  # noqa: E402

flagutil.quiet_tensorflow(__name__)

FLAGS = flags.FLAGS

flags.DEFINE_string("pred", None, "Predicted label map: a NIfTI file, or a folder of them "
                    "matched to --ref by case name.")
flags.DEFINE_string("ref", None, "Reference (ground-truth) label map: a NIfTI file, or a folder "
                    "of them (the case list).")
flags.DEFINE_string("output", None, "Folder for per_case.csv, summary.csv, metrics.json and "
                    "overlays.png (created if needed). Without it only the table is printed.")
flags.DEFINE_string("labels", None, "Comma-separated label values to score, e.g. 1,2,3 "
                    "(default: every non-zero value found in the references).")
flags.DEFINE_string("label_names", None, "Names of the scored labels: 'phantom' (the names of "
                    "the built-in phantom, rr_tf.data.phantom.LABEL_NAMES), names in the order "
                    "of the labels ('liver,spleen'), pairs ('1=liver,2=spleen'), or 'from:PATH' "
                    "= the names recorded in PATH: a data folder (its manifest.json, written by "
                    "launch/prepare_data.py), an export folder or a fine-tuning run folder "
                    "(segmenter.json). Labels without a name are called label_<value>, the "
                    "default.")
flags.DEFINE_string("image", None, "Optional CT image (file or folder matched by case name) "
                    "drawn under the overlays; must be on the reference grid. HU images are "
                    "shown with the abdominal window (W400 L40), others with their 1-99 "
                    "percentile range.")
flags.DEFINE_integer("figure_cases", 4, "Cases shown in overlays.png (spread from worst to best "
                     "mean Dice); 0 = no figure.", lower_bound=0)
flags.DEFINE_boolean("ignore_affine", False, "Compare only the shapes of prediction and "
                     "reference, not their affines (for predictions written by tools that drop "
                     "the geometry).")
flags.DEFINE_boolean("allow_missing", False, "Score a reference case without a prediction as an "
                     "empty prediction (default: stop with an error).")
flags.DEFINE_boolean("progress", True, "Show a progress line on stderr.")

flags.mark_flags_as_required(["pred", "ref"])


def _check_labels(value):
    if value is None:
        return True
    try:
        parse_labels(value)
    except ValueError as err:
        raise flags.ValidationError(str(err))
    return True


FROM = "from:"


def _check_label_names(value):
    if value is None or value == "phantom":
        return True
    if value.startswith(FROM):
        from rr_tf.data.labelnames import names_file

        path = value[len(FROM):].strip()
        if not path:
            raise flags.ValidationError("--label_names=from:PATH needs a PATH (a data folder, "
                                        "an export folder or a fine-tuning run folder)")
        if names_file(path) is None:
            raise flags.ValidationError(f"--label_names: {path} holds no manifest.json "
                                        "(data folder) or segmenter.json (export or fine-tuning "
                                        "run)")
        return True
    items = [p.strip() for p in value.split(",")]
    if not all(items):
        raise flags.ValidationError(f"--label_names has an empty name in {value!r}")
    pairs = ["=" in p for p in items]
    if any(pairs) and not all(pairs):
        raise flags.ValidationError("--label_names: use either names or label=name pairs, "
                                    f"not both ({value!r})")
    if all(pairs):
        for p in items:
            key = p.split("=", 1)[0].strip()
            if not key.isdigit() or not p.split("=", 1)[1].strip():
                raise flags.ValidationError(f"--label_names: {p!r} is not label=name")
    return True


flags.register_validator("labels", _check_labels)
flags.register_validator("label_names", _check_label_names)



def parse_labels(text):
    """'1,2,5' -> [1, 2, 5]; ValueError naming the flag."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        labels = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--labels needs comma-separated integers, got {text!r}") from None
    if not labels:
        raise ValueError(f"--labels needs at least one label, got {text!r}")
    bad = [v for v in labels if not 1 <= v <= 255]
    if bad:
        raise ValueError(f"--labels values must be in 1..255 (0 is background), got {bad[0]}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"--labels has duplicates: {text!r}")
    return labels


def recorded_names(spec):
    """{label: name} read from the PATH of ``--label_names=from:PATH``
    ({} for other values); ConfigError when PATH records no names. Cheap:
    run before the scoring."""
    from rr_tf.data.labelnames import names_file, read_label_names
    from rr_tf.errors import ConfigError, DataError

    if spec is None or not spec.startswith(FROM):
        return {}
    path = spec[len(FROM):].strip()
    try:
        known = read_label_names(path)
    except DataError as err:
        raise ConfigError("--label_names", str(err)) from None
    if not known:
        raise ConfigError("--label_names", f"{names_file(path)} records no label names (made "
                          "before they were recorded, or from a plain folder without "
                          "prepare_data.py --label_names)")
    return known


def label_names(spec, labels, recorded=None):
    """{label: name} from --label_names (see its help); ``recorded``: the
    names of a ``from:PATH`` value (:func:`recorded_names`)."""
    from rr_tf.errors import ConfigError

    names = {k: f"label_{k}" for k in labels}
    if spec is None:
        return names
    if spec.startswith(FROM):
        if recorded is None:
            recorded = recorded_names(spec)
        names.update({k: recorded[k] for k in labels if k in recorded})
    elif spec == "phantom":
        from rr_tf.data.phantom import LABEL_NAMES

        names.update({k: LABEL_NAMES[k] for k in labels if k in LABEL_NAMES})
    else:
        items = [p.strip() for p in spec.split(",")]
        if "=" in items[0]:
            for p in items:
                key, name = (s.strip() for s in p.split("=", 1))
                if int(key) not in names:
                    raise ConfigError("--label_names", f"label {key} is not scored "
                                      f"(scored: {','.join(map(str, labels))})")
                names[int(key)] = name
        elif len(items) != len(labels):
            raise ConfigError("--label_names", f"{len(items)} names for {len(labels)} labels "
                              f"({','.join(map(str, labels))})")
        else:
            names = dict(zip(labels, items))
    if len(set(names.values())) != len(names):
        raise ConfigError("--label_names", f"names are not unique: {sorted(names.values())}")
    return names


# --- inputs ------------------------------------------------------------------

def list_cases(path, flag, warnings=None):
    """{case name: file} of a NIfTI file or a folder of them; hidden NIfTI
    files (names starting with '.') are left out, with a line in
    ``warnings`` when given."""
    from rr_tf.data.nifti import case_name, is_nifti
    from rr_tf.errors import ConfigError, DataError

    if os.path.isfile(path):
        if not is_nifti(path):
            raise DataError(path, "not a NIfTI file (.nii or .nii.gz)")
        return {case_name(path): path}
    if not os.path.isdir(path):
        raise ConfigError(f"--{flag}", f"{path!r} does not exist")
    cases, hidden = {}, []
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        if entry.startswith(".") and is_nifti(entry):
            hidden.append(entry)
        if entry.startswith(".") or not os.path.isfile(full) or not is_nifti(entry):
            continue
        name = case_name(entry)
        if name in cases:
            raise DataError(full, f"two files for case {name!r} in the folder "
                            f"({os.path.basename(cases[name])})")
        cases[name] = full
    if hidden and warnings is not None:
        warnings.append(f"skipped {len(hidden)} hidden NIfTI file(s) in {path} (names starting "
                        f"with '.', e.g. macOS '._' copies): {', '.join(hidden[:5])}"
                        f"{' ...' if len(hidden) > 5 else ''}")
    if not cases:
        raise DataError(path, "folder holds no NIfTI files (.nii, .nii.gz)")
    return cases


def match_cases(pred, ref, allow_missing, warnings):
    """[(case, pred file or None, ref file)] in case-name order."""
    from rr_tf.errors import ConfigError, DataError

    if os.path.isfile(pred) != os.path.isfile(ref) and os.path.exists(pred) and os.path.exists(ref):
        raise ConfigError("--pred/--ref", "must both be NIfTI files or both be folders")
    refs = list_cases(ref, "ref", warnings)
    preds = list_cases(pred, "pred", warnings)
    if os.path.isfile(ref):  # two files: paired whatever their names
        return [(next(iter(refs)), next(iter(preds.values())), next(iter(refs.values())))]
    missing = [name for name in refs if name not in preds]
    if missing and not allow_missing:
        raise DataError(refs[missing[0]], f"no prediction for case {missing[0]!r} in {pred} "
                        f"({len(missing)} of {len(refs)} cases lack one); pass --allow_missing "
                        "to score them as empty predictions")
    extra = sorted(set(preds) - set(refs))
    if extra:
        warnings.append(f"{len(extra)} predictions have no reference and are ignored: "
                        f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    if missing:
        warnings.append(f"{len(missing)} cases have no prediction and are scored as empty: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return [(name, preds.get(name), refs[name]) for name in refs]


def check_grid(vol, grid, what, ignore_affine):
    """DataError naming ``vol``'s file unless it lies on the reference
    ``grid`` = (shape, affine, reference file)."""
    from rr_tf.data.preprocess import affines_match
    from rr_tf.errors import DataError

    shape, affine, source = grid
    if vol.shape != tuple(shape):
        raise DataError(vol.source, f"{what} shape {vol.shape} does not match the reference "
                        f"shape {tuple(shape)} ({source})")
    if not ignore_affine and not affines_match(vol.affine, affine):
        diff = float(abs(vol.affine - affine).max())
        raise DataError(vol.source, f"{what} affine differs from the reference affine by up to "
                        f"{diff:.4g} mm ({source}); write it on the reference grid or "
                        "pass --ignore_affine")


# --- scoring -----------------------------------------------------------------

def score(pairs, labels, ignore_affine, progress):
    """Reads and scores every case; returns (results, present_ref, present_pred, views, meta)."""
    import numpy as np

    from rr_tf.data.nifti import read_nifti
    from rr_tf.metrics import evaluate_case
    from rr_tf.utils.progress import Progress

    results, views, meta = {}, {}, {}
    present_ref, present_pred = set(), set()
    bar = Progress(len(pairs), "cases", enabled=progress)
    for name, pred_path, ref_path in pairs:
        ref = read_nifti(ref_path, kind="label")
        if pred_path is not None:
            pred = read_nifti(pred_path, kind="label")
            check_grid(pred, (ref.shape, ref.affine, ref.source), "prediction", ignore_affine)
            pred_arr = pred.array
        else:
            pred_arr = np.zeros(ref.shape, np.uint8)
        ref_values = set(np.unique(ref.array).tolist()) - {0}
        pred_values = set(np.unique(pred_arr).tolist()) - {0}
        present_ref |= ref_values
        present_pred |= pred_values
        case_labels = labels if labels is not None else sorted(ref_values | pred_values)
        results[name] = evaluate_case(pred_arr, ref.array, ref.spacing, case_labels)
        views[name] = axial_view(ref.array, pred_arr, ref.affine)
        views[name]["grid"] = (ref.shape, ref.affine, ref.source)
        meta[name] = {"pred": pred_path, "ref": ref_path, "shape": list(ref.shape),
                      "spacing": list(ref.spacing)}
        bar.update()
    bar.close()
    return results, present_ref, present_pred, views, meta


def complete(results, labels):
    """Every case gets every scored label (absent where it was not computed:
    then neither its reference nor its prediction held it) and no other."""
    from rr_tf.metrics import ClassResult

    nan = float("nan")
    return {case: {k: res.get(k, ClassResult(nan, nan, 0.0, 0.0, "absent")) for k in labels}
            for case, res in results.items()}


# --- figure ------------------------------------------------------------------

def axial_view(ref, pred, affine):
    """Canonical (RAS) axial slice through the middle of the reference
    foreground (prediction's if the reference is empty): a dict with the 2D
    label slices, the slice index and the in-plane spacing."""
    import numpy as np

    from rr_tf.data.preprocess import to_canonical

    ref_c, aff_c = to_canonical(ref, affine)
    pred_c, _ = to_canonical(pred, affine)
    k = ref_c.shape[2] // 2
    for arr in (ref_c, pred_c):
        idx = np.flatnonzero(arr.any(axis=(0, 1)))
        if idx.size:
            k = int((idx[0] + idx[-1]) // 2)
            break
    spacing = np.linalg.norm(aff_c[:3, :3], axis=0)
    return {"ref": ref_c[:, :, k].copy(), "pred": pred_c[:, :, k].copy(), "k": k,
            "spacing": (float(spacing[0]), float(spacing[1]))}


def pick_figure_cases(per_case_means, count):
    """``count`` cases spread from the worst to the best mean Dice."""
    import numpy as np

    order = sorted(per_case_means, key=lambda c: (math.isnan(per_case_means[c]["dice"]),
                                                   per_case_means[c]["dice"], c))
    if count >= len(order):
        return order
    idx = np.unique(np.round(np.linspace(0, len(order) - 1, count)).astype(int))
    return [order[i] for i in idx]


def image_for_case(case, warnings):
    """The --image volume of ``case``, or None (not given / not in the folder).
    A single --image file goes with the single case (checked in main)."""
    from rr_tf.data.nifti import read_nifti

    if FLAGS.image is None:
        return None
    if os.path.isfile(FLAGS.image):
        return read_nifti(FLAGS.image, kind="image")
    images = list_cases(FLAGS.image, "image")
    if case not in images:
        warnings.append(f"no image for case {case!r} in {FLAGS.image}; overlay drawn on black")
        return None
    return read_nifti(images[case], kind="image")


def make_figure(chosen, views, labels, names, warnings):
    """(description dict, PNG bytes) of the overlay grid, one row per case."""
    import numpy as np

    from rr_tf.data.preprocess import to_canonical
    from rr_tf.utils.figures import PALETTE, figure_grid, render_case

    rows = []
    for case in chosen:
        image = image_for_case(case, warnings)
        image2d = None
        if image is not None:
            check_grid(image, views[case]["grid"], "image", FLAGS.ignore_affine)
            image2d = to_canonical(image.array, image.affine)[0][:, :, views[case]["k"]]
        rows.append(render_case(views[case], labels, image2d))
    with_image = any(len(r) == 4 for r in rows)
    if with_image:  # a case without its image gets a black image panel
        rows = [r if len(r) == 4 else [np.zeros_like(r[0])] + r for r in rows]
    columns = (["image"] if with_image else []) + [
        "reference", "prediction (white: reference contour)",
        "errors (green right, red wrong label, blue missed)"]
    figure = {"file": "overlays.png", "rows": chosen, "columns": columns,
              "slice": "axial (RAS canonical) through the middle of the reference foreground; "
                       "anterior up, patient's right on the left",
              "slice_index": {c: views[c]["k"] for c in chosen},
              "colours": {names[k]: list(PALETTE[(k - 1) % len(PALETTE)]) for k in labels}}
    from rr_tf.utils.png import encode_png

    return figure, encode_png(figure_grid(rows))


# --- output ------------------------------------------------------------------

def _num(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _json_ready(obj):
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def per_case_csv(results, names):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "label", "name", "status", "dice", "hd95_mm", "pred_ml", "ref_ml"])
    for case, res in results.items():
        for k, r in res.items():
            w.writerow([case, k, names[k], r.status, _num(r.dice), _num(r.hd95),
                        _num(r.pred_ml), _num(r.ref_ml)])
    return buf.getvalue()


SUMMARY_COLUMNS = ["n", "dice_mean", "dice_std", "n_hd95", "hd95_mean", "hd95_std",
                   "hd95_mean_penalised", "hd95_std_penalised", "n_absent", "n_missed",
                   "n_false_positive", "ref_ml_mean", "pred_ml_mean"]


def summary_csv(summary, names):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", "name"] + SUMMARY_COLUMNS)
    for k, row in summary["classes"].items():
        w.writerow([k, names[k]] + [_num(row[c]) for c in SUMMARY_COLUMNS])
    ov = summary["overall"]
    w.writerow(["overall", "mean over each case's labels"]
               + [_num(ov[c]) if c in ov else "" for c in SUMMARY_COLUMNS])
    class_mean = {"dice_mean": ov["dice_class_mean"], "hd95_mean": ov["hd95_class_mean"],
                  "hd95_mean_penalised": ov["hd95_class_mean_penalised"]}
    w.writerow(["class_mean", "mean of the label means"]
               + [_num(class_mean[c]) if c in class_mean else "" for c in SUMMARY_COLUMNS])
    return buf.getvalue()


def table(summary, names):
    def pm(mean, std, fmt):
        return "-" if math.isnan(mean) else f"{mean:{fmt}} ± {std:{fmt}}"

    def one(value, fmt):
        return "-" if math.isnan(value) else f"{value:{fmt}}"

    width = max([len(n) for n in names.values()] + [14])
    lines = [f"{'label':>5}  {'name':<{width}}  {'n':>4}  {'Dice':>15}  {'HD95 (mm)':>17}  "
             f"{'HD95 penalised':>17}  {'missed':>6}  {'FP':>4}"]
    for k, r in summary["classes"].items():
        lines.append(f"{k:>5}  {names[k]:<{width}}  {r['n']:>4}  "
                     f"{pm(r['dice_mean'], r['dice_std'], '.4f'):>15}  "
                     f"{pm(r['hd95_mean'], r['hd95_std'], '.2f'):>17}  "
                     f"{pm(r['hd95_mean_penalised'], r['hd95_std_penalised'], '.2f'):>17}  "
                     f"{r['n_missed']:>6}  {r['n_false_positive']:>4}")
    ov = summary["overall"]
    lines.append(f"{'all':>5}  {'case means':<{width}}  {ov['n']:>4}  "
                 f"{pm(ov['dice_mean'], ov['dice_std'], '.4f'):>15}  "
                 f"{pm(ov['hd95_mean'], ov['hd95_std'], '.2f'):>17}  "
                 f"{pm(ov['hd95_mean_penalised'], ov['hd95_std_penalised'], '.2f'):>17}")
    lines.append(f"{'':>5}  {'mean of labels':<{width}}  {'':>4}  "
                 f"{one(ov['dice_class_mean'], '.4f'):>15}  "
                 f"{one(ov['hd95_class_mean'], '.2f'):>17}  "
                 f"{one(ov['hd95_class_mean_penalised'], '.2f'):>17}")
    lines.append("HD95: mean over the cases where both masks hold the label (missed and "
                 "false-positive labels left out, as MONAI); penalised: those count as the image "
                 "diagonal")
    return "\n".join(lines)


DEFINITIONS = {
    "dice": "2|P n R| / (|P| + |R|)",
    "hd95_mm": "max of the two directed 95th percentiles (numpy linear) of distances in mm from "
               "each surface voxel (6-connectivity, image border = outside) of one mask to the "
               "nearest surface voxel of the other",
    "absent": "prediction and reference both empty: Dice and HD95 not defined (null), case left "
              "out of the label's statistics",
    "missed": "reference non-empty, prediction empty: Dice 0, per-case HD95 = image diagonal in "
              "mm; left out of hd95_mean (MONAI), counted in hd95_mean_penalised",
    "false_positive": "reference empty, prediction non-empty: Dice 0, per-case HD95 = image "
                      "diagonal in mm; left out of hd95_mean (MONAI), counted in "
                      "hd95_mean_penalised",
    "hd95_mean": "mean HD95 over the cases where prediction and reference both hold the label "
                 "(n_hd95 of them): missed and false-positive cases are NaN and left out, as "
                 "MONAI's mean reduction does, so it compares with published MONAI-based numbers",
    "hd95_mean_penalised": "mean HD95 over every non-absent case, a missed or false-positive "
                           "case counting as the image diagonal in mm",
    "std": "sample standard deviation (ddof=1; 0 for one case)",
    "overall": "statistics over cases of each case's mean over its scored labels",
    "class_mean": "mean of the per-label means",
}


def main(argv):
    if len(argv) > 1:
        flagutil.fail(__file__, f"unexpected arguments {argv[1:]}")
    from rr_tf.errors import RrTfError
    from rr_tf.metrics import aggregate, case_mean

    warnings = []
    try:
        if FLAGS.output and os.path.exists(FLAGS.output) and not os.path.isdir(FLAGS.output):
            flagutil.fail(__file__, f"--output={FLAGS.output}: exists and is not a folder")
        if FLAGS.image and not os.path.exists(FLAGS.image):
            flagutil.fail(__file__, f"--image: {FLAGS.image!r} does not exist")
        recorded = recorded_names(FLAGS.label_names)
        pairs = match_cases(FLAGS.pred, FLAGS.ref, FLAGS.allow_missing, warnings)
        if FLAGS.image and os.path.isfile(FLAGS.image) and len(pairs) != 1:
            flagutil.fail(__file__, "--image: a single image file needs single --pred/--ref "
                          "files (or pass a folder of images)")
        labels = parse_labels(FLAGS.labels) if FLAGS.labels else None
        results, present_ref, present_pred, views, meta = score(
            pairs, labels, FLAGS.ignore_affine, FLAGS.progress)
        if labels is None:
            labels = sorted(present_ref)
            if not labels:
                flagutil.fail(__file__, f"--ref={FLAGS.ref}: no reference holds a non-zero label; "
                              "pass --labels to score predictions anyway")
            only_pred = sorted(present_pred - present_ref)
            if only_pred:
                warnings.append(f"labels {only_pred} appear only in predictions and are not "
                                "scored (pass --labels to score them)")
        names = label_names(FLAGS.label_names, labels, recorded)
        unnamed = [k for k in labels if k not in recorded]
        if recorded and unnamed:
            warnings.append(f"labels {unnamed} have no name in {FLAGS.label_names[len(FROM):]} "
                            "and are called label_<value>")
        results = complete(results, labels)
        summary = aggregate(results, labels)
        means = {case: case_mean(res) for case, res in results.items()}

        figure, png = None, None
        if FLAGS.output and FLAGS.figure_cases > 0:
            figure, png = make_figure(pick_figure_cases(means, FLAGS.figure_cases), views, labels,
                                      names, warnings)
    except RrTfError as err:
        flagutil.fail(__file__, str(err))

    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(table(summary, names))

    if FLAGS.output:
        try:
            write_outputs(FLAGS.output, labels, names, summary, results, means, meta, figure,
                          png, warnings)
        except OSError as err:
            flagutil.fail(__file__, f"--output={FLAGS.output}: cannot write "
                          f"({err.strerror or err})")


def write_outputs(out, labels, names, summary, results, means, meta, figure, png, warnings):
    """per_case.csv, summary.csv, metrics.json and overlays.png, each atomically."""
    os.makedirs(out, exist_ok=True)
    document = {
        "pred": os.path.abspath(FLAGS.pred), "ref": os.path.abspath(FLAGS.ref),
        "labels": labels, "label_names": {k: names[k] for k in labels},
        "definitions": DEFINITIONS,
        "summary": {"classes": {names[k]: dict(label=k, **v)
                                for k, v in summary["classes"].items()},
                    "overall": summary["overall"]},
        "cases": {case: dict(meta[case], mean=means[case],
                             classes={names[k]: dict(label=k, **r.as_dict())
                                      for k, r in res.items()})
                  for case, res in results.items()},
        "figure": figure, "warnings": warnings,
    }
    atomic_write(os.path.join(out, "per_case.csv"), per_case_csv(results, names))
    atomic_write(os.path.join(out, "summary.csv"), summary_csv(summary, names))
    atomic_write(os.path.join(out, "metrics.json"),
                 json.dumps(_json_ready(document), indent=2, allow_nan=False) + "\n")
    written = ["per_case.csv", "summary.csv", "metrics.json"]
    if figure is not None:
        atomic_write(os.path.join(out, "overlays.png"), png)
        written.append("overlays.png")
        print(f"overlays.png rows (worst to best mean Dice): {', '.join(figure['rows'])}; "
              f"columns: {' | '.join(figure['columns'])}")
    print(f"wrote {', '.join(written)} to {out}")


if __name__ == "__main__":
    flagutil.main(__file__, main)
