"""Finding the cases of a data source and loading one case.

A source is the synthetic phantom (``"phantom"``) or a folder in one of
three layouts (:func:`detect_layout`):

- ``"plain"``: NIfTI files (``case.nii.gz``; nnU-Net style
  ``case_0000.nii.gz`` also works) and/or DICOM series folders (any depth;
  one case per series folder). Label maps are NIfTI files in a separate
  folder, matched by case name.
- ``"msd"``: the Medical Segmentation Decathlon / nnU-Net raw layout,
  ``dataset.json`` + ``imagesTr/`` + ``labelsTr/`` (+ optional ``imagesTs/``,
  whose cases are unlabelled); label names come from ``dataset.json``.
- ``"bdmap"``: the AbdomenAtlas layout, ``<case>/ct.nii.gz`` +
  ``<case>/segmentations/<organ>.nii.gz`` (one binary mask per organ),
  merged into one label map at load time; organs are numbered 1..K in the
  sorted order of every organ file name in the data set.
"""

import csv
import dataclasses
import hashlib
import json
import os

import numpy as np

from rr_tf.errors import DataError
from rr_tf.data import nifti

PHANTOM = "phantom"
_MODALITY_SUFFIX = "_0000"
LAYOUTS = ("plain", "msd", "bdmap")
DATASET_JSON = "dataset.json"
BDMAP_IMAGES = ("ct.nii.gz", "ct.nii")
BDMAP_MASKS = "segmentations"


@dataclasses.dataclass(frozen=True)
class CaseTask:
    """Everything a worker process needs to load one case (picklable)."""

    case_id: str
    kind: str                      # "nifti" | "dicom" | "phantom"
    image: str = ""                # file or folder; "" for phantoms
    label: str | None = None
    patient_id: str | None = None
    series_uid: str | None = None
    seed: int | None = None
    phantom_shape: tuple | None = None
    # BDMAP: ((label value, mask file), ...) merged into one label map in
    # ascending value order; ``label`` is then the segmentations/ folder
    label_masks: tuple | None = None

    @property
    def source(self):
        return self.image or f"phantom:{self.case_id}"

    def fingerprint(self):
        """Changes whenever the inputs of this case change (paths, sizes, mtimes)."""
        parts = [self.case_id, self.kind, str(self.patient_id), str(self.series_uid),
                 str(self.seed), str(self.phantom_shape)]
        for path in (self.image, self.label):
            if not path:
                parts.append("-")
            elif os.path.isdir(path):
                stats = [os.stat(os.path.join(path, n)) for n in sorted(os.listdir(path))]
                parts.append(f"{path}:{len(stats)}:{sum(s.st_size for s in stats)}:"
                             f"{max((s.st_mtime_ns for s in stats), default=0)}")
            elif os.path.exists(path):
                st = os.stat(path)
                parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
            else:
                parts.append(f"{path}:missing")
        if self.label_masks:  # the numbering too: a new organ elsewhere renumbers this case
            parts.append(repr(self.label_masks))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


@dataclasses.dataclass
class Discovery:
    """What :func:`find_cases` found under a source folder."""

    tasks: list                  # CaseTask, sorted by case id
    problems: list               # DataError per entry that cannot become a case
    notes: list                  # harmless observations, one line each
    layout: str = "plain"        # one of LAYOUTS
    label_names: dict | None = None  # {value: name} the layout declares, else None


def phantom_seed(seed, index):
    """Seed of phantom case ``index`` of a data set made with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def phantom_tasks(num_cases, seed, shape):
    return [CaseTask(case_id=f"phantom_{i:04d}", kind="phantom", seed=phantom_seed(seed, i),
                     phantom_shape=tuple(shape)) for i in range(num_cases)]


def read_patient_table(path):
    """CSV with columns ``case_id,patient_id`` -> dict."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise DataError(path, f"cannot read patient table ({err})")
    if not rows or not {"case_id", "patient_id"} <= set(rows[0]):
        raise DataError(path, "patient table needs a header with columns case_id,patient_id")
    return {r["case_id"].strip(): r["patient_id"].strip() for r in rows}


def _strip_modality(name):
    return name[: -len(_MODALITY_SUFFIX)] if name.endswith(_MODALITY_SUFFIX) else name


