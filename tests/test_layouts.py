"""Data set layouts users already have (Decathlon / nnU-Net raw, AbdomenAtlas
BDMAP) and label names that travel: manifest -> export -> evaluation."""

import json
import os
import sys

import numpy as np
import pytest

from rr_tf.data import records, sources
from rr_tf.data.phantom import LABEL_NAMES
from rr_tf.data.prepare import PrepareConfig, prepare
from rr_tf.data.spec import PreprocessSpec
from rr_tf.errors import ConfigError, DataError
from nifti_factory import make_affine, ramp_volume, write
from subproc import run_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
SHAPE = (10, 9, 8)
AFFINE = make_affine((1.5, 1.5, 2.0), origin=(-7, 3, 11))  # RAS: stored arrays = written ones


def _cli(script, *args):
    return run_logged([sys.executable, os.path.join(ROOT, "launch", script), *args],
                      capture_output=True, text=True, env=ENV, timeout=300)


def _config(src, out, **kw):
    kw.setdefault("spec", PreprocessSpec(spacing=None, hu_window=(-1000, 1000)))
    return PrepareConfig(source=str(src), output_dir=str(out), workers=1, progress=False,
                         cases_per_shard=8, **kw)


def _box(lo, hi, value=1, shape=SHAPE):
    arr = np.zeros(shape, np.uint8)
    arr[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return arr


def _image(path, seed=0, shape=SHAPE, affine=AFFINE):
    write(path, ramp_volume(shape, seed=seed), affine, dtype=np.int16)


def _labels_by_case(out):
    return {c["case_id"]: c["label"] for c in records.iterate_cases(out)}


# ------------------------------------------------------------ Decathlon / nnU-Net
LABEL_MAPS = {"case_a": _box((1, 1, 1), (5, 5, 4), 1) + _box((6, 5, 4), (9, 8, 7), 2),
              "case_b": _box((2, 2, 2), (6, 6, 6), 2)}


def _msd(root, form):
    """imagesTr: case_a, case_b (labelled), case_c (no label); labelsTr also
    holds an orphan; imagesTs: case_t; a macOS ``._`` file in imagesTr."""
    suffix = "_0000" if form == "nnunet_v2" else ""
    info = {"name": "tiny", "labels": {"background": 0, "liver": 1, "spleen": 2}}
    if form == "nnunet_v2":
        info.update(channel_names={"0": "CT"}, file_ending=".nii.gz", numTraining=3)
    else:
        info.update(modality={"0": "CT"},
                    labels={"0": "background", "1": "liver", "2": "spleen"})
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(info))
    for i, name in enumerate(["case_a", "case_b", "case_c"]):
        _image(root / "imagesTr" / f"{name}{suffix}.nii.gz", seed=i)
    for name, lab in LABEL_MAPS.items():
        write(root / "labelsTr" / f"{name}.nii.gz", lab, AFFINE, dtype=np.uint8)
    write(root / "labelsTr" / "orphan.nii.gz", LABEL_MAPS["case_b"], AFFINE, dtype=np.uint8)
    _image(root / "imagesTs" / f"case_t{suffix}.nii.gz", seed=9)
    (root / "imagesTr" / f"._case_a{suffix}.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac")
    return root


@pytest.mark.parametrize("form", ["decathlon", "nnunet_v2"])
def test_decathlon_and_nnunet_layouts_with_their_label_names(tmp_path, form):
    src = _msd(tmp_path / "Task01_Tiny", form)
    found = sources.find_cases(str(src))
    assert found.layout == "msd" and found.label_names == {1: "liver", 2: "spleen"}
    by_id = {t.case_id: t for t in found.tasks}
    assert sorted(by_id) == ["case_a", "case_b", "case_c", "case_t"] and not found.problems
    assert by_id["case_a"].label.endswith("labelsTr/case_a.nii.gz")
    assert by_id["case_c"].label is None and by_id["case_t"].label is None
    notes = " | ".join(found.notes)
    assert "case_c" in notes and "orphan" in notes and "1 imagesTs case" in notes
    assert "ignored 1" in notes  # the ._ file

    out = tmp_path / "shards"
    lines = []
    result = prepare(_config(src, out), log=lines.append)
    assert result.published, lines
    manifest = records.read_manifest(out)
    assert manifest["label_names"] == {"1": "liver", "2": "spleen"}
    assert records.label_names(manifest) == {1: "liver", 2: "spleen"}
    assert manifest["source"]["layout"] == "msd"
    has_label = {c["case_id"]: c["has_label"] for c in manifest["cases"]}
    assert has_label == {"case_a": True, "case_b": True, "case_c": False, "case_t": False}
    labels = _labels_by_case(out)
    for name, lab in LABEL_MAPS.items():
        np.testing.assert_array_equal(labels[name], lab)
    assert any("msd layout, 4 case(s), labels 1=liver, 2=spleen" in l for l in lines), lines


