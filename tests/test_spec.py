import json

import numpy as np
import pytest

from rr_tf.errors import ConfigError
from rr_tf.data.spec import SPEC_VERSION, PreprocessSpec


def test_json_round_trip_and_hash():
    spec = PreprocessSpec(spacing=(1, 1.5, 2), hu_window=(-200, 300), foreground_crop=True)
    again = PreprocessSpec.from_json(spec.to_json())
    assert again == spec and again.hash == spec.hash
    assert len(spec.hash) == 16
    assert json.loads(spec.to_json())["version"] == SPEC_VERSION


def test_hash_is_insensitive_to_number_types_but_not_values():
    a = PreprocessSpec(spacing=[1, 1, 2], hu_window=[-1000, 1000])
    b = PreprocessSpec(spacing=(1.0, 1.0, 2.0), hu_window=(-1000.0, 1000.0))
    assert a.hash == b.hash
    assert PreprocessSpec(spacing=(1, 1, 2.5)).hash != a.hash
    assert PreprocessSpec(spacing=None).hash != a.hash
    assert PreprocessSpec(foreground_crop=True).hash != PreprocessSpec().hash


@pytest.mark.parametrize("kwargs,name", [
    (dict(spacing=(1, 1)), "spacing"),
    (dict(spacing=(1, 0, 1)), "spacing"),
    (dict(hu_window=(100, -100)), "hu_window"),
    (dict(hu_window=(-1000, 40000)), "hu_window"),
    (dict(label_interpolation="linear"), "label_interpolation"),
    (dict(image_interpolation="cubic"), "image_interpolation"),
    (dict(orientation="LPS"), "orientation"),
    (dict(dtype="float32"), "dtype"),
    (dict(scaling="zscore"), "scaling"),
    (dict(version=99), "spec.version"),
])
def test_invalid_specs_name_the_field(kwargs, name):
    with pytest.raises(ConfigError) as info:
        PreprocessSpec(**kwargs)
    assert str(info.value).startswith(name + ":")


def test_unknown_field_is_rejected():
    d = PreprocessSpec().to_dict()
    d["future_knob"] = 1
    with pytest.raises(ConfigError, match="future_knob"):
        PreprocessSpec.from_dict(d)


def test_scale_maps_window_to_unit_interval():
    spec = PreprocessSpec(hu_window=(-1000, 1000))
    np.testing.assert_allclose(spec.scale(np.array([-2000, -1000, 0, 1000, 3000])), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(spec.unscale(spec.scale(np.array([-500.0, 250.0]))), [-500, 250])
    assert PreprocessSpec(scaling="none").scale(7) == 7


def test_read_time_normalisations_values_hash_and_refusals():
    stored = PreprocessSpec(hu_window=(-1000, 1000))
    # a spec without a read-time normalisation keeps its JSON (and hash) of before
    assert "scaling_params" not in stored.to_dict()
    assert stored.with_normalization("stored") is stored
    abd = stored.with_normalization("abdomen")
    np.testing.assert_allclose(abd.scale(np.array([-1000.0, -175, 37.5, 250, 900])),
                               [0, 0, 0.5, 1, 1])
    assert abd.hu_per_unit == 425.0
    props = {"percentile_00_5": -90.0, "percentile_99_5": 310.0, "mean": 60.0, "std": 50.0}
    ct = stored.with_normalization("ct", props)
    np.testing.assert_allclose(ct.scale(np.array([-500.0, 60, 110, 400])), [-3.0, 0, 1, 5.0])
    np.testing.assert_allclose(ct.unscale(ct.scale(np.array([0.0, 200.0]))), [0, 200])
    hashes = {stored.hash, abd.hash, ct.hash}
    assert len(hashes) == 3
    for spec in (abd, ct):  # the derived spec travels (run dirs, exports) and comes back equal
        again = PreprocessSpec.from_json(spec.to_json())
        assert again == spec and again.hash == spec.hash
    with pytest.raises(ConfigError, match="^normalization:.*statistics"):
        stored.with_normalization("ct", None)
    with pytest.raises(ConfigError, match="^normalization:"):
        stored.with_normalization("zscore")
    # a read-time clip beyond what was stored is refused (those HU are gone)
    with pytest.raises(ConfigError, match="^scaling_params:.*stored window"):
        PreprocessSpec(hu_window=(-100, 100)).with_normalization("abdomen")
    with pytest.raises(ConfigError, match="^scaling_params:.*std"):
        stored.with_normalization("ct", dict(props, std=0.0))
    with pytest.raises(ConfigError, match="^scaling_params:"):
        PreprocessSpec(scaling="unit", scaling_params=(0, 1))


def test_tf_scaler_matches_the_spec_for_every_normalisation():
    import tensorflow as tf

    from rr_tf.data.pipeline import unit_scaler

    props = {"percentile_00_5": -90.0, "percentile_99_5": 310.0, "mean": 60.0, "std": 50.0}
    hu = np.array([-1024, -1000, -300, -175, 0, 37, 250, 600, 1000], np.int16)
    for spec in (PreprocessSpec(), PreprocessSpec(hu_window=(-500, 500)),
                 PreprocessSpec().with_normalization("abdomen"),
                 PreprocessSpec().with_normalization("ct", props)):
        want = spec.scale(np.clip(hu.astype(np.float32), -1000, None)
                          if spec.scaling == "unit" else hu.astype(np.float32))
        got = unit_scaler(spec)(tf.constant(hu)).numpy()
        np.testing.assert_allclose(got[1:], want[1:], atol=1e-6, err_msg=spec.describe())