def _label_index(labels_dir):
    if labels_dir is None:
        return {}
    if not os.path.isdir(labels_dir):
        raise DataError(labels_dir, "labels folder does not exist")
    return {_strip_modality(nifti.case_name(n)): os.path.join(labels_dir, n)
            for n in sorted(os.listdir(labels_dir)) if nifti.is_nifti(n)}


class _Cases:
    """Collects tasks; a second task with a case name already taken is a problem."""

    def __init__(self):
        self.found, self.problems = {}, []

    def add(self, task):
        if task.case_id in self.found:
            self.problems.append(DataError(task.image, f"case name {task.case_id!r} is also used "
                                           f"by {self.found[task.case_id].image}"))
            return
        self.found[task.case_id] = task

    def sorted(self):
        return [self.found[k] for k in sorted(self.found)]


def _listing(names, limit=5):
    names = list(names)
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _bdmap_image(folder):
    """``folder/ct.nii.gz`` (or ``ct.nii``) when present, else None."""
    for name in BDMAP_IMAGES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def detect_layout(source):
    """``"msd"`` (``dataset.json`` and ``imagesTr/``), ``"bdmap"`` (a
    sub-folder holding ``ct.nii.gz``) or ``"plain"`` for folder ``source``.
    Cheap: looks at the top level only."""
    if (os.path.isfile(os.path.join(source, DATASET_JSON))
            and os.path.isdir(os.path.join(source, "imagesTr"))):
        return "msd"
    try:
        entries = sorted(os.listdir(source))
    except OSError:
        return "plain"
    for name in entries:
        folder = os.path.join(source, name)
        if not name.startswith(".") and os.path.isdir(folder) and _bdmap_image(folder):
            return "bdmap"
    return "plain"


def read_dataset_json(path):
    """Label names ``{value: name}`` (background left out) of a Decathlon
    (``"labels": {"0": "background", "1": "liver"}``) or nnU-Net v2
    (``"labels": {"background": 0, "liver": 1}``) ``dataset.json``.

    Raises DataError naming the file when it is not JSON, has no
    ``"labels"``, declares more than one input channel (``"channel_names"``
    / ``"modality"``; rr_tf reads single-channel CT), uses region labels
    (a list of values), or files that are not NIfTI (``"file_ending"``).
    """
    try:
        with open(path) as f:
            info = json.load(f)
    except ValueError as err:
        raise DataError(path, f"not valid JSON ({err})")
    except OSError as err:
        raise DataError(path, f"cannot read ({err.strerror or err})")
    if not isinstance(info, dict):
        raise DataError(path, f"must be a JSON object, not {type(info).__name__}")
    for key in ("channel_names", "modality"):
        channels = info.get(key)
        if isinstance(channels, (dict, list)) and len(channels) > 1:
            listed = channels.values() if isinstance(channels, dict) else channels
            raise DataError(path, f'"{key}" declares {len(channels)} input channels '
                            f'({", ".join(map(str, listed))}); rr_tf reads single-channel CT only')
    ending = info.get("file_ending")
    if ending is not None and str(ending).lower() not in (".nii.gz", ".nii"):
        raise DataError(path, f'"file_ending" {ending!r} is not NIfTI; rr_tf reads .nii.gz / .nii')
    if "labels" not in info:
        raise DataError(path, 'has no "labels" entry (the label names)')
    labels = info["labels"]
    if not isinstance(labels, dict) or not labels:
        raise DataError(path, '"labels" must be a non-empty object')
    decathlon = all(isinstance(v, str) for v in labels.values())  # else nnU-Net v2
    names = {}
    for key, value in labels.items():
        if isinstance(value, list):
            raise DataError(path, f'"labels": {key!r} is a region (a list of values {value}); '
                            "region-based labels are not supported, give one value per label")
        if decathlon and key.strip().isdigit():
            number, name = int(key.strip()), value.strip()
        elif not decathlon and isinstance(value, int) and not isinstance(value, bool):
            number, name = value, key.strip()
        else:
            raise DataError(path, f'"labels" entry {key!r}: {value!r} does not fit the form '
                            '{"1": "liver", ...} (Decathlon) nor {"liver": 1, ...} (nnU-Net v2)')
        if not 0 <= number <= 255:
            raise DataError(path, f'"labels": value {number} ({name!r}) is outside 0..255')
        if not name:
            raise DataError(path, f'"labels": value {number} has an empty name')
        if number in names:
            raise DataError(path, f'"labels": value {number} is named twice ({names[number]!r}, '
                            f"{name!r})")
        names[number] = name
    names.pop(0, None)
    if len(set(names.values())) != len(names):
        raise DataError(path, f'"labels" repeats a name: {sorted(names.values())}')
    return dict(sorted(names.items()))


