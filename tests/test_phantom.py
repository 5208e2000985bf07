"""Checks of the synthetic abdominal CT phantom (docs/phantom.md, "Budgets and checks")."""

import dataclasses
import json

import numpy as np
import pytest
import scipy.ndimage as ndi

from rr_tf.data.phantom import (LABEL_NAMES, PHASES, Phantom, PhantomConfig, generate_phantom,
                                phantom_spacing, write_phantom_nifti)
from rr_tf.data.phantom import acquisition
from rr_tf.data.phantom.fields import Grid
from rr_tf.data.phantom.tissues import HU_TABLE, Tissue
from rr_tf.errors import ConfigError

SMALL = PhantomConfig(shape=(64, 64, 64))
SEEDS = range(6)

# Tissue whose table value a label's median should match (kidneys: between
# medulla and cortex).
KIDNEY = [Tissue.KIDNEY_MEDULLA, Tissue.KIDNEY_CORTEX]
LABEL_TISSUE = {1: [Tissue.LIVER], 2: [Tissue.SPLEEN], 3: KIDNEY, 4: KIDNEY, 6: [Tissue.PANCREAS],
                7: [Tissue.FLUID], 8: [Tissue.ARTERIAL_BLOOD], 9: [Tissue.CAVAL_BLOOD]}


@pytest.fixture(scope="module")
def small_phantoms():
    return [generate_phantom(s, SMALL) for s in SEEDS]


@pytest.fixture(scope="module")
def phase_phantoms():
    config = PhantomConfig(shape=(96, 96, 96))
    return {p: generate_phantom(11, dataclasses.replace(config, phase=p)) for p in PHASES}


def body_mask(image):
    """Body = HU > -500, closed, holes (lungs, bowel gas) filled per axial slice."""
    pad = 3  # replicate the end slices so the closing does not erode at the volume's edge
    body = np.pad(image > -500, pad, mode="edge")
    body = ndi.binary_closing(body, iterations=2)[pad:-pad, pad:-pad, pad:-pad]
    return np.stack([ndi.binary_fill_holes(body[:, :, k]) for k in range(body.shape[2])], axis=2)


def centroid(mask):
    return np.argwhere(mask).mean(axis=0)


def test_deterministic_per_seed():
    a, b = generate_phantom(7, SMALL), generate_phantom(7, SMALL)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.meta == b.meta


def test_seeds_differ(small_phantoms):
    a, b = small_phantoms[0], small_phantoms[1]
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.labels, b.labels)


