"""prepare(): NIfTI folders -> shards + manifest, read back exactly."""

import json
import os

import numpy as np
import pytest

from rr_tf.errors import DataError, SpecMismatchError
from rr_tf.data import records
from rr_tf.data.prepare import PrepareConfig, assign_splits, prepare
from rr_tf.data.preprocess import restore_original_grid, to_canonical
from rr_tf.data.spec import PreprocessSpec
from nifti_factory import make_affine, ramp_volume, rotation, write

CASES = {
    # name: (shape, affine, stored dtype, slope/inter)
    "case_a": ((12, 10, 8), make_affine((0.8, 0.8, 2.5), flips=(-1, -1, 1), origin=(90, 100, -40)),
               np.int16, None),
    "case_b": ((10, 9, 11), make_affine((1.1, 0.7, 3.0), rot=rotation(2, 20), perm=(2, 0, 1),
                                         flips=(1, -1, -1)), np.uint16, (1.0, -2048.0)),
    "case_c": ((9, 12, 10), make_affine((0.6, 0.9, 1.5), rot=rotation(0, -15) @ rotation(1, 8),
                                         perm=(1, 2, 0)), np.float32, None),
}


def _make_folder(root, labels=True):
    img_dir, lab_dir = root / "images", root / "labels"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(exist_ok=True)
    truth = {}
    for i, (name, (shape, aff, dtype, scale)) in enumerate(CASES.items()):
        hu = np.rint(ramp_volume(shape, seed=i) * 1.5) + 900
        hu[0, 0, 0] = -1500  # outside the window: clipped on storage
        if scale:
            write(img_dir / f"{name}_0000.nii.gz", (hu - scale[1]) / scale[0], aff, dtype=dtype,
                  slope=scale[0], inter=scale[1])
        else:
            write(img_dir / f"{name}.nii.gz", hu, aff, dtype=dtype)
        lab = (np.arange(hu.size).reshape(shape) % 4).astype(np.uint8)
        if labels:
            write(lab_dir / f"{name}.nii.gz", lab, aff, dtype=np.uint8)
        truth[name] = (hu, lab, aff)
    return img_dir, lab_dir, truth


def _config(src, out, labels=None, **kw):
    kw.setdefault("spec", PreprocessSpec(spacing=None, hu_window=(-1000, 1000)))
    return PrepareConfig(source=str(src), output_dir=str(out), labels_dir=labels and str(labels),
                         workers=1, progress=False, cases_per_shard=2, **kw)


def _files(folder):
    return sorted(os.listdir(folder))


def test_round_trip_hu_labels_and_geometry(tmp_path):
    img_dir, lab_dir, truth = _make_folder(tmp_path)
    out = tmp_path / "shards"
    result = prepare(_config(img_dir, out, lab_dir, val_fraction=0.34))
    assert result.published and not result.bad
    manifest = records.read_manifest(out)
    records.verify_shards(out, manifest)  # sizes + sha256
    assert manifest["spec_hash"] == PreprocessSpec(spacing=None).hash
    assert manifest["splits"] == {"train": 2, "val": 1}
    assert {c["case_id"] for c in manifest["cases"]} == set(CASES)
    assert sum(s["num_records"] for s in manifest["shards"]) == 3
    assert json.load(open(out / "preprocess.json"))["spacing"] is None
    seen = 0
    for case in records.iterate_cases(out):
        hu, lab, aff = truth[case["case_id"]]
        meta = case["meta"]
        np.testing.assert_allclose(meta["original"]["affine"], aff, atol=1e-5)
        assert meta["original"]["shape"] == list(hu.shape)
        assert meta["original"]["label_source"].endswith(f"{case['case_id']}.nii.gz")
        # stored = canonical orientation, same HU (clipped) and labels
        can_hu, _ = to_canonical(np.clip(hu, -1000, 1000), aff)
        np.testing.assert_array_equal(case["image"], can_hu)
        back = restore_original_grid(case["image"], np.array(meta["affine"]), aff, hu.shape)
        np.testing.assert_array_equal(back, np.clip(hu, -1000, 1000))
        np.testing.assert_array_equal(
            restore_original_grid(case["label"], np.array(meta["affine"]), aff, hu.shape), lab)
        seen += 1
    assert seen == 3


