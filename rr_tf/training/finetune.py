"""One fine-tuning run, from labelled shards (and optionally pre-trained
weights) to the best segmenter, TensorBoard and a segmentation export (the
engine of ``launch/finetune.py``; takes a config object, reads no flags).

Run directory (``RunDir``; same resume rules as pre-training)::

    run.json  flags.txt  preprocess.json  checkpoints/  tensorboard/
    labelled_cases.json   the cases of the labelled budget (seeded choice)
    transfer.json         what was loaded from --pretrained (or absent)
    unlabelled_cases.json the training cases of the mean-teacher consistency term
                          (only with consistency_weight > 0)
    best/                 best weights by validation Dice + best.json
    export/               segmenter.keras + SavedModel with sliding window
"""

import math
import os
import sys

import numpy as np
import tensorflow as tf

from rr_tf.data import records
from rr_tf.data.pipeline import StreamConfig, case_dataset, shard_errors_named, view_dataset
from rr_tf.data import recipes
from rr_tf.errors import ConfigError, SpecMismatchError
from rr_tf.models import segmenters
from rr_tf.runs import source_method, source_parts
from rr_tf.training import loop
from rr_tf.training.run_dir import RunDir
from rr_tf.training.finetune_config import (  # noqa: F401  (re-exported)
    LARGEST_COMPONENT, SEGMENTER_CHOICES, FinetuneConfig, parse_budget)
from rr_tf.training.segmentation import SegmentationTask, Validation, _read_best

_DATA_RESEED = 1_000_003
_UNLABELLED_RESEED = 7_919  # the unlabelled stream's seed offset (apart from the labelled one)
def choose_labeled(manifest, budget, seed):
    """The labelled training cases of the budget, chosen reproducibly: the
    labelled training cases sorted by id, permuted by ``seed``, first N.
    A fraction rounds up (at least one case)."""
    labelled = sorted(c["case_id"] for c in manifest["cases"]
                      if c["split"] == "train" and c.get("has_label"))
    if not labelled:
        raise ConfigError("data_dir", "the training split holds no labelled case")
    value = parse_budget(budget)
    if value is None:
        return labelled
    n = value if isinstance(value, int) else max(1, math.ceil(value * len(labelled)))
    if n > len(labelled):
        raise ConfigError("num_labeled", f"{n} labelled cases asked, the training split has "
                          f"{len(labelled)}")
    order = np.random.default_rng(seed).permutation(len(labelled))
    return sorted(labelled[i] for i in order[:n])


def unlabelled_cases(manifest, labelled):
    """The training cases outside the labelled budget (with or without a
    label: the mean teacher never reads it), sorted by id."""
    budget = set(labelled)
    return sorted(c["case_id"] for c in manifest["cases"]
                  if c["split"] == "train" and c["case_id"] not in budget)


def unlabelled_stream(config, case_ids, seed, spec=None):
    """Batches ``{"view", "box", "case_id"}`` of random ``crop_size`` crops
    (network units, no label) of the cases ``case_ids`` of the train split,
    ``unlabelled_batch_size`` (or ``batch_size``) per batch."""
    if not case_ids:
        raise ConfigError("consistency_weight", "the mean teacher needs unlabelled training cases")
    stream = StreamConfig(batch_size=config.unlabelled_batch_size or config.batch_size,
                          crops_per_volume=config.crops_per_volume, seed=seed,
                          case_ids=tuple(case_ids), **config.stream_checks())
    dataset, _ = view_dataset(config.data_dir, "train", recipes.random_crop(config.crop_size),
                              stream, labelled=False, spec=spec)
    return dataset


def num_classes_of(manifest):
    values = set()
    for c in manifest["cases"]:
        values.update(int(v) for v in c.get("label_values") or [])
    if not values:
        raise ConfigError("data_dir", "the manifest lists no label values; are the cases labelled?")
    return max(values) + 1


def _start_point(config):
    if not config.pretrained:
        return "from scratch"
    if not config.load_weights:
        return f"from scratch in the architecture of {config.pretrained} (--load_weights=false)"
    return f"from {config.pretrained}"