def find_cases(source, labels_dir=None, patient_table=None, dicom_all_series=False):
    """Lists the cases under folder ``source`` in whichever layout it has.

    Returns a :class:`Discovery`: tasks sorted by case id; problems is a
    list of DataError for entries that cannot become a case (duplicate
    names, mixed DICOM series ...); notes lists harmless observations
    (labels without an image, unlabelled cases, ignored files); the layout
    and the label names it declares. Raises DataError for a source that
    cannot be read at all (missing folder, bad ``dataset.json``).
    """
    if not os.path.isdir(source):
        raise DataError(source, "source folder does not exist (or use --source=phantom)")
    layout = detect_layout(source)
    patients = read_patient_table(patient_table) if patient_table else {}
    if layout != "plain" and labels_dir is not None:
        raise DataError(labels_dir, f"the {layout} layout of {source} brings its own labels; "
                        "do not pass a labels folder")
    if layout == "msd":
        return _find_msd(source, patients)
    if layout == "bdmap":
        return _find_bdmap(source, patients)
    if os.path.isdir(os.path.join(source, "imagesTr")):
        raise DataError(os.path.join(source, DATASET_JSON),
                        "missing: a folder with imagesTr/ needs its dataset.json to be read as a "
                        f"Decathlon / nnU-Net data set (or pass --source={source}/imagesTr "
                        f"--labels={source}/labelsTr)")
    tasks, problems, notes = _find_plain(source, labels_dir, patients, dicom_all_series)
    return Discovery(tasks, problems, notes, layout="plain")


def discover(source, labels_dir=None, patient_table=None, dicom_all_series=False):
    """:func:`find_cases` as the tuple ``(tasks, problems, notes)``."""
    found = find_cases(source, labels_dir, patient_table, dicom_all_series)
    return found.tasks, found.problems, found.notes


def _find_plain(source, labels_dir, patients, dicom_all_series):
    from rr_tf.data import dicom

    labels = _label_index(labels_dir)
    cases, ignored, notes = _Cases(), 0, []
    add = cases.add
    for root, dirs, files in os.walk(source):
        dirs.sort()
        rel = os.path.relpath(root, source)
        if rel == ".":
            for name in sorted(files):
                if nifti.is_nifti(name):
                    cid = _strip_modality(nifti.case_name(name))
                    add(CaseTask(case_id=cid, kind="nifti", image=os.path.join(root, name),
                                 label=labels.get(cid), patient_id=patients.get(cid)))
                elif not name.startswith("."):
                    ignored += 1
        if rel != "." and dicom.is_dicom_dir(root):
            cid = rel.replace(os.sep, "__")
            header_pid = dicom.first_patient_id(root)
            if dicom_all_series:
                try:
                    series = sorted(dicom.list_series(root))
                except DataError as err:
                    cases.problems.append(err)
                    continue
                for uid in series:
                    sid = cid if len(series) == 1 else f"{cid}__{uid}"
                    add(CaseTask(case_id=sid, kind="dicom", image=root, series_uid=uid,
                                 label=labels.get(sid), patient_id=patients.get(sid, header_pid)))
            else:
                add(CaseTask(case_id=cid, kind="dicom", image=root, label=labels.get(cid),
                             patient_id=patients.get(cid, header_pid)))
    unmatched = sorted(set(labels) - set(cases.found))
    if unmatched:
        notes.append(f"{len(unmatched)} label file(s) match no image: {_listing(unmatched)}")
    if ignored:
        notes.append(f"ignored {ignored} file(s) in {source} that are neither NIfTI nor DICOM folders")
    return cases.sorted(), cases.problems, notes


def _nifti_files(folder):
    """(sorted NIfTI file names in ``folder``, count of other entries);
    hidden files (``._case.nii.gz`` from macOS archives) count as other."""
    files, other = [], 0
    for name in sorted(os.listdir(folder)):
        if not name.startswith(".") and nifti.is_nifti(name) and os.path.isfile(
                os.path.join(folder, name)):
            files.append(name)
        else:
            other += 1
    return files, other


