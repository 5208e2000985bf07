"""tf.data view streams read from real shards."""

import numpy as np
import pytest
import tensorflow as tf

from rr_tf.errors import DataError
from rr_tf.data import records, recipes
from rr_tf.data.pipeline import StreamConfig, case_dataset, pair_view_dataset, view_dataset
from rr_tf.data.prepare import PrepareConfig, prepare
from rr_tf.data.spec import PreprocessSpec
from nifti_factory import write


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 labelled cases (2 per shard): HU ramps unique per voxel; the label
    is a small cube (class 2) so foreground is rare."""
    root = tmp_path_factory.mktemp("pipe")
    (root / "img").mkdir()
    (root / "lab").mkdir()
    rng = np.random.default_rng(0)
    for c in range(6):
        shape = (40 + 2 * c, 36, 24)
        hu = rng.integers(-1000, 1000, shape).astype(np.int16)
        lab = np.zeros(shape, np.uint8)
        lab[5:9, 20:24, 3:7] = 2
        hu[lab > 0] = 1000  # only labelled voxels reach 1000: alignment is checkable
        write(root / "img" / f"c{c}.nii.gz", hu, np.diag([1.0, 1.0, 2.0, 1.0]), dtype=np.int16)
        write(root / "lab" / f"c{c}.nii.gz", lab, np.diag([1.0, 1.0, 2.0, 1.0]), dtype=np.uint8)
    out = root / "shards"
    prepare(PrepareConfig(source=str(root / "img"), labels_dir=str(root / "lab"), output_dir=str(out),
                          spec=PreprocessSpec(spacing=None), workers=1, progress=False,
                          cases_per_shard=2, val_fraction=0.0), log=lambda m: None)
    volumes = {c["case_id"]: c["image"] for c in records.iterate_cases(out)}
    return out, volumes


def _take(ds, n):
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(n)]


def test_random_crop_stream_shapes_content_and_determinism(shards):
    out, volumes = shards
    cfg = StreamConfig(batch_size=3, crops_per_volume=2, seed=5)
    ds, manifest = view_dataset(out, "train", recipes.random_crop((16, 16, 8)), cfg)
    batches = _take(ds, 6)
    assert batches[0]["view"].shape == (3, 16, 16, 8, 1) and batches[0]["view"].dtype == np.float32
    for b in batches:
        for view, box, cid in zip(b["view"], b["box"], b["case_id"]):
            vol = volumes[cid.decode()]
            (x, y, z), (dx, dy, dz) = box
            assert x >= 0 and y >= 0 and z >= 0 and x + dx <= vol.shape[0] and y + dy <= vol.shape[1]
            expect = (np.clip(vol[x:x + dx, y:y + dy, z:z + dz], -1000, 1000) + 1000) / 2000.0
            np.testing.assert_allclose(view[..., 0], expect, atol=1e-6)
    again = _take(view_dataset(out, "train", recipes.random_crop((16, 16, 8)), cfg)[0], 6)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["view"], b["view"])
        np.testing.assert_array_equal(a["box"], b["box"])
    cfg.seed = 6
    other = _take(view_dataset(out, "train", recipes.random_crop((16, 16, 8)), cfg)[0], 6)
    assert any(not np.array_equal(a["box"], b["box"]) for a, b in zip(batches, other))


def test_finetune_patches_oversample_foreground_and_stay_aligned(shards):
    out, _ = shards
    cfg = StreamConfig(batch_size=8, crops_per_volume=4, seed=1)
    ds, _ = view_dataset(out, "train", recipes.finetune_patch((12, 12, 6), spatial=None), cfg,
                         labelled=True)
    batches = _take(ds, 8)
    labels = np.concatenate([b["label"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])[..., 0]
    with_fg = np.mean([l.any() for l in labels])
    # the cube is ~0.4 % of each volume: uniform patches alone would rarely hit it
    assert 0.25 <= with_fg <= 0.7, with_fg
    assert np.all(images[labels == 2] == 1.0)          # labelled voxels are the bright ones
    assert np.mean(images[labels == 0] == 1.0) < 0.01


def _centre_classes(sampling, draws=400):
    """Class at the centre of ``draws`` patches of a volume holding a big
    class 1 (a slab, ~30 % of the voxels) and a tiny class 2 (a 2^3 cube)."""
    label = np.zeros((40, 40, 20), np.uint8)
    label[:, :12, :] = 1
    label[30:32, 30:32, 10:12] = 2
    image = tf.zeros(label.shape + (1,), tf.int16)
    size = np.array([8, 8, 4])
    fn = recipes.finetune_patch(tuple(size), fg_fraction=1.0, spatial=None, sampling=sampling)
    centres = []
    for i in range(draws):
        out = fn(image, tf.constant(label), tf.constant([i, 7], tf.int32), lambda x: x)
        lab = out["label"].numpy()
        centres.append(int(lab[tuple(size // 2)]))
    return np.bincount(centres, minlength=3)


def test_class_balanced_patches_centre_every_present_class_equally():
    counts = _centre_classes("class_balanced")
    # each of the two present classes is the centre of about half the patches
    # (binomial(400, 0.5): +-50 is about 5 standard deviations); never background
    assert counts[0] == 0 and abs(counts[1] - 200) < 50 and abs(counts[2] - 200) < 50, counts
    plain = _centre_classes("foreground")
    # drawing any labelled voxel: the tiny cube (8 of ~9,600 voxels) is almost never the centre
    assert plain[2] <= 5 and plain[0] == 0, plain
    with pytest.raises(ValueError, match="sampling"):
        recipes.finetune_patch((8, 8, 4), sampling="uniform")


def test_corrupt_shard_is_named_or_skipped(shards, tmp_path):
    import shutil

    out, _ = shards
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = records.read_manifest(copy)
    bad = copy / manifest["shards"][1]["name"]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as info:
        case_dataset(copy, "train", StreamConfig())
    assert str(bad) in str(info.value)
    msgs = []
    ds, _ = case_dataset(copy, "train", StreamConfig(skip_corrupt=True, repeat=False), log=msgs.append)
    ids = sorted(c["case_id"].numpy().decode() for c in ds)
    assert len(ids) == 4 and any(str(bad) in m for m in msgs)
    bad.write_bytes(data[:-3] + b"xyz")  # same size, different content
    with pytest.raises(DataError, match="sha256"):
        case_dataset(copy, "train", StreamConfig(verify="sha256"))


def test_input_context_shards_by_file(shards):
    out, _ = shards
    seen = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid)
        ds, _ = case_dataset(out, "train", StreamConfig(repeat=False), input_context=ctx)
        seen.append({c["case_id"].numpy().decode() for c in ds})
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 6


def test_patient_pairs_use_two_scans_of_one_patient(tmp_path):
    """3 patients: P0 with 3 scans, P1 with 2, P2 with 1 (paired with itself)."""
    src = tmp_path / "img"
    src.mkdir()
    table = ["case_id,patient_id"]
    patient_of = {}
    rng = np.random.default_rng(1)
    for i, pid in enumerate(["P0", "P0", "P1", "P2", "P0", "P1"]):
        cid = f"s{i}"
        write(src / f"{cid}.nii.gz", rng.integers(-900, 900, (20 + i, 18, 12)).astype(np.int16),
              np.eye(4), dtype=np.int16)
        table.append(f"{cid},{pid}")
        patient_of[cid] = pid
    (tmp_path / "p.csv").write_text("\n".join(table) + "\n")
    out = tmp_path / "shards"
    prepare(PrepareConfig(source=str(src), output_dir=str(out), patient_table=str(tmp_path / "p.csv"),
                          spec=PreprocessSpec(spacing=None), workers=1, progress=False,
                          cases_per_shard=1, val_fraction=0.0), log=lambda m: None)
    manifest = records.read_manifest(out)
    shard_of = {c["case_id"]: c["shard"] for c in manifest["cases"]}
    assert shard_of["s0"] == shard_of["s1"] == shard_of["s4"]  # a patient is never split
    cfg = StreamConfig(batch_size=4, crops_per_volume=1, seed=3)
    ds, _ = pair_view_dataset(out, "train", recipes.patient_pair((8, 8, 8)), cfg)
    pairs = []
    for b in ds.take(12):
        pairs += [(a.decode(), c.decode()) for a, c in zip(b["case_id_a"].numpy(), b["case_id_b"].numpy())]
        assert b["view1"].shape == (4, 8, 8, 8, 1)
    assert all(patient_of[a] == patient_of[b] for a, b in pairs), pairs
    assert all(a != b for a, b in pairs if patient_of[a] != "P2"), pairs
    assert ("s3", "s3") in pairs and any(patient_of[a] == "P0" for a, _ in pairs)


def test_unit_scaler_clips_padding_only_when_needed():
    from rr_tf.data.pipeline import unit_scaler

    wide = unit_scaler(PreprocessSpec(hu_window=(-1000, 1000)))
    np.testing.assert_allclose(wide(tf.constant([-1000, 0, 1000], tf.int16)), [0, 0.5, 1])
    narrow = unit_scaler(PreprocessSpec(hu_window=(-200, 300)))
    # -1000 is the crop padding value: below this window, so it must clip to 0
    np.testing.assert_allclose(narrow(tf.constant([-1000, -200, 50, 300], tf.int16)), [0, 0, 0.5, 1])
    raw = unit_scaler(PreprocessSpec(scaling="none"))
    np.testing.assert_allclose(raw(tf.constant([-1000, 7], tf.int16)), [-1000, 7])


def test_finetune_augmentation_moves_image_and_label_together(shards):
    out, _ = shards
    cfg = StreamConfig(batch_size=8, crops_per_volume=4, seed=2)
    ds, _ = view_dataset(out, "train", recipes.finetune_patch((16, 16, 8)), cfg, labelled=True)
    batches = _take(ds, 6)
    labels = np.concatenate([b["label"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])[..., 0]
    assert images.dtype == np.float32 and set(np.unique(labels)) <= {0, 2}
    assert labels.any()
    # bright (1.0) cube and label 2 stay on top of each other after flip + affine
    assert images[labels == 2].mean() > 0.9
    assert np.mean(images[labels == 0] > 0.99) < 0.02


def test_tissue_shift_moves_each_organ_by_its_own_offset():
    """Per-organ offsets (contrast-phase stand-in): every voxel of one label
    moves by the same HU, labels move independently, background never."""
    label = np.zeros((24, 24, 12), np.uint8)
    label[2:10, 2:10, 2:10] = 1
    label[12:22, 12:22, 2:10] = 2
    image = tf.fill(label.shape + (1,), tf.constant(40, tf.int16))  # 40 HU everywhere
    to_unit = lambda x: (tf.cast(x, tf.float32) + 1000.0) / 2000.0  # noqa: E731
    keep = lambda i, lab, s: (i, lab)  # noqa: E731  (no spatial change: offsets readable)
    fn = recipes.finetune_patch((24, 24, 12), fg_fraction=0.0, spatial=keep,
                                tissue_shift_hu=100.0, tissue_shift_p=1.0)
    offsets = []
    for i in range(20):
        out = fn(image, tf.constant(label), tf.constant([i, 3], tf.int32), to_unit)
        hu = out["image"].numpy()[..., 0] * 2000.0 - 1000.0 - 40.0
        lab = out["label"].numpy()
        assert np.allclose(hu[lab == 0], 0.0, atol=1e-3)
        per = []
        for k in (1, 2):
            vals = hu[lab == k]
            assert vals.size and np.ptp(vals) < 1e-2 and abs(vals[0]) <= 100.0 + 1e-3
            per.append(float(vals[0]))
        offsets.append(per)
    offsets = np.array(offsets)
    # independent U(-100, 100) draws: spread over the range, not equal between organs
    assert offsets.std(axis=0).min() > 30.0 and np.abs(offsets[:, 0] - offsets[:, 1]).max() > 20.0
    off = recipes.finetune_patch((24, 24, 12), fg_fraction=0.0, spatial=keep)
    out = off(image, tf.constant(label), tf.constant([0, 3], tf.int32), to_unit)
    assert np.allclose(out["image"].numpy(), to_unit(40).numpy())


def test_finetune_patch_crops_the_deformations_reach():
    """A zoom-out reads beyond the patch: the patch is cut with the region
    the augmentation asks for (same centre), so the border shows what lies
    around it (here: air outside a volume the size of the patch, label 0)
    instead of repeating the patch's edge."""
    label = np.ones((16, 16, 8), np.int32)
    image = tf.fill((16, 16, 8, 1), tf.constant(200, tf.int16))
    to_unit = lambda x: (tf.cast(x, tf.float32) + 1000.0) / 2000.0  # noqa: E731
    aug = recipes.finetune_augmentation((), scale=(0.5, 0.5), degrees=0.0)
    assert aug.input_size((16, 16, 8))[0] >= 32
    fn = recipes.finetune_patch((16, 16, 8), fg_fraction=0.0, spatial=aug)
    out = fn(image, tf.constant(label), tf.constant([1, 2], tf.int32), to_unit)
    img, lab = out["image"].numpy()[..., 0], out["label"].numpy()
    assert img.shape == (16, 16, 8) and lab.shape == (16, 16, 8)
    np.testing.assert_array_equal(lab[4:12, 4:12, 2:6], 1)   # the volume, zoomed out by 2
    assert lab[0].max() == 0 and lab[:, 0].max() == 0        # air around it
    np.testing.assert_allclose(img[lab == 1], to_unit(200).numpy(), atol=1e-3)
    np.testing.assert_allclose(img[lab == 0], 0.0, atol=1e-3)
    with pytest.raises(ValueError, match="scale range"):
        recipes.finetune_augmentation((), scale=(1.2, 0.8))


