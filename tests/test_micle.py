"""MICLe pairing (``--pairing=patient``) through the pre-training engine:
views of two different scans of one patient, augmented like the method's
own pairs; refused for methods without a two-view contrastive term."""

import numpy as np
import pytest
import tensorflow as tf

from nifti_factory import write
from rr_tf.data import recipes
from rr_tf.data.pipeline import StreamConfig, pair_view_dataset
from rr_tf.data.prepare import PrepareConfig, prepare
from rr_tf.data.spec import PreprocessSpec
from rr_tf.errors import ConfigError
from rr_tf.methods.base import PretrainMethod
from rr_tf.training.pretrain import PretrainConfig, run_pretraining

from method_harness import REPREC_TINY as TINY


@pytest.fixture(scope="module")
def two_scan_patients(tmp_path_factory):
    """P0 and P1 with two scans each (different noise, same anatomy), P2 with one."""
    root = tmp_path_factory.mktemp("micle")
    src = root / "img"
    src.mkdir()
    rng = np.random.default_rng(0)
    table = ["case_id,patient_id"]
    for i, pid in enumerate(["P0", "P0", "P1", "P1", "P2"]):
        base = np.full((40, 40, 36), -800, np.int16)
        base[8:30, 10:28, 6:30] = 40 + 200 * (pid == "P1")
        base = base + rng.integers(-30, 30, base.shape).astype(np.int16)
        write(src / f"s{i}.nii.gz", base, np.eye(4), dtype=np.int16)
        table.append(f"s{i},{pid}")
    (root / "p.csv").write_text("\n".join(table) + "\n")
    out = root / "shards"
    prepare(PrepareConfig(source=str(src), output_dir=str(out), patient_table=str(root / "p.csv"),
                          spec=PreprocessSpec(spacing=None), workers=1, progress=False,
                          val_fraction=0.0), log=lambda m: None)
    return str(out)


def test_augmented_patient_pairs_are_float_views_of_two_scans(two_scan_patients):
    cfg = StreamConfig(batch_size=4, crops_per_volume=1, seed=1)
    ds, _ = pair_view_dataset(two_scan_patients, "train",
                              recipes.patient_pair((16, 16, 16), augment=True), cfg)
    b = next(iter(ds))
    assert b["view1"].dtype == tf.float32 and b["view1"].shape == (4, 16, 16, 16, 1)
    a, c = b["case_id_a"].numpy(), b["case_id_b"].numpy()
    assert any(x != y for x, y in zip(a, c))  # two different scans for P0 / P1
    assert not np.allclose(b["view1"].numpy(), b["view2"].numpy())


def test_engine_runs_reprec_with_patient_pairing(two_scan_patients, tmp_path):
    lines = []
    cfg = PretrainConfig(method="reprec", data_dir=two_scan_patients, run_dir=str(tmp_path / "r"),
                         method_config=TINY, train_steps=2, batch_size=2, crop_size=(32, 32, 32),
                         crops_per_volume=1, pairing="patient", checkpoint_every=2, verbose=0,
                         export=False)
    metrics = run_pretraining(cfg, log=lines.append)
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
    assert any("2 of 3 training patients have two or more scans" in m for m in lines), lines


def test_patient_pairing_refused_without_a_two_view_term():
    class NoPairs(PretrainMethod):
        pass

    with pytest.raises(ConfigError, match="pairing"):
        NoPairs.pair_recipe(None, (16, 16, 16))
    with pytest.raises(ConfigError, match="pairing"):
        PretrainConfig(method="reprec", data_dir="x", run_dir="y", pairing="both").validate()