@pytest.mark.parametrize("body,needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"name": "x", "modality": {"0": "CT"}}), 'has no "labels" entry'),
    (json.dumps({"labels": {"background": 0, "liver": 1, "liver_and_tumour": [1, 2]}}),
     "'liver_and_tumour' is a region"),
    (json.dumps({"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0}}),
     '"channel_names" declares 2 input channels (CT, PET); rr_tf reads single-channel CT'),
    (json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"}, "labels": {"0": "bg"}}),
     '"modality" declares 3 input channels'),
    (json.dumps({"labels": {"0": "background", "1": 5}}), "does not fit the form"),
    (json.dumps({"labels": {"background": "0", "liver": "1"}}), "does not fit the form"),
])
def test_bad_dataset_json_is_refused_with_one_line(tmp_path, body, needle):
    src = _msd(tmp_path / "src", "nnunet_v2")
    (src / "dataset.json").write_text(body)
    with pytest.raises(DataError) as info:
        sources.find_cases(str(src))
    message = str(info.value)
    assert message.startswith(f"{src / 'dataset.json'}: ") and needle in message, message
    assert "\n" not in message
    # prepare() stops before creating anything
    with pytest.raises(DataError, match="dataset.json"):
        prepare(_config(src, tmp_path / "out"), log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_multichannel_dataset_and_foreign_labels(tmp_path):
    src = _msd(tmp_path / "src", "nnunet_v2")
    (src / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT", "1": "CT_arterial"}, "labels": {"background": 0, "a": 1}}))
    res = _cli("prepare_data.py", f"--source={src}", f"--output_dir={tmp_path / 'out'}")
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("prepare_data.py: error:") and "dataset.json" in lines[0]
    assert "2 input channels" in lines[0]
    res = _cli("prepare_data.py", f"--source={src}", f"--labels={src / 'labelsTr'}",
               f"--output_dir={tmp_path / 'out'}")
    assert res.returncode == 2 and "labels: " in res.stderr and "msd layout" in res.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ AbdomenAtlas / BDMAP
def _bdmap_case(root, name, masks, seed=0):
    folder = root / name
    folder.mkdir(parents=True)
    _image(folder / "ct.nii.gz", seed=seed)
    if masks is not None:
        (folder / "segmentations").mkdir()
        for organ, (mask, affine) in masks.items():
            write(folder / "segmentations" / f"{organ}.nii.gz", mask, affine, dtype=np.uint8)
    return folder


def test_bdmap_masks_merge_with_one_numbering_and_overlap_rule(tmp_path):
    src = tmp_path / "AbdomenAtlas"
    liver, spleen = _box((1, 1, 1), (6, 6, 5)), _box((4, 4, 3), (9, 8, 7))  # they overlap
    kidney = _box((0, 6, 0), (3, 9, 3))
    _bdmap_case(src, "BDMAP_001", {"liver": (liver, AFFINE), "spleen": (spleen, AFFINE)})
    _bdmap_case(src, "BDMAP_002", {"kidney_left": (kidney, AFFINE), "liver": (liver, AFFINE)}, 1)
    _bdmap_case(src, "BDMAP_003", None, 2)  # no segmentations/: unlabelled
    (src / "README.txt").write_text("not a case")

    found = sources.find_cases(str(src))
    assert found.layout == "bdmap" and not found.problems
    assert found.label_names == {1: "kidney_left", 2: "liver", 3: "spleen"}
    assert any("unlabelled: BDMAP_003" in n for n in found.notes), found.notes

    out = tmp_path / "shards"
    result = prepare(_config(src, out), log=lambda m: None)
    assert result.published
    manifest = records.read_manifest(out)
    assert manifest["label_names"] == {"1": "kidney_left", "2": "liver", "3": "spleen"}
    labels = _labels_by_case(out)
    want1 = np.where(spleen > 0, 3, np.where(liver > 0, 2, 0))  # spleen sorts after liver: wins
    want2 = np.where(liver > 0, 2, np.where(kidney > 0, 1, 0))
    np.testing.assert_array_equal(labels["BDMAP_001"], want1)
    np.testing.assert_array_equal(labels["BDMAP_002"], want2)
    assert labels["BDMAP_003"] is None
    meta = {c["case_id"]: c for c in manifest["cases"]}
    assert meta["BDMAP_001"]["label_values"] == [0, 2, 3]
    assert meta["BDMAP_001"]["original"]["label_source"].endswith("BDMAP_001/segmentations")

    # a new organ elsewhere renumbers every case: the data set is rebuilt
    _bdmap_case(src, "BDMAP_004", {"aorta": (kidney, AFFINE)}, 3)
    again = prepare(_config(src, out), log=lambda m: None)
    assert again.published and not again.up_to_date
    assert again.manifest["label_names"]["1"] == "aorta"
    assert _labels_by_case(out)["BDMAP_001"].max() == 4  # spleen is 4 now


def test_bdmap_bad_masks_name_the_file(tmp_path):
    src = tmp_path / "atlas"
    liver = _box((1, 1, 1), (6, 6, 5))
    shifted = AFFINE.copy()
    shifted[0, 3] += 4.0
    _bdmap_case(src, "good", {"liver": (liver, AFFINE)})
    _bdmap_case(src, "other_shape", {"liver": (np.zeros((10, 9, 7), np.uint8), AFFINE)})
    _bdmap_case(src, "other_affine", {"liver": (liver, shifted)})
    _bdmap_case(src, "not_binary", {"liver": (liver * 2, AFFINE)})
    lines = []
    result = prepare(_config(src, tmp_path / "out"), log=lines.append)
    assert not result.ok and result.manifest is None
    expected = {"other_shape": "mask shape (10, 9, 7) does not match image shape (10, 9, 8)",
                "other_affine": "mask affine does not match the image affine",
                "not_binary": "organ mask holds values [2]; a mask must be binary (0/1)"}
    for case, reason in expected.items():
        mask = str(src / case / "segmentations" / "liver.nii.gz")
        hits = [l for l in lines if l.startswith(f"bad input: {mask}: ")]
        assert len(hits) == 1 and reason in hits[0], (case, lines)
    assert any(l.startswith("FAILED: 3 bad case(s), 1 good") for l in lines), lines


# ------------------------------------------------------------ names in the manifest
def test_phantom_names_and_older_manifests(tmp_path):
    out = tmp_path / "phantom"
    cfg = _config("phantom", out, num_cases=2, phantom_shape=(32, 32, 32),
                  spec=PreprocessSpec(spacing=(8.0, 8.0, 8.0)), val_fraction=0.5)
    assert prepare(cfg, log=lambda m: None).published
    manifest = records.read_manifest(out)
    assert manifest["label_names"] == {str(k): v for k, v in LABEL_NAMES.items()}
    assert records.label_names(manifest) == LABEL_NAMES
    # a manifest written before the key existed still reads ({} names) ...
    raw = json.load(open(out / "manifest.json"))
    del raw["label_names"]
    (out / "manifest.json").write_text(json.dumps(raw))
    old = records.read_manifest(out)
    assert old["label_names"] is None and records.label_names(old) == {}
    # ... and a re-run adds the names without rewriting the shards
    shards = {s["name"]: os.stat(out / s["name"]).st_mtime_ns for s in raw["shards"]}
    lines = []
    again = prepare(cfg, log=lines.append)
    assert again.up_to_date and any("label names updated" in l for l in lines), lines
    assert records.label_names(records.read_manifest(out)) == LABEL_NAMES
    assert {n: os.stat(out / n).st_mtime_ns for n in shards} == shards
    # a malformed entry is one line naming the manifest
    raw["label_names"] = {"0": "background"}
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="manifest.json: label_names: key '0' is not a label value"):
        records.read_manifest(out)


def _plain(root):
    img, lab = root / "images", root / "labels"
    img.mkdir(parents=True)
    lab.mkdir()
    for name, label in LABEL_MAPS.items():
        _image(img / f"{name}.nii.gz", seed=len(name))
        write(lab / f"{name}.nii.gz", label + (label == 2), AFFINE, dtype=np.uint8)  # 1, 3
    return img, lab


@pytest.fixture(scope="module")
def plain_data(tmp_path_factory):
    """A plain folder prepared by the CLI with --label_names (values 1 and 3)."""
    root = tmp_path_factory.mktemp("plain")
    img, lab = _plain(root)
    out = root / "shards"
    res = _cli("prepare_data.py", f"--source={img}", f"--labels={lab}", f"--output_dir={out}",
               "--spacing=native", "--workers=1", "--noprogress", "--label_names=1=liver,3=kidney")
    assert res.returncode == 0, res.stderr
    return root, res


def test_plain_layout_names_come_only_from_the_flag(plain_data, tmp_path):
    root, res = plain_data
    manifest = json.load(open(root / "shards" / "manifest.json"))
    assert manifest["label_names"] == {"1": "liver", "3": "kidney"}
    assert manifest["source"]["layout"] == "plain"
    # without the flag: no names; names that miss a value present in the labels: a warning
    img, lab = root / "images", root / "labels"
    assert prepare(_config(img, tmp_path / "a", labels_dir=str(lab)),
                   log=lambda m: None).manifest["label_names"] is None
    lines = []
    prepare(_config(img, tmp_path / "b", labels_dir=str(lab), label_names={1: "liver"}),
            log=lines.append)
    assert any("label value(s) [3] occur in the label maps but have no name" in l
               for l in lines), lines
    with pytest.raises(ConfigError, match=r"^label_names: key 0 is not a label value in 1..255$"):
        prepare(_config(img, tmp_path / "c", label_names={0: "background"}))
    bad = _cli("prepare_data.py", f"--source={img}", f"--output_dir={tmp_path / 'd'}",
               "--label_names=1=liver,spleen")
    assert bad.returncode != 0 and "use either names or label=name pairs" in bad.stderr


# ------------------------------------------------------------ export and evaluation
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny segmenter exported like a fine-tuning run's ``export/``."""
    from rr_tf.export import export_segmenter
    from rr_tf.models.segmenters import UNetSegmenter

    run = tmp_path_factory.mktemp("run")
    model = UNetSegmenter(3, base_width=2, levels=3)
    model.build((None, 16, 16, 16, 1))
    export_segmenter(model, str(run / "export"), PreprocessSpec(spacing=None), (16, 16, 16),
                     label_names={"1": "liver", "3": "kidney"})
    return run


def test_export_records_names_and_the_loader_reads_them(run_dir, tmp_path):
    from rr_tf.export import export_segmenter
    from rr_tf.predict import SegmentationModel

    info = json.load(open(run_dir / "export" / "segmenter.json"))
    assert info["label_names"] == {"1": "liver", "3": "kidney"}
    model = SegmentationModel.load(str(run_dir))
    assert model.label_names == {1: "liver", 3: "kidney"}
    # an export made before the key existed: {}
    older = tmp_path / "older"
    os.makedirs(older)
    for name in ("segmenter.keras", "preprocess.json"):
        os.link(run_dir / "export" / name, older / name)
    del info["label_names"]
    (older / "segmenter.json").write_text(json.dumps(info))
    assert SegmentationModel.load(str(older)).label_names == {}
    with pytest.raises(ConfigError, match="label_names: key 'one' is not a label value"):
        export_segmenter(model.model, str(tmp_path / "x"), model.spec, (16, 16, 16),
                         label_names={"one": "liver"})
    assert not (tmp_path / "x").exists()  # refused before writing


def test_evaluate_reads_names_from_a_data_set_or_a_model(plain_data, run_dir, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    lab = LABEL_MAPS["case_a"] + (LABEL_MAPS["case_a"] == 2)  # values 1 and 3
    write(ref / "c1.nii.gz", lab, AFFINE, dtype=np.uint8)
    root, _ = plain_data
    for source in (root / "shards", run_dir, run_dir / "export"):
        out = tmp_path / f"eval_{source.name}"
        res = _cli("evaluate.py", f"--pred={ref}", f"--ref={ref}", f"--output={out}",
                   "--figure_cases=0", "--noprogress", f"--label_names=from:{source}")
        assert res.returncode == 0, res.stderr
        assert "liver" in res.stdout and "kidney" in res.stdout
        doc = json.load(open(out / "metrics.json"))
        assert doc["label_names"] == {"1": "liver", "3": "kidney"}
    # a source without names, and a folder that is neither: one line each
    empty = tmp_path / "unnamed"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"label_names": None}))
    for source, needle in [(empty, "records no label names"),
                           (tmp_path, "holds no manifest.json")]:
        res = _cli("evaluate.py", f"--pred={ref}", f"--ref={ref}", f"--label_names=from:{source}")
        lines = [l for l in res.stderr.splitlines() if l.strip()]
        assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], res.stderr