def test_rerun_is_idempotent_and_spec_change_is_refused(tmp_path):
    img_dir, lab_dir, _ = _make_folder(tmp_path)
    out = tmp_path / "shards"
    first = prepare(_config(img_dir, out, lab_dir))
    stamps = {n: os.stat(out / n).st_mtime_ns for n in _files(out)}
    again = prepare(_config(img_dir, out, lab_dir))
    assert again.up_to_date and not again.published
    assert {n: os.stat(out / n).st_mtime_ns for n in _files(out)} == stamps
    with pytest.raises(SpecMismatchError) as info:
        prepare(_config(img_dir, out, lab_dir, spec=PreprocessSpec(spacing=(2, 2, 2))))
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert {n: os.stat(out / n).st_mtime_ns for n in _files(out)} == stamps
    # --overwrite replaces the data set and removes the old generation's shards
    new = prepare(_config(img_dir, out, lab_dir, spec=PreprocessSpec(spacing=(2, 2, 2)),
                          overwrite=True))
    names = {s["name"] for s in new.manifest["shards"]}
    assert names.isdisjoint({s["name"] for s in first.manifest["shards"]})
    assert set(_files(out)) == names | {"manifest.json", "preprocess.json"}


def test_changed_input_triggers_rebuild(tmp_path):
    img_dir, lab_dir, _ = _make_folder(tmp_path)
    out = tmp_path / "shards"
    prepare(_config(img_dir, out, lab_dir))
    write(img_dir / "case_d.nii.gz", ramp_volume((6, 6, 6)), np.eye(4), dtype=np.int16)
    res = prepare(_config(img_dir, out, lab_dir))
    assert res.published and len(res.manifest["cases"]) == 4
    case_d = [c for c in res.manifest["cases"] if c["case_id"] == "case_d"][0]
    assert case_d["has_label"] is False