def load_pretrained(model, source, parts=None, spec=None, allow_spec_mismatch=False,
                    src_parts=None, src_spec=None):
    """Loads what matches from ``source`` (run directory, export directory
    or ``.keras`` file) into ``model``'s parts. Refuses (SpecMismatchError)
    when the pre-training data were preprocessed differently from ``spec``
    unless ``allow_spec_mismatch``; refuses (ConfigError) when nothing
    matches. Returns the TransferReport."""
    from rr_tf.transfer import transfer

    if src_parts is None:
        src_parts, src_spec = source_parts(source, flag="pretrained")
    if spec is not None and src_spec is not None and src_spec.hash != spec.hash \
            and not allow_spec_mismatch:
        raise SpecMismatchError(source, f"pre-trained on data preprocessed with "
                                f"spec {src_spec.hash} ({src_spec.describe()}), fine-tuning data use "
                                f"{spec.hash} ({spec.describe()}); re-prepare the data with the same "
                                "spec or pass --allow_spec_mismatch")
    dst_parts = model.transfer_parts()
    method = source_method(source)
    if method and isinstance(model, segmenters.UNetSegmenter) and \
            not segmenters.transfers_decoder(method):
        dst_parts = model.transfer_parts(decoder=False)
    return transfer(dst_parts, src_parts, source=source, parts=parts, flag="pretrained")


def validation_cases(data_dir, spec, limit=0, checks=None):
    """Labelled validation volumes in network units (numpy), for the
    Validation callback: the first ``limit`` in manifest order (0 = all).
    ``checks``: the StreamConfig shard checks (RunSettings.stream_checks)."""
    from rr_tf.data.pipeline import unit_scaler

    manifest = records.read_manifest(data_dir)
    ids = [c["case_id"] for c in manifest["cases"] if c["split"] == "val" and c.get("has_label")]
    if not ids:
        return []
    if limit:
        ids = ids[:limit]
    ds, _ = case_dataset(data_dir, "val", StreamConfig(repeat=False, shuffle_cases=0,
                                                       case_ids=tuple(ids), **(checks or {})))
    to_unit = unit_scaler(spec)
    out = []
    for case in ds:
        if not bool(case["has_label"]) or case["case_id"].numpy().decode() not in ids:
            continue
        out.append({"case_id": case["case_id"].numpy().decode(),
                    "image": to_unit(case["image"]).numpy()[..., 0],
                    "label": case["label"].numpy(), "spacing": tuple(case["spacing"].numpy())})
    return out


def choose_postprocessing(mode, validation, val_cases, labels, run, log):
    """The classes whose largest connected component alone is kept at
    inference: ``all``, ``none``, or (``auto``) those for which it raised
    the final segmenter's validation Dice (``RUN_DIR/postprocess.json``
    records the per-class Dice with and without)."""
    from rr_tf.postprocess import choose_classes

    if mode == "all":
        return list(labels)
    if mode == "none":
        return []
    if validation is None:
        log("largest-component postprocessing: no validation case to choose it on; off")
        return []
    # the best weights' predictions when this process found them, else (a resumed run) anew
    preds = validation.best_predictions or validation.predictions()
    chosen, table = choose_classes(preds, [c["label"] for c in val_cases], labels)
    run.write_json("postprocess.json", {
        "largest_component": chosen, "validation_cases": [c["case_id"] for c in val_cases],
        "dice_without_with": {str(c): list(v) for c, v in table.items()}})
    log(f"largest-component postprocessing chosen on {len(val_cases)} validation case(s) for "
        f"classes {chosen or 'none'}; details in {run.path}/postprocess.json")
    return chosen