def test_hidden_entries_and_symlink_loops_are_reported_not_silent(tmp_path):
    """Hidden case folders / NIfTI files of an AbdomenAtlas folder are named
    in a note; a symbolic link loop in a plain folder is a bad case that says
    so (not 'does not exist')."""
    src = tmp_path / "AbdomenAtlas"
    _bdmap_case(src, "BDMAP_001", {"liver": (_box((1, 1, 1), (6, 6, 5)), AFFINE)})
    _bdmap_case(src, ".BDMAP_copy", None, 1)
    (src / "._ct.nii.gz").write_bytes(b"\0" * 10)
    found = sources.find_cases(str(src))
    assert [t.case_id for t in found.tasks] == ["BDMAP_001"]
    assert any("ignored 2 hidden entries" in n and ".BDMAP_copy" in n and "._ct.nii.gz" in n
               for n in found.notes), found.notes
    plain = tmp_path / "plain"
    plain.mkdir()
    _image(plain / "case1.nii.gz")
    os.symlink("loop.nii.gz", plain / "loop.nii.gz")
    lines = []
    result = prepare(_config(plain, tmp_path / "out"), log=lines.append)
    assert not result.ok
    assert any(l.startswith("bad input:") and "loop.nii.gz: symbolic link loop" in l
               for l in lines), lines