def test_finetune_augmentation_flips_only_the_axes_asked():
    """Label 1 fills the low half of axis 0, label 2 the high half: a flip of
    axis 0 swaps their order, the rotation (<= 10 deg) and scale never do."""
    label = np.ones((16, 16, 8), np.int32)
    label[8:] = 2
    image = tf.constant(label[..., None], tf.float32)
    coord = np.arange(16)[:, None, None] * np.ones((16, 16, 8))

    def swapped(axes, seeds=16):
        fn = recipes.finetune_augmentation(flip_axes=axes, intensity=axes == (1, 2))
        out = []
        for i in range(seeds):
            _, lab = fn(image, tf.constant(label), tf.constant([i, 5], tf.int32))
            lab = lab.numpy()
            out.append(coord[lab == 1].mean() > coord[lab == 2].mean())
        return sum(out)

    assert swapped((1, 2)) == 0
    assert 3 <= swapped((0,)) <= 13  # p 0.5 per axis over 16 draws
    with pytest.raises(ValueError, match="flip axes"):
        recipes.finetune_augmentation(flip_axes=(3,))


def _flip_bytes_inside_a_record(path):
    """Three bytes flipped in the middle of a shard: same size, broken CRC."""
    data = bytearray(path.read_bytes())
    for i in range(3):
        data[len(data) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_same_size_corrupt_shard_is_named_in_the_stream_or_skipped(shards, tmp_path, capfd):
    """Flipped bytes pass the size check; reading the stream then stops with
    a DataError naming the shard and the byte offset (not a raw
    DataLossError), or with skip_corrupt drops the rest of that shard with a
    warning naming it."""
    import shutil

    from rr_tf.data.pipeline import shard_errors_named

    out, _ = shards
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = records.read_manifest(copy)
    bad = copy / manifest["shards"][1]["name"]
    _flip_bytes_inside_a_record(bad)
    ds, _ = case_dataset(copy, "train", StreamConfig(repeat=False))  # size check passes
    with pytest.raises(DataError) as info, shard_errors_named():
        for _ in ds:
            pass
    message = str(info.value)
    assert message.startswith(f"{bad}: record ") and "of 2 cannot be read" in message
    assert "corrupted record at byte" in message and "\n" not in message
    ds, _ = case_dataset(copy, "train", StreamConfig(repeat=False, skip_corrupt=True))
    ids = [c["case_id"].numpy().decode() for c in ds]
    assert 4 <= len(ids) < 6  # the good shards, and what of the bad one read before the damage
    warned = [l for l in capfd.readouterr().err.splitlines()
              if l.startswith("warning: skipping the rest of shard")]
    assert len(warned) == 1 and str(bad) in warned[0] and "of 2 cannot be read" in warned[0]
    with pytest.raises(DataError, match="sha256"):
        case_dataset(copy, "train", StreamConfig(verify="sha256"))
