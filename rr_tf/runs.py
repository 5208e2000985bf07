"""Reading a finished run: its state (``run.json``), its spec
(``preprocess.json``) and its transferable parts, whatever the source is
(a pre-training run directory, an export directory with ``parts.json`` or
one exported ``.keras`` file). Pre-training (HPT, ``--init_from``),
fine-tuning (``--pretrained``) and export all read runs through here;
:mod:`rr_tf.transfer` then matches the parts' weights.

The run directory's layout and its writing are ``rr_tf.training.run_dir``'s;
the file names both sides use are defined here, below them both.
"""

import json
import os

from rr_tf.errors import ConfigError

STATE_NAME = "run.json"          # method, spec hash, steps, the run's settings
SPEC_NAME = "preprocess.json"    # the preprocessing spec the run was trained on
PARTS_NAME = "parts.json"        # an export directory's index of its parts
CHECKPOINTS_NAME = "checkpoints"


def read_state(path):
    """The ``run.json`` of run directory ``path`` (a dict), or None."""
    state = os.path.join(path, STATE_NAME)
    if not (os.path.isdir(path) and os.path.exists(state)):
        return None
    with open(state) as f:
        return json.load(f)


def source_method(path):
    """The pre-training method name of a run directory (None for exports)."""
    return (read_state(path) or {}).get("method")


def read_spec(path):
    """The PreprocessSpec in file ``path``, or None if there is none."""
    from rr_tf.data.spec import PreprocessSpec

    if not os.path.exists(path):
        return None
    with open(path) as f:
        return PreprocessSpec.from_json(f.read())


def load_trained(run_dir):
    """Rebuilds the method of a pre-training run directory and restores its
    newest checkpoint (for export, HPT or fine-tuning). Returns (method, spec)."""
    from rr_tf.checkpoints import restore_weights
    from rr_tf.methods import get_method  # methods use this module for HPT (lazy both ways)
    from rr_tf.optim import build_optimizer

    path = os.path.abspath(str(run_dir))
    state = read_state(path)
    if state is None or "method_config" not in state:
        raise ConfigError("run_dir", f"{path} is not a pre-training run directory")
    spec = read_spec(os.path.join(path, SPEC_NAME))
    if spec is None:
        raise ConfigError("run_dir", f"{os.path.join(path, SPEC_NAME)} is missing")
    cls = get_method(state["method"])
    method = cls(cls.Config(**state["method_config"]), seed=state.get("seed", 0))
    method.compile(optimizer=build_optimizer("adamw", 1e-3, 2), jit_compile=False)
    method.build_for(cls.example_batch(tuple(state["crop_size"])))
    checkpoints = os.path.join(path, CHECKPOINTS_NAME)
    if not restore_weights(method, checkpoints):
        raise ConfigError("run_dir", f"{checkpoints} holds no checkpoint yet")
    return method, spec


def source_parts(path, flag="init_from"):
    """(parts dict, spec or None) of a pre-training run directory, an export
    directory (``parts.json``), or one exported ``.keras`` file; ConfigError
    naming ``flag`` when ``path`` is none of them."""
    import keras

    import rr_tf.models  # noqa: F401  (registers the classes)
    import rr_tf.models.parts  # noqa: F401

    if read_state(path) is not None:
        method, spec = load_trained(path)
        return method.transfer_parts(), spec
    if os.path.isdir(path) and os.path.exists(os.path.join(path, PARTS_NAME)):
        with open(os.path.join(path, PARTS_NAME)) as f:
            info = json.load(f)
        parts = {}
        for name, entry in info.items():
            if isinstance(entry, dict) and "keras" in entry:
                parts.update(_parts_of(keras.saving.load_model(os.path.join(path, entry["keras"]))))
        return parts, read_spec(os.path.join(path, SPEC_NAME))
    if os.path.isfile(path) and path.endswith(".keras"):
        return (_parts_of(keras.saving.load_model(path)),
                read_spec(os.path.join(os.path.dirname(path), SPEC_NAME)))
    raise ConfigError(flag, f"{path}: not a pre-training run directory ({STATE_NAME}), an "
                      f"export directory ({PARTS_NAME}) or a .keras file")


def _parts_of(model):
    if hasattr(model, "transfer_parts"):
        return model.transfer_parts()
    return {model.name: model}
