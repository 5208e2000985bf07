"""Weight transfer by part and key (HPT and fine-tuning), and the launcher's
Config-derived hyper-parameter flags."""

import dataclasses

import numpy as np
import pytest

from rr_tf.errors import ConfigError
from rr_tf.models import UNet3D
from rr_tf.models.parts import CNNPyramid
from rr_tf.transfer import TransferReport, transfer, variables_by_key


def _unet(**kw):
    m = UNet3D(**dict(dict(base_width=2, levels=3), **kw))
    m.build((None, 16, 16, 16, 1))
    return m


def test_keys_do_not_depend_on_where_the_part_sits():
    a, b = _unet(), _unet(name="other_name")
    wrapped = CNNPyramid(_unet(encoder_only=True))
    assert set(variables_by_key(a)) == set(variables_by_key(b))
    enc_keys = set(variables_by_key(wrapped.transfer_parts()["unet"]))
    assert enc_keys and enc_keys < set(variables_by_key(a))
    assert all(k.startswith("enc") for k in enc_keys)


def test_encoder_into_full_unet_reports_decoder_missing():
    src = _unet(encoder_only=True)
    for v in src.weights:
        v.assign(np.random.default_rng(0).normal(size=v.shape).astype(v.dtype))
    dst = _unet()
    report = transfer({"unet": dst}, {"unet": src}, source="enc")
    src_keys = variables_by_key(src)
    assert sorted(report.matched) == sorted(f"unet/{k}" for k in src_keys)
    assert report.missing and all(k.split("/")[1][:3] in ("dec", "up2", "up1", "hea") for k in report.missing)
    assert not report.unexpected and not report.shape_mismatch
    dst_keys = variables_by_key(dst)
    for k, v in src_keys.items():
        np.testing.assert_array_equal(dst_keys[k].numpy(), v.numpy())
    assert "variables loaded from enc" in report.summary()


def test_shape_mismatch_is_reported_and_nothing_matching_is_refused():
    full, noskip = _unet(), _unet(skips=False)
    report = transfer({"unet": full}, {"unet": noskip})
    # the first unit after each skip concatenation has more input channels
    assert report.shape_mismatch and all("dec" in k for k in report.shape_mismatch)
    assert any(k.startswith("unet/enc") for k in report.matched)
    with pytest.raises(ConfigError, match="no variable matches"):
        transfer({"unet": _unet(base_width=3, encoder_only=True)}, {"unet": _unet(encoder_only=True)})
    with pytest.raises(ConfigError, match="no variable matches"):
        transfer({"vit": _unet()}, {"unet": _unet()})
    with pytest.raises(ConfigError, match="has no part"):
        transfer({"unet": _unet()}, {"unet": _unet()}, parts=["hybrid"])


def test_report_round_trips_json(tmp_path):
    r = TransferReport(source="s", matched=["a/b"], missing=["c"])
    r.save(str(tmp_path / "r.json"))
    import json

    assert json.load(open(tmp_path / "r.json"))["matched"] == ["a/b"]


# ------------------------------------------------------------ Config flags
def test_config_flags_defaults_per_method_and_foreign_flags_refused():
    from absl import flags

    from launch import flagutil
    from rr_tf.methods.base import param

    @dataclasses.dataclass
    class A:
        tau: float = param(0.2, "temperature", low=0.0)
        mode: str = param("x", "mode", choices=("x", "y"))
        size: tuple = param((4, 4), "size", low=1)

    @dataclasses.dataclass
    class B:
        tau: float = param(0.1, "temperature", low=0.0)
        only_b: int = param(3, "b's own", low=1)

    fv = flags.FlagValues()
    saved = flags.FLAGS
    try:
        flags.FLAGS = fv  # define into a private registry
        import absl.flags._defines as d  # noqa: F401
        owners = _define(flagutil, fv, {"a": A, "b": B})
        fv(["prog", "--tau=0.5", "--size=2,3"])
        assert "default a=0.2, b=0.1" in fv["tau"].help
        cfg = _config(flagutil, fv, "a", A, owners)
        assert cfg == A(tau=0.5, mode="x", size=(2, 3))
        with pytest.raises(ValueError, match="--size is not a parameter of b"):
            _config(flagutil, fv, "b", B, owners)
        with pytest.raises(flags.IllegalFlagValueError):
            fv["mode"].parse("z")
    finally:
        flags.FLAGS = saved


def _define(flagutil, fv, configs):
    orig = flagutil.flags
    flagutil.flags = _Proxy(orig, fv)
    try:
        return flagutil.define_config_flags(configs)
    finally:
        flagutil.flags = orig


def _config(flagutil, fv, owner, cls, owners):
    orig = flagutil.flags
    flagutil.flags = _Proxy(orig, fv)
    try:
        return flagutil.config_from_flags(owner, cls, owners)
    finally:
        flagutil.flags = orig


class _Proxy:
    """absl's module with ``FLAGS`` and the DEFINE_* functions bound to ``fv``."""

    def __init__(self, module, fv):
        self._m, self.FLAGS = module, fv

    def __getattr__(self, name):
        attr = getattr(self._m, name)
        if name.startswith("DEFINE_"):
            return lambda *a, **k: attr(*a, flag_values=self.FLAGS, **k)
        if name == "register_validator":
            return lambda *a, **k: attr(*a, flag_values=self.FLAGS, **k)
        return attr
