"""Finding the cases of a data source and loading one case.

A source is either the synthetic phantom (``"phantom"``) or a folder holding
NIfTI files (``case.nii.gz``; nnU-Net style ``case_0000.nii.gz`` also works)
and/or DICOM series folders (any depth; one case per series folder). Label
maps are NIfTI files in a separate folder, matched by case name.
"""

import csv
import dataclasses
import hashlib
import os

import numpy as np

from rr_tf.errors import DataError
from rr_tf.data import nifti

PHANTOM = "phantom"
_MODALITY_SUFFIX = "_0000"


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
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


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


def discover(source, labels_dir=None, patient_table=None, dicom_all_series=False):
    """Lists the cases under folder ``source``.

    Returns:
      (tasks, problems, notes): tasks sorted by case id; problems is a list
      of DataError for entries that cannot become a case (duplicate names,
      mixed DICOM series ...); notes lists harmless observations (labels
      without an image, ignored files).
    """
    from rr_tf.data import dicom

    if not os.path.isdir(source):
        raise DataError(source, "source folder does not exist (or use --source=phantom)")
    labels = _label_index(labels_dir)
    patients = read_patient_table(patient_table) if patient_table else {}
    found, problems, notes, ignored = {}, [], [], 0

    def add(task):
        if task.case_id in found:
            problems.append(DataError(task.image, f"case name {task.case_id!r} is also used by "
                                      f"{found[task.case_id].image}"))
            return
        found[task.case_id] = task

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
                    problems.append(err)
                    continue
                for uid in series:
                    sid = cid if len(series) == 1 else f"{cid}__{uid}"
                    add(CaseTask(case_id=sid, kind="dicom", image=root, series_uid=uid,
                                 label=labels.get(sid), patient_id=patients.get(sid, header_pid)))
            else:
                add(CaseTask(case_id=cid, kind="dicom", image=root, label=labels.get(cid),
                             patient_id=patients.get(cid, header_pid)))
    unmatched = sorted(set(labels) - set(found))
    if unmatched:
        notes.append(f"{len(unmatched)} label file(s) match no image: {', '.join(unmatched[:5])}"
                     + (" ..." if len(unmatched) > 5 else ""))
    if ignored:
        notes.append(f"ignored {ignored} file(s) in {source} that are neither NIfTI nor DICOM folders")
    return [found[k] for k in sorted(found)], problems, notes


def preflight(task):
    """Cheap header-only checks, run before any heavy work. Raises DataError."""
    if task.kind != "nifti":
        return
    shape, affine = nifti.peek_nifti(task.image)
    if task.label:
        lshape, laffine = nifti.peek_nifti(task.label)
        if lshape != shape:
            raise DataError(task.label, f"label shape {lshape} does not match image shape {shape} "
                            f"({task.image})")
        from rr_tf.data.preprocess import affines_match

        if not affines_match(affine, laffine):
            raise DataError(task.label, f"label affine does not match the image affine ({task.image})")


def load_case(task):
    """Reads a case: returns (image Volume, label Volume or None)."""
    if task.kind == "phantom":
        from rr_tf.data.phantom import PhantomConfig, generate_phantom

        ph = generate_phantom(task.seed, PhantomConfig(shape=tuple(task.phantom_shape)))
        return ph.to_volumes(task.case_id)
    if task.kind == "nifti":
        image = nifti.read_nifti(task.image, kind="image")
    elif task.kind == "dicom":
        from rr_tf.data.dicom import read_dicom_series

        image = read_dicom_series(task.image, series_uid=task.series_uid)
    else:
        raise ValueError(f"unknown case kind {task.kind!r}")
    label = nifti.read_nifti(task.label, kind="label") if task.label else None
    return image, label
