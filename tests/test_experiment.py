"""launch/experiment.py's bookkeeping: the seed statistics, the per-run
rows read back from the run directories, and the docs section it replaces."""

import json
import os

import pytest

experiment = pytest.importorskip("launch.experiment")


def _fake_run(root, name, kind, dice, matched, best):
    d = root / name
    (d / "test_metrics").mkdir(parents=True)
    classes = {o: {"dice_mean": v} for o, v in dice.items()}
    (d / "test_metrics" / "metrics.json").write_text(json.dumps({"summary": {
        "classes": classes, "overall": {"dice_class_mean": 0.0}}}))
    (d / "run.json").write_text(json.dumps({"kind": kind}))
    (d / "metrics.json").write_text(json.dumps({"best": best}))
    if matched is not None:
        (d / "transfer.json").write_text(json.dumps({"matched": ["a"] * matched}))
    return str(d)


def test_summary_is_mean_and_sample_std_over_seeds():
    results = [{"source": "scratch", "budget": 1, "dice": v} for v in (0.1, 0.3)]
    results.append({"source": "reprec", "budget": 1, "dice": 0.2})
    table = experiment.summarise(results, [1, 4], ["scratch", "reprec"])
    m, s, n = table[("scratch", 1)]
    assert (round(m, 6), round(s, 6), n) == (0.2, round(0.02 ** 0.5, 6), 2)
    assert table[("reprec", 1)] == (0.2, 0.0, 1)
    assert ("scratch", 4) not in table  # no run: a dash in the table, a gap in the plot


def test_per_run_rows_come_from_the_run_directories(tmp_path):
    a = _fake_run(tmp_path, "scratch_n1_s0", "unet", {"liver": 0.5, "spleen": None, "bone": 0.25},
                  None, {"step": 100, "mean_dice": 0.125})
    b = _fake_run(tmp_path, "reprec_n1_s0", "hybrid", {"liver": 0.75, "spleen": 0.0, "bone": 0.5},
                  96, {})
    lines = experiment.per_run_lines([{"run_dir": a, "dice": 0.375}, {"run_dir": b, "dice": 0.4}],
                                     {"finetune/scratch_n1_s0": 321})
    assert lines[2] == "| scratch_n1_s0 | unet | 0 | 0.375 | 0.500 | – | 0.250 | 100 (0.125) | 321 |"
    assert lines[3] == "| reprec_n1_s0 | hybrid | 96 | 0.400 | 0.750 | 0.000 | 0.500 | – | – |"


def test_results_section_is_replaced_not_appended(tmp_path):
    path = str(tmp_path / "results.md")
    with open(path, "w") as f:
        f.write("# Results\n\nprose before\n\n<!-- experiment:begin -->\nold\n"
                "<!-- experiment:end -->\n\nprose after\n")
    experiment.write_results_section(path, "new table")
    experiment.write_results_section(path, "newer table")
    text = open(path).read()
    assert text.count("experiment:begin") == 1 and "newer table" in text
    assert "old" not in text and "new table" not in text
    assert text.startswith("# Results\n\nprose before") and text.endswith("prose after\n")
    assert not os.path.exists(path + ".tmp")
