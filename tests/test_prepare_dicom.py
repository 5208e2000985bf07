"""prepare() on DICOM series folders with odd geometry and compressed pixels."""

import numpy as np

from rr_tf.data import records
from rr_tf.data.prepare import PrepareConfig, prepare
from rr_tf.data.preprocess import restore_original_grid
from rr_tf.data.spec import PreprocessSpec
from dicom_factory import expected_read, simple_hu, write_ct_series
from nifti_factory import make_affine, rotation, write


def test_dicom_folders_to_shards_round_trip(tmp_path):
    src = tmp_path / "dicom"
    lab_dir = tmp_path / "labels"
    lab_dir.mkdir()
    series = {
        "patient1/ct": (make_affine((0.7, 0.7, 2.5), flips=(-1, -1, 1), origin=(120, 130, -300)),
                        "rle_lossless", np.uint16),
        "patient2/ct": (make_affine((0.8, 0.9, 3.0), rot=rotation(0, 12) @ rotation(2, -20),
                                    origin=(-50, 60, 10)), "jpegls_lossless", np.int16),
        "patient3/ct": (make_affine((0.75, 0.75, 2.0), flips=(1, -1, -1)), "jpeg2000_lossless",
                        np.uint16),
    }
    truth = {}
    for i, (rel, (aff, syntax, dtype)) in enumerate(series.items()):
        hu = simple_hu((34, 32, 5), seed=i, lo=-1000, hi=1000)
        write_ct_series(src / rel, hu, aff, transfer_syntax=syntax, dtype=dtype,
                        patient_id=f"P{i}", seed=i)
        arr, read_aff = expected_read(hu, aff)
        truth[rel.replace("/", "__")] = (arr, read_aff)
    # a label map for one series, in the geometry the reader reports
    arr, read_aff = truth["patient2__ct"]
    lab = (arr > 0).astype(np.uint8)
    write(lab_dir / "patient2__ct.nii.gz", lab, read_aff, dtype=np.uint8)

    out = tmp_path / "shards"
    res = prepare(PrepareConfig(source=str(src), output_dir=str(out), labels_dir=str(lab_dir),
                                spec=PreprocessSpec(spacing=None), workers=1, progress=False,
                                val_fraction=0.0))
    assert res.published and not res.bad, res.bad
    cases = {c["case_id"]: c for c in records.iterate_cases(out)}
    assert set(cases) == set(truth)
    for cid, (arr, read_aff) in truth.items():
        meta = cases[cid]["meta"]
        assert meta["patient_id"] == f"P{int(cid[7]) - 1}"
        assert meta["source_kind"] == "dicom"
        np.testing.assert_allclose(meta["original"]["affine"], read_aff, atol=1e-4)
        back = restore_original_grid(cases[cid]["image"], np.array(meta["affine"]), read_aff, arr.shape)
        np.testing.assert_allclose(back, np.clip(np.rint(arr), -1000, 1000), atol=0.5)
    p2_aff = truth["patient2__ct"][1]
    back = restore_original_grid(cases["patient2__ct"]["label"],
                                 np.array(cases["patient2__ct"]["meta"]["affine"]), p2_aff, lab.shape)
    np.testing.assert_array_equal(back, lab)


def test_mixed_series_folder_is_a_bad_case(tmp_path):
    src = tmp_path / "dicom"
    hu = simple_hu((12, 10, 4))
    write_ct_series(src / "mixed", hu, np.eye(4), series_uid="1.2.3.1", name_prefix="a")
    write_ct_series(src / "mixed", hu, np.eye(4), series_uid="1.2.3.2", name_prefix="b")
    lines = []
    cfg = PrepareConfig(source=str(src), output_dir=str(tmp_path / "o"), workers=1, progress=False,
                        spec=PreprocessSpec(spacing=None))
    res = prepare(cfg, log=lines.append)
    assert not res.ok and any("mixed" in l and "series" in l for l in lines if l.startswith("bad input"))
    cfg.dicom_all_series = True
    cfg.output_dir = str(tmp_path / "o2")
    res = prepare(cfg, log=lines.append)
    assert res.published and len(res.manifest["cases"]) == 2