def _find_msd(source, patients):
    """Decathlon / nnU-Net raw layout: ``imagesTr`` cases are labelled from
    ``labelsTr`` (matched by case name, channel suffix ``_0000`` removed),
    ``imagesTs`` cases join as unlabelled cases."""
    names = read_dataset_json(os.path.join(source, DATASET_JSON))
    labels_dir = os.path.join(source, "labelsTr")
    labels = {}
    if os.path.isdir(labels_dir):
        files, _ = _nifti_files(labels_dir)
        labels = {_strip_modality(nifti.case_name(n)): os.path.join(labels_dir, n) for n in files}
    cases, notes, ignored = _Cases(), [], 0
    train_cases, unlabelled_tr, test_cases = set(), [], []
    for sub in ("imagesTr", "imagesTs"):
        folder = os.path.join(source, sub)
        if not os.path.isdir(folder):
            continue
        files, other = _nifti_files(folder)
        ignored += other
        for name in files:
            cid = _strip_modality(nifti.case_name(name))
            label = labels.get(cid) if sub == "imagesTr" else None
            if sub == "imagesTr":
                train_cases.add(cid)
                if label is None:
                    unlabelled_tr.append(cid)
            else:
                test_cases.append(cid)
            cases.add(CaseTask(case_id=cid, kind="nifti", image=os.path.join(folder, name),
                               label=label, patient_id=patients.get(cid)))
    unmatched = sorted(set(labels) - train_cases)
    if not os.path.isdir(labels_dir):
        notes.append(f"{labels_dir} does not exist: every imagesTr case is unlabelled")
    elif unlabelled_tr:
        notes.append(f"{len(unlabelled_tr)} image(s) in imagesTr have no label in labelsTr and "
                     f"are used unlabelled: {_listing(unlabelled_tr)}")
    if unmatched:
        notes.append(f"{len(unmatched)} label file(s) in labelsTr match no image in imagesTr: "
                     f"{_listing(unmatched)}")
    if test_cases:
        notes.append(f"{len(test_cases)} imagesTs case(s) added as unlabelled cases")
    if ignored:
        notes.append(f"ignored {ignored} entries in imagesTr/imagesTs that are not NIfTI files "
                     "(hidden files included)")
    return Discovery(cases.sorted(), cases.problems, notes, layout="msd", label_names=names)


def _find_bdmap(source, patients):
    """AbdomenAtlas layout: one folder per case with ``ct.nii.gz`` and
    optionally ``segmentations/<organ>.nii.gz``; organs numbered 1..K in
    the sorted order of all organ names of the data set."""
    cases, notes, problems = _Cases(), [], []
    found = []   # (case id, ct file, segmentations folder or None, {organ: mask file})
    skipped, unlabelled, other_files, loose, hidden = [], [], 0, 0, []
    for name in sorted(os.listdir(source)):
        folder = os.path.join(source, name)
        if name.startswith(".") and (os.path.isdir(folder) or nifti.is_nifti(name)):
            hidden.append(name)
        if name.startswith(".") or not os.path.isdir(folder):
            if nifti.is_nifti(name) and not name.startswith("."):
                loose += 1
            continue
        ct = _bdmap_image(folder)
        seg_dir = os.path.join(folder, BDMAP_MASKS)
        if ct is None:
            if os.path.isdir(seg_dir):
                problems.append(DataError(folder, f"case folder has {BDMAP_MASKS}/ but no "
                                          "ct.nii.gz"))
            else:
                skipped.append(name)
            continue
        masks = {}
        if os.path.isdir(seg_dir):
            files, other = _nifti_files(seg_dir)
            other_files += other
            masks = {nifti.case_name(f): os.path.join(seg_dir, f) for f in files}
        if not masks:
            unlabelled.append(name)
        found.append((name, ct, seg_dir if masks else None, masks))
    organs = sorted({organ for *_, masks in found for organ in masks})
    if len(organs) > 255:
        raise DataError(source, f"{len(organs)} different organ masks; at most 255 labels fit "
                        "uint8")
    value = {organ: i + 1 for i, organ in enumerate(organs)}
    for name, ct, seg_dir, masks in found:
        cases.add(CaseTask(
            case_id=name, kind="nifti", image=ct, label=seg_dir, patient_id=patients.get(name),
            label_masks=tuple(sorted((value[o], p) for o, p in masks.items())) or None))
    if unlabelled:
        notes.append(f"{len(unlabelled)} case folder(s) without organ masks in {BDMAP_MASKS}/ are "
                     f"unlabelled: {_listing(unlabelled)}")
    if skipped:
        notes.append(f"ignored {len(skipped)} folder(s) without ct.nii.gz: {_listing(skipped)}")
    if other_files:
        notes.append(f"ignored {other_files} entries in {BDMAP_MASKS}/ folders that are not NIfTI "
                     "files")
    if loose:
        notes.append(f"ignored {loose} NIfTI file(s) directly in {source}: the AbdomenAtlas layout "
                     "reads <case>/ct.nii.gz")
    if hidden:
        notes.append(f"ignored {len(hidden)} hidden entr{'y' if len(hidden) == 1 else 'ies'} in "
                     f"{source} (names starting with '.'): {_listing(hidden)}")
    return Discovery(cases.sorted(), problems + cases.problems, notes, layout="bdmap",
                     label_names={value[o]: o for o in organs} or None)


