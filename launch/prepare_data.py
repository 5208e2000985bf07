"""Preprocess CT scans (or synthetic phantoms) into TFRecord shards + manifest.

Examples:
  python launch/prepare_data.py --source=phantom --num_cases=16 \
      --spacing=3,3,3 --output_dir=/data/phantom_shards
  python launch/prepare_data.py --source=/data/ct/images --labels=/data/ct/labels \
      --output_dir=/data/ct_shards --spacing=1.5,1.5,2 --hu_window=-1000,1000 \
      --label_names=liver,spleen
  # a Decathlon / nnU-Net raw folder (dataset.json, imagesTr/, labelsTr/) or an
  # AbdomenAtlas folder (<case>/ct.nii.gz, <case>/segmentations/<organ>.nii.gz):
  python launch/prepare_data.py --source=/data/Task03_Liver --output_dir=/data/liver_shards
  # the same spec as an existing data set (e.g. fine-tuning data for a
  # pre-trained model):
  python launch/prepare_data.py --source=/data/ft --spec=/data/ct_shards/preprocess.json ...

Exit status: 0 on success (or nothing to do); 1 when bad cases were found
and --skip_bad was not given (nothing is written); 2 on invalid flags or a
problem that stops the whole run (e.g. an unwritable --output_dir); 130 when
interrupted (Ctrl-C; nothing is published).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from launch import flagutil  # noqa: E402

flagutil.quiet_tensorflow(__name__)

FLAGS = flags.FLAGS

flags.DEFINE_string("source", None, "'phantom' for synthetic CT, or a folder of NIfTI files "
                    "(.nii/.nii.gz) and/or DICOM series folders (one series per folder), or a "
                    "Decathlon / nnU-Net raw folder (dataset.json + imagesTr/ + labelsTr/, "
                    "optional imagesTs/ as unlabelled cases), or an AbdomenAtlas folder "
                    "(<case>/ct.nii.gz + <case>/segmentations/<organ>.nii.gz); see docs/data.md.")
flags.DEFINE_string("output_dir", None, "Where shards, manifest.json and preprocess.json go "
                    "(local path or gs://).")
flags.DEFINE_string("labels", None, "Folder of NIfTI label maps matched to images by case name "
                    "(plain folders only: the Decathlon and AbdomenAtlas layouts bring their own).")
flags.DEFINE_string("label_names", None, "Names of the label values, recorded in manifest.json "
                    "(and from there in exports and evaluations): names of the labels 1..K in "
                    "order ('liver,spleen') or value=name pairs ('1=liver,3=kidney'). Replaces "
                    "the names a source declares (dataset.json, AbdomenAtlas organ files, the "
                    "phantom's). Default: the source's names; none for plain folders.")
flags.DEFINE_integer("num_cases", 8, "Number of phantom cases (--source=phantom only).", lower_bound=1)
flags.DEFINE_string("phantom_shape", "128,128,128", "Array shape of each phantom (i,j,k); the "
                    "physical field of view stays the same, so smaller shapes mean coarser voxels.")
flags.DEFINE_string("spacing", "1.5,1.5,2.0", "Target voxel spacing in mm along R,A,S "
                    "(X,Y,Z), or 'native' to keep each scan's spacing.")
flags.DEFINE_string("hu_window", "-1000,1000", "HU clip window LO,HI applied before storing int16; "
                    "training maps it to [0, 1].")
flags.DEFINE_boolean("foreground_crop", False, "Crop each case to the body's bounding box "
                     "(plus --foreground_margin_mm); labelled voxels are always kept.")
flags.DEFINE_float("foreground_margin_mm", 10.0, "Margin around the body crop in mm.", lower_bound=0.0)
flags.DEFINE_string("spec", None, "A preprocess.json to use as the preprocessing spec (e.g. from "
                    "an existing data set); excludes --spacing/--hu_window/--foreground_crop.")
flags.DEFINE_float("val_fraction", 0.2, "Fraction of patients held out for validation.",
                   lower_bound=0.0, upper_bound=0.99)
flags.DEFINE_integer("seed", 0, "Seed for phantom generation and the train/val split.")
flags.DEFINE_boolean("skip_bad", False, "Write the good cases even when some inputs are bad "
                     "(bad ones are listed in the manifest); exit status 0.")
flags.DEFINE_integer("workers", 0, "Preprocessing processes; 0 = one per CPU core.", lower_bound=0)
flags.DEFINE_integer("cases_per_shard", 16, "Cases per TFRecord shard.", lower_bound=1)
flags.DEFINE_integer("max_voxels", 2 ** 31, "Largest NIfTI image (voxels over all axes) a header "
                     "may declare; a larger one, or a header declaring more voxel data than its "
                     "file can hold, is a bad case found before any voxel is read (a forged "
                     "header must not force a huge allocation).", lower_bound=1)
flags.DEFINE_enum("compression", "none", ["none", "gzip"], "TFRecord compression; 'none' reads "
                  "fastest, 'gzip' roughly halves the size of int16 CT.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing data set made with a different spec.")
flags.DEFINE_boolean("dicom_all_series", False, "Make one case per series when a DICOM folder "
                     "holds several (default: such a folder is a bad case).")
flags.DEFINE_string("patient_table", None, "CSV with columns case_id,patient_id linking scans of "
                    "one patient (patient-level split, MICLe pairs). Default: one patient per case.")
flags.DEFINE_boolean("progress", True, "Show a progress line.")
flags.DEFINE_string("write_nifti", None, "--source=phantom only: also write the phantom cases "
                    "(the same seeds as their shards) as NIfTI pairs DIR/images/<case>.nii.gz and "
                    "DIR/labels/<case>.nii.gz on their native grid, to view them or score "
                    "launch/infer.py + launch/evaluate.py on them. Without --output_dir only the "
                    "NIfTI pairs are written.")

flags.mark_flags_as_required(["source"])
flags.register_multi_flags_validator(
    ["output_dir", "write_nifti", "source"],
    lambda f: bool(f["output_dir"]) or (bool(f["write_nifti"]) and f["source"] == "phantom"),
    "--output_dir is required (only --source=phantom with --write_nifti may leave it out)")
flags.register_multi_flags_validator(
    ["write_nifti", "source"], lambda f: not f["write_nifti"] or f["source"] == "phantom",
    "--write_nifti needs --source=phantom")
flagutil.register_numbers_validator("spacing", 3, positive=True, allow=("native",))
flagutil.register_numbers_validator("hu_window", 2)
flagutil.register_numbers_validator("phantom_shape", 3, cast=int, positive=True)


def _check_label_names(value):
    if value is None:
        return True
    from rr_tf.data.labelnames import parse_label_names
    from rr_tf.errors import ConfigError

    try:
        parse_label_names(value)
    except ConfigError as err:
        raise flags.ValidationError(str(err))
    return True


flags.register_validator("label_names", _check_label_names)


def build_spec():
    from rr_tf.data.spec import PreprocessSpec

    if FLAGS.spec:
        clashing = [n for n in ("spacing", "hu_window", "foreground_crop", "foreground_margin_mm")
                    if FLAGS[n].present]
        if clashing:
            raise ValueError(f"--spec excludes --{', --'.join(clashing)}")
        try:
            with open(FLAGS.spec) as f:
                return PreprocessSpec.from_json(f.read())
        except (OSError, ValueError) as err:
            raise ValueError(f"--spec={FLAGS.spec}: cannot read ({err})")
    spacing = None if FLAGS.spacing == "native" else flagutil.parse_numbers(FLAGS.spacing, 3)
    return PreprocessSpec(spacing=spacing, hu_window=flagutil.parse_numbers(FLAGS.hu_window, 2),
                          foreground_crop=FLAGS.foreground_crop,
                          foreground_margin_mm=FLAGS.foreground_margin_mm)


def write_phantom_pairs():
    """The phantom cases of --num_cases/--seed/--phantom_shape as NIfTI
    pairs in --write_nifti (each file written under a temporary name, then
    renamed); existing pairs are kept."""
    from rr_tf.data.phantom import PhantomConfig, generate_phantom, write_phantom_nifti
    from rr_tf.data.sources import phantom_tasks
    from rr_tf.errors import RrTfError

    shape = flagutil.parse_numbers(FLAGS.phantom_shape, 3, int)
    written = 0
    for task in phantom_tasks(FLAGS.num_cases, FLAGS.seed, shape):
        done = all(os.path.exists(os.path.join(FLAGS.write_nifti, sub, task.case_id + ".nii.gz"))
                   for sub in ("images", "labels"))
        if done:
            continue
        try:
            write_phantom_nifti(generate_phantom(task.seed, PhantomConfig(shape=tuple(shape))),
                                FLAGS.write_nifti, task.case_id)
        except RrTfError as err:
            flagutil.fail(__file__, str(err))
        written += 1
    print(f"NIfTI pairs: {written} written, {FLAGS.num_cases - written} already there, in "
          f"{FLAGS.write_nifti}/images and {FLAGS.write_nifti}/labels", file=sys.stderr)


def main(argv):
    if len(argv) > 1:
        flagutil.fail(__file__, f"unexpected arguments {argv[1:]}")
    from rr_tf.errors import RrTfError
    from rr_tf.data.labelnames import parse_label_names
    from rr_tf.data.prepare import PrepareConfig, prepare

    if FLAGS.write_nifti:
        write_phantom_pairs()
        if not FLAGS.output_dir:
            sys.exit(0)
    try:
        config = PrepareConfig(
            source=FLAGS.source, output_dir=FLAGS.output_dir, spec=build_spec(),
            labels_dir=FLAGS.labels, num_cases=FLAGS.num_cases,
            phantom_shape=flagutil.parse_numbers(FLAGS.phantom_shape, 3, int),
            val_fraction=FLAGS.val_fraction, seed=FLAGS.seed, skip_bad=FLAGS.skip_bad,
            workers=FLAGS.workers, cases_per_shard=FLAGS.cases_per_shard,
            compression=FLAGS.compression, overwrite=FLAGS.overwrite,
            dicom_all_series=FLAGS.dicom_all_series, patient_table=FLAGS.patient_table,
            progress=FLAGS.progress,
            label_names=parse_label_names(FLAGS.label_names) if FLAGS.label_names else None,
            max_voxels=FLAGS.max_voxels)
        result = prepare(config)
    except (RrTfError, ValueError) as err:
        flagutil.fail(__file__, str(err))
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    flagutil.main(__file__, main, "interrupted (Ctrl-C); nothing was published (a data set is "
                  "only written whole)")
