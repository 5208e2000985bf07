"""launch/evaluate.py as a user runs it (real subprocesses, tiny label maps)."""

import csv
import json
import math
import os
import sys

import numpy as np
import pytest

from nifti_factory import write
from subproc import run_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "evaluate.py")
SHAPE = (20, 18, 12)
SPACING = (0.5, 1.5, 2.0)
AFFINE = np.diag(list(SPACING) + [1.0])


def run(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return run_logged([sys.executable, SCRIPT, "--noprogress", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def error_lines(res):
    return [l for l in res.stderr.splitlines() if l.strip()]


def labels_with(**cubes):
    """cubes: name -> (label, lo corner, size) placed in an empty map."""
    lab = np.zeros(SHAPE, np.uint8)
    for label, lo, size in cubes.values():
        lab[tuple(slice(l, l + s) for l, s in zip(lo, size))] = label
    return lab


ORGAN1 = (1, (4, 4, 3), (8, 8, 6))
ORGAN1_SHIFTED = (1, (6, 4, 3), (8, 8, 6))  # 2 voxels (1.0 mm) along axis 0
ORGAN2 = (2, (15, 5, 2), (5, 5, 4))


@pytest.fixture
def dataset(tmp_path):
    """c1: organ 1 shifted (Dice 0.75, HD95 1.0 mm), organ 2 exact;
    c2: organ 1 exact, organ 2 absent in both; c3: organ 1 exact, organ 2 missed."""
    ref, pred, img = tmp_path / "ref", tmp_path / "pred", tmp_path / "img"
    for d in (ref, pred, img):
        d.mkdir()
    cases = {
        "c1": (labels_with(a=ORGAN1, b=ORGAN2), labels_with(a=ORGAN1_SHIFTED, b=ORGAN2)),
        "c2": (labels_with(a=ORGAN1), labels_with(a=ORGAN1)),
        "c3": (labels_with(a=ORGAN1, b=ORGAN2), labels_with(a=ORGAN1)),
    }
    for name, (r, p) in cases.items():
        write(ref / f"{name}.nii.gz", r, AFFINE, dtype=np.uint8)
        write(pred / f"{name}.nii.gz", p, AFFINE, dtype=np.uint8)
        write(img / f"{name}.nii.gz", np.where(r > 0, 250.0, -1000.0), AFFINE, dtype=np.int16)
    return tmp_path


def test_writes_csv_json_and_png(dataset):
    out = dataset / "eval"
    res = run(f"--pred={dataset / 'pred'}", f"--ref={dataset / 'ref'}", f"--output={out}",
              f"--image={dataset / 'img'}", "--label_names=liver,spleen")
    assert res.returncode == 0, res.stderr
    assert "liver" in res.stdout and "spleen" in res.stdout  # the table
    assert sorted(os.listdir(out)) == ["metrics.json", "overlays.png", "per_case.csv",
                                       "summary.csv"]  # no temporary files left

    rows = {(r["case"], r["name"]): r for r in csv.DictReader(open(out / "per_case.csv"))}
    assert len(rows) == 6
    assert float(rows["c1", "liver"]["dice"]) == pytest.approx(0.75)
    assert float(rows["c1", "liver"]["hd95_mm"]) == pytest.approx(1.0)
    assert float(rows["c1", "liver"]["ref_ml"]) == pytest.approx(8 * 8 * 6 * 1.5 / 1000)
    assert rows["c2", "spleen"]["status"] == "absent" and rows["c2", "spleen"]["dice"] == "nan"
    diag = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING)))
    assert rows["c3", "spleen"]["status"] == "missed"
    assert float(rows["c3", "spleen"]["hd95_mm"]) == pytest.approx(diag, rel=1e-5)

    doc = json.load(open(out / "metrics.json"))
    assert doc["labels"] == [1, 2] and doc["label_names"] == {"1": "liver", "2": "spleen"}
    liver, spleen = doc["summary"]["classes"]["liver"], doc["summary"]["classes"]["spleen"]
    assert liver["n"] == 3 and liver["dice_mean"] == pytest.approx((0.75 + 1 + 1) / 3)
    assert spleen["n"] == 2 and spleen["dice_mean"] == pytest.approx(0.5)
    assert spleen["n_absent"] == 1 and spleen["n_missed"] == 1
    assert doc["cases"]["c2"]["classes"]["spleen"]["dice"] is None  # NaN -> null
    assert doc["cases"]["c3"]["mean"]["dice"] == pytest.approx(0.5)
    overall = doc["summary"]["overall"]
    assert overall["dice_mean"] == pytest.approx(np.mean([0.875, 1.0, 0.5]))
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["label"] for r in summary] == ["1", "2", "overall", "class_mean"]
    # HD95 both ways: the missed spleen of c3 is left out (MONAI) or counts as the diagonal
    found = [float(rows[c, "spleen"]["hd95_mm"]) for c in ("c1", "c2", "c3")
             if rows[c, "spleen"]["status"] == "ok"]
    assert len(found) == 1 and spleen["n_hd95"] == 1
    assert spleen["hd95_mean"] == pytest.approx(found[0], rel=1e-5)
    assert spleen["hd95_mean_penalised"] == pytest.approx((found[0] + diag) / 2, rel=1e-5)
    assert float(summary[1]["hd95_mean"]) == pytest.approx(found[0], rel=1e-5)
    assert float(summary[1]["hd95_mean_penalised"]) == pytest.approx((found[0] + diag) / 2,
                                                                     rel=1e-5)
    assert summary[3]["hd95_mean_penalised"] != "" and summary[3]["hd95_mean"] != ""
    assert "hd95_mean_penalised" in doc["definitions"] and "HD95 penalised" in res.stdout

    # figure: rows worst -> best mean Dice, 4 panels of 160 px with 4 px gaps
    assert doc["figure"]["rows"] == ["c3", "c1", "c2"]
    assert len(doc["figure"]["columns"]) == 4
    from PIL import Image

    png = np.asarray(Image.open(out / "overlays.png").convert("RGB"))
    width = round(160 * (20 * 0.5) / (18 * 1.5))
    assert png.shape == (4 + 3 * 164, 4 + 4 * (width + 4), 3)

    def panel(row, col):
        y, x = 4 + row * 164, 4 + col * (width + 4)
        return png[y:y + 160, x:x + width].reshape(-1, 3)

    blue = np.array([26, 77, 255])
    green = np.array([26, 204, 51])
    red = np.array([230, 26, 26])
    count = lambda p, c: int(np.sum(np.all(np.abs(p.astype(int) - c) <= 1, axis=1)))  # noqa: E731
    assert count(panel(0, 3), blue) > 0        # c3: spleen missed
    assert count(panel(2, 3), blue) == 0 and count(panel(2, 3), red) == 0  # c2: perfect
    assert count(panel(2, 3), green) > 0
    assert count(panel(1, 3), red) > 0         # c1: shifted liver
    gray = panel(0, 0)
    assert np.all(gray[:, 0] == gray[:, 1]) and gray.max() > 200  # image panel is grayscale


