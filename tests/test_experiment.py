"""launch/experiment.py's bookkeeping, without training: results.json built
from score JSONs, the paired statistics in it, resuming from the scores
folder, the seed-disjointness check, the plot and the docs section."""

import json
import math
import os
import subprocess
import sys

import pytest

experiment = pytest.importorskip("launch.experiment")
report = pytest.importorskip("launch.experiment_report")
from rr_tf import stats  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _settings(**kw):
    s = dict(preset="quick", methods=["reprec"], num_labeled=[1], seeds=3, pool_cases=4,
             test_cases=2, pretrain_steps=4, pretrain_batch=2, finetune_steps=4, validations=1,
             val_cases=1, width=4, hw="configs/hw/cpu.flags", recipe="configs/demo_finetune.flags",
             finetune_spacing="6,6,6", pool_spacing="6,6,6", finetune_cases=16, pool_seed=2000,
             labelled_seed=0, test_seed=1000, crop_size="48,48,32", test_overlap=0.25,
             resamples=1000)
    s.update(kw)
    return s


def _score(out, arm, budget, seed, dice, organs=None):
    rec = {"arm": arm, "budget": budget, "seed": seed, "dice": dice,
           "organs": organs or {"liver": dice + 0.1, "pancreas": None}, "segmenter": "unet",
           "loaded": 0, "best_val": {"step": 4, "dice": dice}, "finetune_steps": 4,
           "wall_s": 60.0, "run_dir": f"/gone/{arm}_n{budget}_s{seed}"}
    path = experiment.score_path(str(out), arm, budget, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rec, f)
    return rec


def _fake_experiment(out):
    for seed, (a, b) in enumerate([(0.4, 0.5), (0.5, 0.7), (0.6, 0.9)]):
        _score(out, "scratch", 1, seed, a)
        _score(out, "reprec", 1, seed, b)
    with open(experiment.pretrain_record_path(str(out), "reprec"), "w") as f:
        json.dump({"method": "reprec", "steps": 4, "batch": 2, "steps_x_batch": 8,
                   "wall_s": 30.0}, f)


def _results(out, s):
    scores = experiment.load_scores(str(out))
    pre = {"reprec": json.load(open(experiment.pretrain_record_path(str(out), "reprec")))}
    return experiment.build_results(s, scores, pre,
                                    experiment.data_record(s, experiment.planned_seeds(s)))


def test_results_json_from_score_files(tmp_path):
    _fake_experiment(tmp_path)
    s = _settings()
    res = _results(tmp_path, s)
    scratch, reprec = res["results"]["1"]["scratch"], res["results"]["1"]["reprec"]
    assert scratch["dice"] == [0.4, 0.5, 0.6] and scratch["mean"] == pytest.approx(0.5)
    assert "diff_mean" not in scratch  # the reference arm
    assert reprec["dice"] == [0.5, 0.7, 0.9] and reprec["mean"] == pytest.approx(0.7)
    assert reprec["diffs"] == pytest.approx([0.1, 0.2, 0.3])
    assert reprec["diff_mean"] == pytest.approx(0.2)
    assert reprec["diff_ci95"] == pytest.approx(stats.bootstrap_ci([0.1, 0.2, 0.3], 1000))
    assert reprec["diff_ci95"] == pytest.approx((0.1, 0.3))  # see test_stats: 1/27 > 2.5 %
    liver = reprec["organs"]["liver"]
    assert liver["dice"] == pytest.approx([0.6, 0.8, 1.0]) and liver["diff_mean"] == \
        pytest.approx(0.2)
    assert reprec["organs"]["pancreas"]["dice"] == [None] * 3  # absent everywhere: no pairs
    assert math.isnan(reprec["organs"]["pancreas"]["diff_mean"])
    assert res["pretraining"]["reprec"]["steps_x_batch"] == 8
    assert res["pretraining"]["reprec"]["wall_s"] == 30.0
    assert res["preset"] == "quick"
    data = res["data"]
    assert [data[k]["data_seed"] for k in ("pool", "labelled", "test")] == [2000, 0, 1000]
    assert len(data["pool"]["phantom_seeds"]) == 4 and len(data["test"]["phantom_seeds"]) == 2
    assert res["power"]["1"]["reprec"]["n"] == 3
    assert res["power"]["1"]["reprec"]["seeds_for_0.05"] == 16  # (2 * 0.1 / 0.05)^2