@shard_errors_named()
def run_finetuning(config, log=None):
    """Runs (or resumes) a fine-tuning; returns the final metrics dict."""
    log = log or (lambda m: print(m, file=sys.stderr))
    config.validate()
    manifest = records.read_manifest(config.data_dir)
    records.check_crop_fits(manifest, config.crop_size)
    spec = manifest["spec_obj"].with_normalization(config.normalization,
                                                   manifest.get("intensity_properties"))
    num_classes = num_classes_of(manifest)
    labelled = choose_labeled(manifest, config.num_labeled, config.seed)
    mode = "mean_teacher" if config.mean_teacher else "supervised"
    unlabelled = unlabelled_cases(manifest, labelled) if config.mean_teacher else []
    if config.mean_teacher and not unlabelled:
        raise ConfigError("consistency_weight", f"the mean teacher (consistency_weight > 0) needs "
                          f"unlabelled training cases, but the labelled budget "
                          f"(num_labeled={config.num_labeled}) takes all {len(labelled)} training "
                          "cases; lower --num_labeled or set --consistency_weight=0")
    # the architecture: from the pre-trained parts (keys must match) or from the config;
    # read before the run directory is made, so a wrong --pretrained leaves nothing behind
    src_parts = src_spec = None
    if config.pretrained:
        src_parts, src_spec = source_parts(config.pretrained, flag="pretrained")
        kind = (segmenters.kind_for_parts(src_parts) if config.segmenter == "auto"
                else config.segmenter)
        args = dict(segmenters.architecture_from(src_parts, kind), **config.segmenter_args)
    else:
        kind = "unet" if config.segmenter == "auto" else config.segmenter
        args = dict(config.segmenter_args)
    if args.get("deep_supervision") and kind != "unet":
        raise ConfigError("deep_supervision", f"only the unet segmenter has deep-supervision "
                          f"heads; this fine-tuning builds a {kind} segmenter")
    run = config.run_dir_of_this_worker()
    before = None if config.overwrite else run.state()
    if before is not None and before.get("method") == "finetune" and \
            before.get("mode", "supervised") != mode:
        held = before.get("mode", "supervised")
        raise ConfigError("consistency_weight", f"{run.path} holds a {held} fine-tuning; it cannot "
                          f"be resumed as {mode} (use another --run_dir or --overwrite)")
    resumed = run.prepare("finetune", spec, config.train_steps, config.overwrite)

    run.write_state(kind=kind, segmenter_args=args, num_classes=num_classes,
                    crop_size=list(config.crop_size), seed=config.seed,
                    pretrained=config.pretrained, load_weights=config.load_weights,
                    labelled_cases=labelled, mode=mode)
    run.write_json("labelled_cases.json", labelled)
    if config.mean_teacher:
        run.write_state(unlabelled_cases=unlabelled, consistency_weight=config.consistency_weight,
                        consistency_rampup_steps=config.consistency_rampup_steps,
                        teacher_momentum=config.teacher_momentum,
                        unlabelled_batch_size=config.unlabelled_batch_size or config.batch_size,
                        consistency_noise=config.consistency_noise)
        run.write_json("unlabelled_cases.json", unlabelled)
    strategy, jit, step0 = config.start(run)
    log(f"finetune: {'resuming at step ' + str(step0) if resumed and step0 else 'new run'} in "
        f"{run.chief.path}{run.role_note()}; {kind} segmenter, {num_classes} classes, "
        f"{len(labelled)} labelled case(s) "
        f"{labelled if len(labelled) <= 8 else ''}; "
        f"{_start_point(config)}")
    stream = StreamConfig(batch_size=config.batch_size, crops_per_volume=config.crops_per_volume,
                          seed=config.seed + _DATA_RESEED * step0, case_ids=tuple(labelled),
                          **config.stream_checks())
    recipe = recipes.finetune_patch(
        config.crop_size, fg_fraction=config.fg_fraction, sampling=config.patch_sampling,
        spatial=recipes.finetune_augmentation(
            config.flip_axes, config.intensity_augment, hu_per_unit=spec.hu_per_unit,
            scale=config.scale_range, degrees=config.rotation_degrees,
            anisotropy=config.anisotropy, elastic=config.elastic_voxels),
        tissue_shift_hu=config.tissue_shift_hu)
    dataset, _ = view_dataset(config.data_dir, "train", recipe, stream, labelled=True, spec=spec)
    dataset = dataset.map(lambda b: {"image": b["image"], "label": b["label"]})
    if config.mean_teacher:
        log(f"mean teacher: {len(unlabelled)} unlabelled training case(s), consistency weight "
            f"{config.consistency_weight} (ramp-up {config.consistency_rampup_steps} steps), "
            f"teacher momentum {config.teacher_momentum}")
        extra_stream = unlabelled_stream(config, unlabelled,
                                         config.seed + _UNLABELLED_RESEED + _DATA_RESEED * step0,
                                         spec)
        dataset = tf.data.Dataset.zip((dataset, extra_stream)).map(
            lambda b, u: {"image": b["image"], "label": b["label"], "unlabelled": u["view"]})
    preview = next(iter(dataset))
    with strategy.scope():
        segmenter = segmenters.build_segmenter(kind, num_classes, **args)
        divisor = getattr(segmenter, "divisor", 1)
        if any(c % divisor for c in config.crop_size):
            raise ConfigError("crop_size", f"the {kind} segmenter needs multiples of {divisor}, "
                              f"got {tuple(config.crop_size)}")
        if config.mean_teacher:
            from rr_tf.training.mean_teacher import MeanTeacherTask

            task = MeanTeacherTask(segmenter, num_classes, config.class_weights,
                                   config.freeze_encoder_steps,
                                   consistency_weight=config.consistency_weight,
                                   rampup_steps=config.consistency_rampup_steps,
                                   teacher_momentum=config.teacher_momentum,
                                   noise_std=config.consistency_noise, seed=config.seed)
        else:
            task = SegmentationTask(segmenter, num_classes, config.class_weights,
                                    config.freeze_encoder_steps)
        task.compile(optimizer=config.build_optimizer(), jit_compile=jit)
        task.build_for(preview)
        if config.pretrained and config.load_weights and step0 == 0:
            report = load_pretrained(segmenter, config.pretrained, config.parts, spec,
                                     config.allow_spec_mismatch, src_parts, src_spec)
            report.save(os.path.join(run.path, "transfer.json"))
            if config.mean_teacher:  # the teacher starts from the pre-trained student
                task.sync_teacher()
            log(f"pretrained: {report.summary()}; details in {run.path}/transfer.json")
    val_cases = validation_cases(config.data_dir, spec, config.val_cases, config.stream_checks())
    extra = []
    labels = list(range(1, num_classes))
    validation = None
    if val_cases:
        validation = Validation(val_cases, config.crop_size, config.val_every,
                                os.path.join(run.path, "best"), run.tensorboard + "/validation",
                                labels, config.val_overlap, config.val_window_batch, log=log,
                                names=records.label_names(manifest))
        extra.append(validation)
    else:
        log("no labelled validation case: no validation, the last weights are exported")
    hparams = dict(kind=kind, num_classes=num_classes, num_labeled=len(labelled),
                   pretrained=str(config.pretrained), load_weights=config.load_weights,
                   learning_rate=config.learning_rate,
                   batch_size=config.batch_size, crop_size=str(config.crop_size),
                   freeze_encoder_steps=config.freeze_encoder_steps, spec_hash=spec.hash,
                   mode=mode)
    if config.mean_teacher:
        hparams.update(num_unlabelled=len(unlabelled), consistency_weight=config.consistency_weight,
                       consistency_rampup_steps=config.consistency_rampup_steps,
                       teacher_momentum=config.teacher_momentum,
                       unlabelled_batch_size=config.unlabelled_batch_size or config.batch_size,
                       consistency_noise=config.consistency_noise)
    result = loop.train(task, dataset, run,
                        config.train_config(),
                        preview_batch=preview, hparams=hparams, callbacks=extra)
    best = _read_best(os.path.join(run.path, "best"))
    if best is not None:
        segmenter.load_weights(os.path.join(run.path, "best", "segmenter.weights.h5"))
    components = choose_postprocessing(config.largest_component, validation, val_cases, labels,
                                       run, log)
    metrics = dict(result["metrics"], step=result["step"], spec_hash=spec.hash, kind=kind,
                   best=best, labelled_cases=labelled, mode=mode, largest_component=components)
    run.write_metrics(metrics)
    if config.export:
        from rr_tf.export import export_segmenter

        paths = export_segmenter(segmenter, run.export, spec, window=tuple(config.crop_size),
                                 overlap=config.val_overlap, sample=preview["image"][:1],
                                 largest_component=components,
                                 label_names=records.label_names(manifest))
        log(f"exported the {'best' if best else 'last'} segmenter: {paths[0]} and {paths[1]}")
    return metrics