def test_two_files_default_labels_and_no_output(dataset, tmp_path):
    res = run(f"--pred={dataset / 'pred' / 'c1.nii.gz'}", f"--ref={dataset / 'ref' / 'c1.nii.gz'}",
              "--label_names=phantom")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any("liver" in l and "0.7500" in l for l in lines), res.stdout
    assert any("spleen" in l and "1.0000" in l for l in lines), res.stdout


def test_refuses_mismatched_grids_with_one_line(dataset):
    pred = dataset / "pred"
    write(pred / "c2.nii.gz", np.zeros((20, 18, 11), np.uint8), AFFINE, dtype=np.uint8)
    res = run(f"--pred={pred}", f"--ref={dataset / 'ref'}", f"--output={dataset / 'o1'}")
    assert res.returncode == 2
    lines = error_lines(res)
    assert len(lines) == 1 and "c2.nii.gz" in lines[0] and "shape" in lines[0], res.stderr
    assert lines[0].startswith("evaluate.py: error:") and str(pred) in lines[0]
    assert not (dataset / "o1").exists()

    shifted = AFFINE.copy()
    shifted[0, 3] = 3.0
    write(pred / "c2.nii.gz", labels_with(a=ORGAN1), shifted, dtype=np.uint8)
    res = run(f"--pred={pred}", f"--ref={dataset / 'ref'}")
    lines = error_lines(res)
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "c2.nii.gz" in lines[0] and "affine" in lines[0] and "--ignore_affine" in lines[0]
    res = run(f"--pred={pred}", f"--ref={dataset / 'ref'}", "--ignore_affine")
    assert res.returncode == 0, res.stderr


def test_missing_prediction_is_an_error_unless_allowed(dataset):
    os.remove(dataset / "pred" / "c3.nii.gz")
    res = run(f"--pred={dataset / 'pred'}", f"--ref={dataset / 'ref'}")
    lines = error_lines(res)
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "c3.nii.gz" in lines[0] and "--allow_missing" in lines[0]
    out = dataset / "eval"
    res = run(f"--pred={dataset / 'pred'}", f"--ref={dataset / 'ref'}", "--allow_missing",
              f"--output={out}", "--figure_cases=0", "--labels=1")
    assert res.returncode == 0, res.stderr
    assert "scored as empty" in res.stderr
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert [(r["case"], r["status"]) for r in rows] == [("c1", "ok"), ("c2", "ok"),
                                                        ("c3", "missed")]
    assert not (out / "overlays.png").exists()


@pytest.mark.parametrize("args,needle", [
    (["--labels=a"], "--labels needs comma-separated integers"),
    (["--labels=0,1"], "--labels values must be in 1..255"),
    (["--label_names=1=liver,spleen"], "--label_names"),
    (["--label_names=a,b,c"], "--label_names: 3 names for 2 labels"),
    (["--figure_cases=-1"], "figure_cases"),
    (["--pred=/no/such/dir"], "--pred: '/no/such/dir' does not exist"),
    (["--image=/no/img"], "--image"),
])
def test_invalid_flags_fail_with_one_line(dataset, args, needle):
    base = {"--pred": f"--pred={dataset / 'pred'}", "--ref": f"--ref={dataset / 'ref'}"}
    for a in args:
        base[a.split("=")[0]] = a
    res = run(*base.values())
    lines = error_lines(res)
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_unreadable_prediction_names_the_file(dataset):
    bad = dataset / "pred" / "c1.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    res = run(f"--pred={dataset / 'pred'}", f"--ref={dataset / 'ref'}")
    lines = error_lines(res)
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert str(bad) in lines[0] and "NIfTI" in lines[0]


def test_hidden_files_are_skipped_with_a_warning(dataset, tmp_path):
    import shutil

    ref = tmp_path / "ref_copy"
    shutil.copytree(dataset / "ref", ref)
    (ref / "._c1.nii.gz").write_bytes(b"\0" * 10)  # a macOS AppleDouble copy
    res = run(f"--pred={dataset / 'pred'}", f"--ref={ref}")
    assert res.returncode == 0, res.stderr
    warned = [l for l in res.stderr.splitlines() if "hidden" in l]
    assert len(warned) == 1 and warned[0].startswith("warning: skipped 1 hidden NIfTI file(s)")
    assert "._c1.nii.gz" in warned[0]