def test_outputs_are_valid_json_markdown_and_a_plot(tmp_path):
    _fake_experiment(tmp_path)
    res = _results(tmp_path, _settings(seeds=3))
    res["results"]["1"]["scratch"]["std"] = math.nan  # NaN must become null
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n\n<!-- experiment:begin -->\nold\n"
                                     "<!-- experiment:end -->\n\nprose\n")
    md, plotted = experiment.write_outputs(str(tmp_path), res, str(docs))
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text
    back = json.loads(text)
    assert set(back["results"]["1"]["reprec"]) >= {"dice", "mean", "diff_mean", "diff_ci95",
                                                   "organs"}
    assert json.loads((docs / "results.json").read_text()) == back
    assert "**This is the quick preset**" in md and "half-widths of 0.100-0.100" in md
    assert "| reprec | 0.700 (3) | +0.200 [+0.100, +0.300] |" in md
    assert "| reprec_n1_s2 | unet | 0 | 0.900 | 4 (0.900) | 1.0 |" in md  # no run dir needed
    assert "old" not in (docs / "results.md").read_text()
    assert (tmp_path / "results.md").read_text() == md + "\n"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not plotted and "Plot skipped" in md
    else:
        assert plotted
        for d in (tmp_path, docs):
            with open(d / "dice_vs_labels.png", "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_is_skipped_with_a_hint_without_matplotlib(tmp_path, monkeypatch):
    _fake_experiment(tmp_path)
    res = _results(tmp_path, _settings())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    md, plotted = experiment.write_outputs(str(tmp_path), res)
    assert not plotted and not (tmp_path / "dice_vs_labels.png").exists()
    assert "Plot skipped: matplotlib is not installed (pip install -e .[plots]" in md
    assert (tmp_path / "results.json").exists()


def _fake_launcher(calls, kind, dice_of_seed):
    """experiment.run stand-in: records each command; a fine-tuning leaves a
    finished run.json of segmenter ``kind``, an inference the test metrics
    of Dice ``dice_of_seed(seed)`` (seed read from the run directory)."""
    def fake_run(out, cmd):
        calls.append(cmd)
        run_dir = next((a.split("=", 1)[1] for a in cmd
                        if a.startswith(("--run_dir=", "--model="))), None)
        if cmd[1] == "launch/finetune.py":
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "run.json"), "w") as f:
                json.dump({"kind": kind, "finished": True}, f)
        if cmd[1] == "launch/infer.py":
            seed = int(run_dir.rsplit("_s", 1)[1])
            os.makedirs(os.path.join(run_dir, "test_metrics"))
            with open(os.path.join(run_dir, "test_metrics", "metrics.json"), "w") as f:
                json.dump({"summary": {"classes": {"liver": {"dice_mean": 0.9}},
                                       "overall": {"dice_class_mean": dice_of_seed(seed)}}}, f)
        return 1.0
    return fake_run


def test_scored_runs_are_not_launched_again(tmp_path, monkeypatch):
    s = _settings(num_labeled=[1], seeds=2)
    for arm in ("scratch", "reprec"):
        for seed in range(2):
            _score(tmp_path, arm, 1, seed, 0.5)
    calls = []
    monkeypatch.setattr(experiment, "run", lambda out, cmd: calls.append(cmd) or 0.0)
    monkeypatch.setattr(experiment, "prepare_data", lambda *a: calls.append("data"))
    scores = experiment.run_experiment(str(tmp_path), s)
    assert calls == [] and len(scores) == 4  # nothing launched, not even data preparation

    # one score missing: only that fine-tuning (and its inference and scoring) runs, and
    # the pre-training of a method whose runs are all scored is not launched
    os.remove(experiment.score_path(str(tmp_path), "scratch", 1, 1))
    pretrained = []

    monkeypatch.setattr(experiment, "run", _fake_launcher(calls, "unet", lambda seed: 0.3))
    monkeypatch.setattr(experiment, "prepare_data", lambda out, s: ("POOL", "LAB", "TEST"))
    monkeypatch.setattr(experiment, "pretrain", lambda *a: pretrained.append(a))
    scores = experiment.run_experiment(str(tmp_path), s)
    assert pretrained == []
    assert [c[1] for c in calls] == ["launch/finetune.py", "launch/infer.py", "launch/evaluate.py"]
    ft = calls[0]
    assert "--seed=1" in ft and "--num_labeled=1" in ft and "--data_dir=LAB" in ft
    assert "--flagfile=configs/demo_finetune.flags" in ft and "--prepare_phantom_if_missing=0" in ft
    assert "--base_width=4" in ft and not any(a.startswith("--pretrained") for a in ft)
    new = json.load(open(experiment.score_path(str(tmp_path), "scratch", 1, 1)))
    assert new["dice"] == 0.3 and new["organs"] == {"liver": 0.9}
    assert sorted((r["arm"], r["seed"]) for r in scores) == [
        ("reprec", 0), ("reprec", 1), ("scratch", 0), ("scratch", 1)]

    # a score made with another schedule is not mixed in silently
    with pytest.raises(ValueError, match="scored after 4 fine-tuning steps, this run asks 300"):
        experiment.run_experiment(str(tmp_path), dict(s, finetune_steps=300))