def test_shapes_dtypes_affine():
    config = PhantomConfig(shape=(48, 40, 32))
    ph = generate_phantom(3, config)
    assert ph.image.shape == ph.labels.shape == (48, 40, 32)
    assert ph.image.dtype == np.int16 and ph.labels.dtype == np.uint8
    assert ph.image.min() >= -1024 and ph.image.max() <= 3071
    assert ph.affine.dtype == np.float64 and ph.affine.shape == (4, 4)
    np.testing.assert_allclose(ph.affine[:3, :3], np.diag(ph.spacing))
    assert all(s > 0 for s in ph.spacing)
    centre = ph.affine @ np.array([(n - 1) / 2 for n in ph.image.shape] + [1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    # The physical field of view is that of a 128 matrix whatever the shape.
    fov = np.array(ph.spacing) * ph.image.shape
    assert 128 * 2.6 <= fov[0] <= 128 * 3.4 and fov[0] == pytest.approx(fov[1])
    assert 128 * 2.0 - 1e-9 <= fov[2] <= 128 * 4.0 + 1e-9
    json.dumps(ph.meta)
    assert set(np.unique(ph.labels)) <= set(range(11))


def test_phantom_spacing_matches_generation(small_phantoms):
    for seed, ph in zip(SEEDS, small_phantoms):
        assert phantom_spacing(seed, SMALL) == pytest.approx(ph.spacing, rel=1e-12)
        assert list(phantom_spacing(seed, SMALL)) == ph.meta["spacing"]
    # Same physical field of view at every resolution.
    big, small = np.array(phantom_spacing(0)), np.array(phantom_spacing(0, SMALL))
    np.testing.assert_allclose(big * 128, small * 64)


def test_all_labels_present(small_phantoms):
    for ph in small_phantoms:
        present = set(np.unique(ph.labels)) - {0}
        expected = set(LABEL_NAMES)
        if not ph.meta["gallbladder_present"]:
            expected.discard(7)
        assert expected <= present, (ph.meta["seed"], expected - present)
        if not ph.meta["gallbladder_present"]:
            assert 7 not in present


def test_gallbladder_sometimes_absent():
    flags = [generate_phantom(s, PhantomConfig(shape=(24, 24, 24))).meta["gallbladder_present"]
             for s in range(40)]
    assert 0 < flags.count(False) < 15


def test_organ_volumes_plausible(small_phantoms):
    for ph in small_phantoms:
        voxel_litres = np.prod(ph.spacing) * 1e-6
        liver = (ph.labels == 1).sum() * voxel_litres
        spleen = (ph.labels == 2).sum() * voxel_litres
        assert 0.9 <= liver <= 2.5, (ph.meta["seed"], liver)
        assert 0.08 <= spleen <= 0.45, (ph.meta["seed"], spleen)
        for kidney in (3, 4):
            assert 0.05 <= (ph.labels == kidney).sum() * voxel_litres <= 0.35


def test_no_label_outside_body(small_phantoms):
    for ph in small_phantoms:
        outside = (ph.labels > 0) & ~body_mask(ph.image)
        assert outside.sum() == 0, (ph.meta["seed"], outside.sum())


def test_air_and_fat(small_phantoms):
    for ph in small_phantoms:
        body = body_mask(ph.image)
        assert np.median(ph.image[~ndi.binary_dilation(body, iterations=3)]) < -900
        soft = ph.image[body & (ph.labels == 0) & (ph.image > -250) & (ph.image < -20)]
        assert -130 <= np.median(soft) <= -60


@pytest.mark.parametrize("phase", PHASES)
def test_label_median_hu_per_phase(phase_phantoms, phase):
    ph = phase_phantoms[phase]
    assert ph.meta["phase"] == phase
    column = PHASES.index(phase)
    for label, tissues in LABEL_TISSUE.items():
        mask = ndi.binary_erosion(ph.labels == label)
        if mask.sum() < 20:
            mask = ph.labels == label
        if not mask.any():
            assert label == 7 and not ph.meta["gallbladder_present"]
            continue
        values = [HU_TABLE[t][column] for t in tissues]
        enhancement = max(abs(HU_TABLE[t][column] - HU_TABLE[t][0]) for t in tissues)
        tol = 20 + 0.2 * enhancement + (15 if label == 6 else 0)  # fatty pancreatic clefts
        median = float(np.median(ph.image[mask]))
        assert min(values) - tol <= median <= max(values) + tol, (LABEL_NAMES[label], median)


def test_phase_forcing_keeps_anatomy(phase_phantoms):
    labels = [phase_phantoms[p].labels for p in PHASES]
    np.testing.assert_array_equal(labels[0], labels[1])
    np.testing.assert_array_equal(labels[0], labels[2])
    aorta = [np.median(phase_phantoms[p].image[phase_phantoms[p].labels == 8]) for p in PHASES]
    assert aorta[1] > aorta[2] > aorta[0]  # arterial > portal venous > native


def test_noise_sd_in_uniform_region():
    """The acquisition model on a uniform water body: sd at the centre = requested sigma."""
    grid = Grid((96, 96, 48), (3.0, 3.0, 3.0))
    image = np.zeros(grid.shape, np.float32)
    for sigma in (6.0, 15.0, 30.0):
        acq = acquisition.Acquisition(spacing=grid.spacing, thickness_mm=4.5, inplane_blur=0.6,
                                      noise_sigma=sigma, kernel_cutoff=0.6, noise_z_sigma=0.4)
        noise = acquisition.ct_noise(np.random.default_rng(0), grid.shape, acq)
        profile = acquisition.noise_profile(grid, (0.0, 0.0), (150.0, 110.0))
        out = acquisition.acquire(image, acq, noise, profile).astype(np.float32)
        roi = out[40:56, 40:56, 8:40]
        assert abs(roi.std() / sigma - 1.0) < 0.2
        edge = out[40:56, 5:10, 8:40]  # outside the body: weaker
        assert edge.std() < roi.std()


def test_noise_in_generated_phantom_matches_meta():
    """Same seed with and without noise: the difference at the body centre has sd sigma."""
    noisy = generate_phantom(4, SMALL)
    quiet = generate_phantom(4, dataclasses.replace(SMALL, noise_sigma_range=(0.0, 0.0)))
    np.testing.assert_array_equal(noisy.labels, quiet.labels)
    diff = noisy.image.astype(np.float32) - quiet.image
    c = np.array(diff.shape) // 2
    roi = diff[c[0] - 6:c[0] + 6, c[1] - 6:c[1] + 6, 8:-8]
    assert abs(roi.std() / noisy.meta["noise_sigma"] - 1.0) < 0.2
    # FBP-like texture: grain of about a voxel, negative lobe at two voxels.
    assert np.corrcoef(roi[:-1].ravel(), roi[1:].ravel())[0, 1] < 0.6
    assert np.corrcoef(roi[:-2].ravel(), roi[2:].ravel())[0, 1] < 0.1


def test_orientation_and_organ_relations(small_phantoms):
    dz = []
    for ph in small_phantoms:
        lab = ph.labels
        ni = lab.shape[0]
        liver, spleen = centroid(lab == 1), centroid(lab == 2)
        assert liver[0] > ni / 2 > spleen[0]  # liver on the right (large i)
        assert centroid(lab == 3)[0] > ni / 2 > centroid(lab == 4)[0]
        # Spine posterior (small j), aorta in front of it, liver anterior to the spine.
        bone_j = centroid(lab == 10)[1]
        assert bone_j < centroid(lab == 8)[1] and bone_j < liver[1]
        dz.append((centroid(lab == 4)[2] - centroid(lab == 3)[2]) * ph.spacing[2])
        # Lungs (air inside the body) sit above the liver dome.
        liver_cols = (lab == 1).any(axis=2)
        top = np.where(liver_cols, lab.shape[2] - 1 - np.argmax((lab == 1)[:, :, ::-1], axis=2), 0)
        above = np.arange(lab.shape[2])[None, None, :] > top[:, :, None] + 1
        body = body_mask(ph.image)
        lung = (ph.image < -600) & body & above & liver_cols[:, :, None]
        assert lung.any(axis=2)[liver_cols].mean() > 0.5
    assert 5.0 <= np.median(dz) <= 25.0  # left kidney ~15 mm higher
    assert min(dz) > -10.0


def test_to_volumes(small_phantoms):
    ph = small_phantoms[0]
    image, labels = ph.to_volumes("case_000")
    assert image.array.dtype == np.float32 and labels.array.dtype == np.uint8
    np.testing.assert_array_equal(image.array, ph.image)
    np.testing.assert_array_equal(labels.array, ph.labels)
    assert image.source == labels.source == "phantom:case_000"
    assert image.meta["patient_id"] == labels.meta["patient_id"] == "case_000"
    assert image.spacing == pytest.approx(ph.spacing)


def test_write_phantom_nifti_round_trip(tmp_path, small_phantoms):
    nib = pytest.importorskip("nibabel")
    ph = small_phantoms[1]
    img_path, lab_path = write_phantom_nifti(ph, tmp_path, "case_001")
    assert img_path == str(tmp_path / "images" / "case_001.nii.gz")
    assert lab_path == str(tmp_path / "labels" / "case_001.nii.gz")
    img, lab = nib.load(img_path), nib.load(lab_path)
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), ph.image)
    np.testing.assert_array_equal(np.asarray(lab.dataobj), ph.labels)
    np.testing.assert_allclose(img.affine, ph.affine, atol=1e-5)
    np.testing.assert_allclose(lab.affine, ph.affine, atol=1e-5)
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file() and "tmp" in p.name]
    assert leftovers == []