def _bad_inputs(img_dir, lab_dir):
    """Adds one file per kind of bad input; returns {file: expected reason}."""
    good = open(img_dir / "case_a.nii.gz", "rb").read()
    (img_dir / "trunc.nii.gz").write_bytes(good[: len(good) // 2])
    (img_dir / "empty.nii.gz").write_bytes(b"")
    (img_dir / "junk.nii").write_bytes(b"not nifti" * 100)
    write(img_dir / "flat.nii.gz", np.zeros((8, 8)), np.eye(4))
    write(img_dir / "series4d.nii.gz", np.zeros((4, 4, 4, 2)), np.eye(4))
    nan = ramp_volume((5, 5, 5))
    nan[2, 2, 2] = np.nan
    write(img_dir / "nan.nii.gz", nan, np.eye(4))
    for name, lab, laff in [
        ("lshape", np.zeros((5, 5, 6)), np.eye(4)),
        ("laffine", np.zeros((5, 5, 5)), make_affine(origin=(0, 0, 7))),
        ("lfrac", np.full((5, 5, 5), 0.5), np.eye(4)),
        ("lneg", np.full((5, 5, 5), -2), np.eye(4)),
    ]:
        write(img_dir / f"{name}.nii.gz", ramp_volume((5, 5, 5)), np.eye(4), dtype=np.int16)
        write(lab_dir / f"{name}.nii.gz", lab, laff, dtype=np.float32 if name == "lfrac" else np.int16)
    return {"trunc.nii.gz": "truncated or corrupt|not a readable", "empty.nii.gz": "empty file",
            "junk.nii": "not a readable", "flat.nii.gz": "2D image", "series4d.nii.gz": "4D image",
            "nan.nii.gz": "NaN/Inf", "labels/lshape.nii.gz": "label shape",
            "labels/laffine.nii.gz": "label affine", "labels/lfrac.nii.gz": "non-integer",
            "labels/lneg.nii.gz": "negative"}


def test_bad_inputs_fail_without_writing_anything(tmp_path, capsys):
    img_dir, lab_dir, _ = _make_folder(tmp_path)
    expected = _bad_inputs(img_dir, lab_dir)
    out = tmp_path / "shards"
    lines = []
    result = prepare(_config(img_dir, out, lab_dir), log=lines.append)
    assert not result.ok and result.manifest is None
    assert _files(out) == []  # no shard, no manifest, no temporary file
    import re

    for name, reason in expected.items():
        hits = [l for l in lines if l.startswith("bad input:") and name in l]
        assert len(hits) == 1, (name, lines)
        assert re.search(reason, hits[0]), hits[0]
    assert any(l.startswith("FAILED: 10 bad case(s), 3 good") for l in lines)


def test_skip_bad_writes_good_cases_and_lists_bad_ones(tmp_path):
    img_dir, lab_dir, _ = _make_folder(tmp_path)
    expected = _bad_inputs(img_dir, lab_dir)
    out = tmp_path / "shards"
    result = prepare(_config(img_dir, out, lab_dir, skip_bad=True), log=lambda m: None)
    assert result.published
    manifest = records.read_manifest(out)
    assert sorted(c["case_id"] for c in manifest["cases"]) == sorted(CASES)
    assert len(manifest["bad_cases"]) == len(expected)


def test_parallel_workers_give_identical_shards(tmp_path):
    img_dir, lab_dir, _ = _make_folder(tmp_path)
    a = prepare(_config(img_dir, tmp_path / "a", lab_dir))
    cfg = _config(img_dir, tmp_path / "b", lab_dir)
    cfg.workers = 2
    b = prepare(cfg)
    assert [s["sha256"] for s in a.manifest["shards"]] == [s["sha256"] for s in b.manifest["shards"]]


def test_corrupt_shard_is_detected(tmp_path):
    img_dir, lab_dir, _ = _make_folder(tmp_path)
    out = tmp_path / "shards"
    manifest = prepare(_config(img_dir, out, lab_dir)).manifest
    shard = out / manifest["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256") as info:
        records.verify_shards(out, records.read_manifest(out))
    assert str(shard) in str(info.value)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(DataError, match="truncated"):
        records.verify_shards(out, records.read_manifest(out), checksum=False)


def test_split_is_by_patient_and_seeded(tmp_path):
    pids = [f"p{i}" for i in range(20)]
    s1 = assign_splits(pids + pids, 0.25, seed=1)
    assert sum(v == "val" for v in s1.values()) == 5
    assert s1 == assign_splits(list(reversed(pids)), 0.25, seed=1)
    assert s1 != assign_splits(pids, 0.25, seed=2)
    # a patient table links two scans: they land in the same split
    img_dir, lab_dir, _ = _make_folder(tmp_path)
    table = tmp_path / "patients.csv"
    table.write_text("case_id,patient_id\ncase_a,P1\ncase_b,P1\ncase_c,P2\n")
    res = prepare(_config(img_dir, tmp_path / "s", lab_dir, patient_table=str(table), val_fraction=0.5))
    splits = {c["case_id"]: (c["patient_id"], c["split"]) for c in res.manifest["cases"]}
    assert splits["case_a"][1] == splits["case_b"][1] != splits["case_c"][1]
    assert splits["case_a"][0] == "P1"


def test_non_local_output_dir_through_gfile(tmp_path):
    """gs:// goes through tf.io.gfile; TF's in-memory ram:// stands in for it."""
    img_dir, lab_dir, _ = _make_folder(tmp_path)
    out = f"ram://bucket-{os.getpid()}/shards"
    assert prepare(_config(img_dir, out, lab_dir)).published
    manifest = records.read_manifest(out)
    records.verify_shards(out, manifest)
    assert sorted(c["case_id"] for c in records.iterate_cases(out)) == sorted(CASES)
    assert prepare(_config(img_dir, out, lab_dir)).up_to_date
    assert not [n for n in records.gfile().listdir(out) if ".tmp-" in n]


def test_manifest_carries_the_training_foreground_intensity_statistics(tmp_path):
    """nnU-Net's CT normalisation statistics: percentiles, mean and std of the
    labelled voxels of the training split (every voxel here: < 10,000)."""
    img_dir, lab_dir, _ = _make_folder(tmp_path)
    out = tmp_path / "shards"
    prepare(_config(img_dir, out, lab_dir, val_fraction=0.34))
    manifest = records.read_manifest(out)
    train = {c["case_id"] for c in manifest["cases"] if c["split"] == "train"}
    values = np.concatenate([case["image"][case["label"] > 0].ravel()
                             for case in records.iterate_cases(out) if case["case_id"] in train])
    props = manifest["intensity_properties"]
    assert props["num_voxels"] == values.size and props["num_cases"] == len(train) == 2
    np.testing.assert_allclose([props["percentile_00_5"], props["percentile_99_5"],
                                props["mean"], props["std"]],
                               [*np.percentile(values, [0.5, 99.5]), values.mean(), values.std()],
                               rtol=1e-9)
    spec = manifest["spec_obj"].with_normalization("ct", props)
    assert abs(spec.scale(np.array([props["mean"]]))[0]) < 1e-9
    # unlabelled data: no statistics, and the CT scheme says why
    out2 = tmp_path / "unlabelled"
    prepare(_config(img_dir, out2))
    assert records.read_manifest(out2)["intensity_properties"] is None


def test_sampled_foreground_is_bounded_and_seeded():
    from rr_tf.data.prepare import foreground_sample

    image = np.arange(100_000, dtype=np.int16).reshape(100, 100, 10) % 3000
    label = np.ones(image.shape, np.uint8)
    a, b = foreground_sample(image, label, 3, size=500), foreground_sample(image, label, 3, size=500)
    assert a.size == 500 and np.array_equal(a, b)
    assert not np.array_equal(a, foreground_sample(image, label, 4, size=500))
    assert foreground_sample(image, np.zeros_like(label), 3).size == 0


def test_forged_header_and_max_voxels_are_bad_cases_found_before_reading(tmp_path, monkeypatch):
    """A 65-byte .nii.gz declaring 1024^3 int16 voxels, and a real image
    over max_voxels, are bad cases named in the preflight (no voxel of any
    case is read when they are the bad ones), and nothing is written."""
    import gzip

    from rr_tf.data import nifti, sources
    from test_nifti import _forged_header

    img_dir, _, _ = _make_folder(tmp_path, labels=False)
    forged = img_dir / "forged.nii.gz"
    forged.write_bytes(gzip.compress(_forged_header()))
    out = tmp_path / "shards"
    reads = []
    real_load = sources.load_case
    monkeypatch.setattr(sources, "load_case", lambda t, *a: reads.append(t.case_id) or real_load(t, *a))
    lines = []
    result = prepare(_config(img_dir, out), log=lines.append)
    assert not result.ok and _files(out) == []
    hits = [l for l in lines if l.startswith(f"bad input: {forged}: truncated or corrupt: header "
                                             "declares 1024x1024x1024 int16")]
    assert len(hits) == 1, lines
    assert "forged" not in reads
    lines.clear()
    reads.clear()
    result = prepare(_config(img_dir, out, max_voxels=1000), log=lines.append)
    bad = [l for l in lines if l.startswith("bad input:")]
    # case_c (9x12x10) and the forged header are over the limit; case_a/b (990 voxels) are read
    assert len(bad) == 2 and all("more than the limit of 1000" in l for l in bad), lines
    assert reads == ["case_a", "case_b"] and _files(out) == []
    with pytest.raises(Exception, match="max_voxels"):
        prepare(_config(img_dir, out, max_voxels=0), log=lines.append)
    assert nifti.MAX_VOXELS == 2 ** 31


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path):
    """The output folder's lock: a live holder's pid refuses a second
    prepare in one line naming the pid and the lock, before anything is
    written; a lock whose holder is gone (a killed run) is taken over, and
    the lock is gone when prepare returns."""
    import subprocess
    import sys
    import time

    from rr_tf.data.prepare import LOCK_NAME

    img_dir, lab_dir, _ = _make_folder(tmp_path)
    out = tmp_path / "shards"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(f"{holder.pid}\n")
        with pytest.raises(DataError, match=rf"another prepare_data \(pid {holder.pid}\) is "
                                            rf"writing this folder.*{LOCK_NAME}") as info:
            prepare(_config(img_dir, out, lab_dir), log=lambda m: None)
        assert str(info.value).startswith(str(out)) and "\n" not in str(info.value)
        assert _files(out) == [LOCK_NAME]  # nothing written, the holder's lock kept
        # a lock just created, its pid not yet written: held as well
        (out / LOCK_NAME).write_text("")
        with pytest.raises(DataError, match=r"pid \?"):
            prepare(_config(img_dir, out, lab_dir), log=lambda m: None)
        (out / LOCK_NAME).write_text(f"{holder.pid}\n")
    finally:
        holder.kill()
        holder.wait()
    result = prepare(_config(img_dir, out, lab_dir), log=lambda m: None)  # holder gone: stale
    assert result.ok and LOCK_NAME not in _files(out)
    # an empty lock older than a few seconds (killed between create and write): stale
    (out / LOCK_NAME).write_text("")
    old = time.time() - 60
    os.utime(out / LOCK_NAME, (old, old))
    assert prepare(_config(img_dir, out, lab_dir), log=lambda m: None).ok
    assert LOCK_NAME not in _files(out)