def _check_grid(path, shape, affine, image_path, what, max_voxels=nifti.MAX_VOXELS):
    from rr_tf.data.preprocess import affines_match

    lshape, laffine = nifti.peek_nifti(path, max_voxels)
    if lshape != shape:
        raise DataError(path, f"{what} shape {lshape} does not match image shape {shape} "
                        f"({image_path})")
    if not affines_match(affine, laffine):
        raise DataError(path, f"{what} affine does not match the image affine ({image_path})")


def preflight(task, max_voxels=nifti.MAX_VOXELS):
    """Cheap header-only checks, run before any heavy work (the declared
    voxel data against the file size and ``max_voxels`` included). Raises
    DataError."""
    if task.kind != "nifti":
        return
    shape, affine = nifti.peek_nifti(task.image, max_voxels)
    if task.label_masks:
        for _, path in task.label_masks:
            _check_grid(path, shape, affine, task.image, "mask", max_voxels)
    elif task.label:
        _check_grid(task.label, shape, affine, task.image, "label", max_voxels)


def merge_masks(image, masks, source, max_voxels=nifti.MAX_VOXELS):
    """One uint8 label map from binary organ masks ``((value, file), ...)``
    on ``image``'s grid: each mask's voxels get its value, masks applied in
    ascending value order, so where masks overlap the higher value (the
    organ name later in sorted order) wins. Raises DataError naming the
    mask file that is on another grid or holds values other than 0/1."""
    from rr_tf.data.preprocess import affines_match
    from rr_tf.data.volume import Volume

    label = np.zeros(image.shape, np.uint8)
    for value, path in sorted(masks):
        mask = nifti.read_nifti(path, kind="label", max_voxels=max_voxels)
        if mask.shape != image.shape:
            raise DataError(path, f"mask shape {mask.shape} does not match image shape "
                            f"{image.shape} ({image.source})")
        if not affines_match(mask.affine, image.affine):
            diff = float(np.max(np.abs(mask.affine - image.affine)))
            raise DataError(path, f"mask affine differs from the image affine by up to "
                            f"{diff:.4g} mm ({image.source})")
        if mask.array.max(initial=0) > 1:
            bad = np.unique(mask.array[mask.array > 1])
            raise DataError(path, f"organ mask holds values {bad[:5].tolist()}"
                            f"{' ...' if bad.size > 5 else ''}; a mask must be binary (0/1)")
        label[mask.array > 0] = value
    return Volume(array=label, affine=np.array(image.affine), source=source)


def load_case(task, max_voxels=nifti.MAX_VOXELS):
    """Reads a case: returns (image Volume, label Volume or None).
    ``max_voxels``: the largest NIfTI image a header may declare."""
    if task.kind == "phantom":
        from rr_tf.data.phantom import PhantomConfig, generate_phantom

        ph = generate_phantom(task.seed, PhantomConfig(shape=tuple(task.phantom_shape)))
        return ph.to_volumes(task.case_id)
    if task.kind == "nifti":
        image = nifti.read_nifti(task.image, kind="image", max_voxels=max_voxels)
    elif task.kind == "dicom":
        from rr_tf.data.dicom import read_dicom_series

        image = read_dicom_series(task.image, series_uid=task.series_uid)
    else:
        raise ValueError(f"unknown case kind {task.kind!r}")
    if task.label_masks:
        return image, merge_masks(image, task.label_masks, task.label or task.image, max_voxels)
    label = (nifti.read_nifti(task.label, kind="label", max_voxels=max_voxels)
             if task.label else None)
    return image, label