def test_config_validation():
    with pytest.raises(ConfigError):
        PhantomConfig(shape=(64, 64))
    with pytest.raises(ConfigError):
        PhantomConfig(phase="delayed")
    with pytest.raises(ConfigError):
        PhantomConfig(noise_sigma_range=(10.0, 5.0))
    assert isinstance(generate_phantom(0, PhantomConfig(shape=(16, 16, 16))), Phantom)


def test_difficulty_knobs():
    base = PhantomConfig(shape=(48, 48, 48), phase="native")
    no_bowel = generate_phantom(2, dataclasses.replace(base, bowel_density=0.0))
    with_bowel = generate_phantom(2, base)
    # Small bowel is unlabelled context: the image changes, the labels do not.
    assert (no_bowel.image != with_bowel.image).sum() > 1000
    np.testing.assert_array_equal(no_bowel.labels, with_bowel.labels)
    stiff = generate_phantom(2, dataclasses.replace(base, deformation_mm_range=(0.0, 0.0)))
    assert not np.array_equal(stiff.labels, with_bowel.labels)


@pytest.mark.slow
def test_full_size_budget_and_sanity():
    import time

    times = []
    for seed in range(5):
        t0 = time.perf_counter()
        ph = generate_phantom(seed)
        times.append(time.perf_counter() - t0)
        voxel_litres = np.prod(ph.spacing) * 1e-6
        assert 0.9 <= (ph.labels == 1).sum() * voxel_litres <= 2.5
        assert 0.08 <= (ph.labels == 2).sum() * voxel_litres <= 0.45
        assert ((ph.labels > 0) & ~body_mask(ph.image)).sum() == 0
    assert np.median(times) < 3.0