def test_overlapping_seed_sets_fail_in_one_line(tmp_path):
    with pytest.raises(ValueError) as err:
        experiment.check_disjoint({"pool": [1, 2, 3], "labelled": [3, 4], "test": [5]})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("the pool and labelled phantoms overlap: 1 shared")
    experiment.check_disjoint({"pool": [1, 2], "labelled": [3], "test": [4]})  # no error
    # the launcher: the same data seed for pool and labelled shards, refused before any work
    out = tmp_path / "exp"
    res = subprocess.run([sys.executable, "launch/experiment.py", f"--output_dir={out}",
                          "--pool_seed=0", "--pool_cases=20"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("experiment.py: error: the pool and labelled phantoms overlap: "
                               "16 shared phantom seed(s)")
    assert not out.exists()


def test_planned_seed_sets_of_the_defaults_are_disjoint():
    seeds = experiment.planned_seeds(_settings(pool_cases=400, test_cases=10))
    experiment.check_disjoint(seeds)
    assert len(set(seeds["pool"])) == 400


def test_results_section_is_replaced_not_appended(tmp_path):
    path = str(tmp_path / "results.md")
    with open(path, "w") as f:
        f.write("# Results\n\nprose before\n\n<!-- experiment:begin -->\nold\n"
                "<!-- experiment:end -->\n\nprose after\n")
    report.write_results_section(path, "new table")
    report.write_results_section(path, "newer table")
    text = open(path).read()
    assert text.count("experiment:begin") == 1 and "newer table" in text
    assert "old" not in text and "new table" not in text
    assert text.startswith("# Results\n\nprose before") and text.endswith("prose after\n")
    assert not os.path.exists(path + ".tmp")


def test_control_arm_fine_tunes_the_method_architecture_without_its_weights(tmp_path, monkeypatch):
    """RepRec's segmenter is the hybrid, not the scratch U-Net: with
    controls on, the arm 'reprec-random' fine-tunes --pretrained=<reprec
    run> --load_weights=false, needs (only) RepRec's pre-training, and the
    results carry reprec - reprec-random as vs_control."""
    s = _settings(num_labeled=[1], seeds=3, controls=True, methods=["reprec", "moco"])
    assert experiment.arms_of(s) == ["scratch", "reprec", "moco", "reprec-random"]
    assert experiment.controls(s) == {"reprec": "reprec-random"}  # moco fine-tunes a U-Net
    assert experiment.method_of("reprec-random") == "reprec" and \
        experiment.method_of("scratch") is None
    for seed, (a, b, c) in enumerate([(0.4, 0.5, 0.45), (0.5, 0.7, 0.5), (0.6, 0.9, 0.6)]):
        _score(tmp_path, "scratch", 1, seed, a)
        _score(tmp_path, "reprec", 1, seed, b)
        _score(tmp_path, "moco", 1, seed, a)
    calls, pretrained = [], []

    monkeypatch.setattr(experiment, "run",
                        _fake_launcher(calls, "hybrid", lambda seed: [0.45, 0.5, 0.6][seed]))
    monkeypatch.setattr(experiment, "prepare_data", lambda out, s: ("POOL", "LAB", "TEST"))
    monkeypatch.setattr(experiment, "pretrain", lambda out, s, m, pool: pretrained.append(m))
    scores = experiment.run_experiment(str(tmp_path), s)
    assert pretrained == ["reprec"]  # the control's architecture comes from RepRec's run
    fts = [c for c in calls if c[1] == "launch/finetune.py"]
    assert len(fts) == 3 and all("--load_weights=false" in c for c in fts)
    assert all(f"--pretrained={tmp_path / 'pretrain' / 'reprec'}" in c for c in fts)
    assert all(not any(a.startswith("--base_width") for a in c) for c in fts)
    assert len(scores) == 12
    res = experiment.build_results(s, scores, {}, experiment.data_record(
        s, experiment.planned_seeds(s)))
    row = res["results"]["1"]
    assert row["reprec-random"]["diffs"] == pytest.approx([0.05, 0.0, 0.0])  # vs scratch
    vs = row["reprec"]["vs_control"]
    assert vs["arm"] == "reprec-random" and vs["diffs"] == pytest.approx([0.05, 0.2, 0.3])
    assert vs["diff_mean"] == pytest.approx(0.55 / 3)
    assert "vs_control" not in row["moco"] and "vs_control" not in row["reprec-random"]
    assert res["arms"] == ["scratch", "reprec", "moco", "reprec-random"]
    md = report.report_markdown(res)
    assert "| reprec | +0.183 [" in md and "Δ vs own architecture" in md


def test_fine_tunings_run_seed_by_seed_so_a_stopped_experiment_holds_pairs(tmp_path, monkeypatch):
    s = _settings(num_labeled=[1, 4], seeds=2)
    calls = []
    monkeypatch.setattr(experiment, "run", _fake_launcher(calls, "unet", lambda seed: 0.3))
    monkeypatch.setattr(experiment, "prepare_data", lambda out, s: ("POOL", "LAB", "TEST"))
    monkeypatch.setattr(experiment, "pretrain", lambda *a: None)
    experiment.run_experiment(str(tmp_path), s)
    order = [os.path.basename(next(a.split("=", 1)[1] for a in c if a.startswith("--run_dir=")))
             for c in calls if c[1] == "launch/finetune.py"]
    assert order == ["scratch_n1_s0", "reprec_n1_s0", "scratch_n4_s0", "reprec_n4_s0",
                     "scratch_n1_s1", "reprec_n1_s1", "scratch_n4_s1", "reprec_n4_s1"]
