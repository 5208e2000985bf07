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
