"""Segment whole scans with a fine-tuned model; label maps come back on each
input's own grid (shape, orientation, affine), ready to overlay in ITK-SNAP
or 3D Slicer.

  python launch/infer.py --model=runs/ft_demo --input=scan.nii.gz --output=scan_seg.nii.gz
  python launch/infer.py --model=runs/ft_demo/export --input=scans/ --output=segs/
  python launch/infer.py --model=... --input=dicom_series_folder/ --output=seg.nii.gz
  python launch/infer.py --model=runs/ft_a,runs/ft_b --input=scans/ --output=segs/   # ensemble

--input: a NIfTI file, a folder of NIfTI files, or a DICOM series folder.
--output: a file for one input, a folder for several (``<case>.nii.gz``;
probabilities as ``<case>_probabilities.nii.gz`` with --save_probabilities).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from launch import flagutil  # noqa: E402

flagutil.quiet_tensorflow(__name__)

FLAGS = flags.FLAGS
flags.DEFINE_list("model", None, "A fine-tuning run directory or its export/ directory; "
                  "several, comma-separated, are ensembled (the mean of their class "
                  "probabilities on each scan's grid, as nnU-Net ensembles its folds).")
flags.DEFINE_string("input", None, "NIfTI file, folder of NIfTI files, or DICOM series folder.")
flags.DEFINE_string("output", None, "Output NIfTI file (one input) or folder (several).")
flags.DEFINE_float("overlap", None, "Sliding-window overlap in [0, 0.95] (default: the one the "
                   "model was exported with).", lower_bound=0.0, upper_bound=0.95)
flags.DEFINE_integer("window_batch", 2, "Windows per forward pass (bounds memory).", lower_bound=1)
flags.DEFINE_boolean("tta", False, "Average over the 8 flips of the three axes (8x slower).")
flags.DEFINE_boolean("save_probabilities", False, "Also write the class probabilities "
                     "(4D float32 NIfTI on the input grid).")
flags.DEFINE_string("largest_component", "auto", "Keep only the largest connected component "
                    "of these classes: 'auto' = the classes for which it raised the validation "
                    "Dice at fine-tuning (the model's segmenter.json; for an ensemble the classes "
                    "at least half of its models chose), 'none', 'all', or label values such as "
                    "1,2,5.")
flags.register_validator(
    "largest_component",
    lambda v: v in ("auto", "none", "all") or all(p.strip().isdigit() for p in v.split(",")),
    "--largest_component must be auto, none, all or comma-separated label values")
flags.DEFINE_string("series_uid", None, "DICOM folder with several series: the one to use.")
flagutil.define_memory_flag()
flags.mark_flags_as_required(["model", "input", "output"])


def _inputs(path):
    """[(case name, loader)] for a file, a NIfTI folder or a DICOM folder."""
    from rr_tf.data import dicom, nifti
    from rr_tf.errors import DataError

    if os.path.isfile(path):
        if not path.lower().endswith(nifti.NIFTI_SUFFIXES):
            raise DataError(path, "not a NIfTI file (.nii / .nii.gz); DICOM input is a folder")
        return [(nifti.case_name(path), lambda: nifti.read_nifti(path, kind="image"))]
    if not os.path.isdir(path):
        raise DataError(path, "no such file or folder")
    if dicom.is_dicom_dir(path):
        name = os.path.basename(os.path.normpath(path))
        return [(name, lambda: dicom.read_dicom_series(path, series_uid=FLAGS.series_uid))]
    names = [n for n in sorted(os.listdir(path)) if n.lower().endswith(nifti.NIFTI_SUFFIXES)]
    hidden = [n for n in names if n.startswith(".")]
    if hidden:
        print(f"note: skipped {len(hidden)} hidden NIfTI file(s) in {path} (names starting with "
              f"'.', e.g. macOS '._' copies): {', '.join(hidden[:5])}"
              f"{' ...' if len(hidden) > 5 else ''}", file=sys.stderr)
    files = [os.path.join(path, n) for n in names if not n.startswith(".")]
    if not files:
        raise DataError(path, "holds no NIfTI file and no DICOM series")
    return [(nifti.case_name(f), (lambda f=f: nifti.read_nifti(f, kind="image"))) for f in files]


def main(argv):
    if len(argv) > 1:
        flagutil.fail(__file__, f"unexpected arguments {argv[1:]}")
    import numpy as np

    from rr_tf.data import nifti
    from rr_tf.errors import RrTfError
    from rr_tf.predict import SegmentationEnsemble

    flagutil.guard_memory(__file__, "lower --window_batch, or segment a smaller or coarser scan")
    try:
        cases = _inputs(FLAGS.input)
        many = len(cases) > 1
        if many and FLAGS.output.lower().endswith(nifti.NIFTI_SUFFIXES):
            raise ValueError(f"--output={FLAGS.output}: {len(cases)} inputs need an output folder")
        if not FLAGS.model or any(not p.strip() for p in FLAGS.model):
            raise ValueError(f"--model={','.join(FLAGS.model or [])}: an empty model path")
        model = SegmentationEnsemble.load([p.strip() for p in FLAGS.model])
    except (RrTfError, ValueError) as err:
        flagutil.fail(__file__, str(err))
    choice = FLAGS.largest_component
    if choice == "auto":
        components = model.largest_component
    elif choice == "none":
        components = []
    elif choice == "all":
        components = list(range(1, model.num_classes))
    else:
        components = [int(p) for p in choice.split(",")]
    print(f"model {model.describe()}; largest component kept for classes "
          f"{components or 'none'}", file=sys.stderr)
    failed = 0
    for name, load in cases:
        if many or not FLAGS.output.lower().endswith(nifti.NIFTI_SUFFIXES):
            os.makedirs(FLAGS.output, exist_ok=True)
            out = os.path.join(FLAGS.output, f"{name}.nii.gz")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
            out = FLAGS.output
        start = time.time()
        try:
            image = load()
            labels, probs = model.segment(image, name, overlap=FLAGS.overlap,
                                          window_batch=FLAGS.window_batch, tta=FLAGS.tta,
                                          probabilities=FLAGS.save_probabilities,
                                          largest_component=components)
        except RrTfError as err:
            print(f"infer.py: error: {err}", file=sys.stderr)
            failed += 1
            continue
        meta = image.meta if isinstance(image.meta, dict) else {}
        nifti.write_nifti(out, labels, image.affine, header_meta=meta)
        if probs is not None:
            stem = out[: -len(".nii.gz")] if out.endswith(".nii.gz") else out.rsplit(".", 1)[0]
            nifti.write_nifti(stem + "_probabilities.nii.gz", probs, image.affine, header_meta=meta)
        present = [int(v) for v in np.unique(labels) if v]
        print(f"{name}: {image.shape} -> {out} ({time.time() - start:.1f} s; labels {present})",
              file=sys.stderr)
    if failed:
        flagutil.fail(__file__, f"{failed} of {len(cases)} input(s) failed", code=1)


if __name__ == "__main__":
    flagutil.main(__file__, main)
