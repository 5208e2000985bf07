import pytest
import tensorflow as tf

from rr_tf.errors import ConfigError
from rr_tf.training import strategy as st


def test_default_strategy_and_jit_auto_is_off_on_cpu():
    s = st.make_strategy("default")
    assert s.num_replicas_in_sync == 1
    assert st.resolve_jit_compile("auto", s) is False
    assert st.resolve_jit_compile("true", s) is True
    assert st.resolve_jit_compile("false", s) is False


def test_jit_auto_is_off_under_mirrored():
    assert st.resolve_jit_compile("auto", tf.distribute.MirroredStrategy(["/cpu:0"])) is False


@pytest.mark.parametrize("name,match", [
    ("tpu", "strategy: tpu: no TPU could be reached"),
    ("horovod", "strategy: must be one of"),
])
def test_unavailable_strategies_fail_with_one_line(name, match):
    with pytest.raises(ConfigError, match=match) as info:
        st.make_strategy(name)
    assert "\n" not in str(info.value)


def test_multi_worker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        st.make_strategy("multi_worker")


def test_bad_modes():
    with pytest.raises(ConfigError, match="jit_compile"):
        st.resolve_jit_compile("maybe", tf.distribute.get_strategy())
    with pytest.raises(ConfigError, match="mixed_precision"):
        st.set_precision("int8")
