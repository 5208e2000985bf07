"""The run directory: one folder per training run, resumable.

    RUN_DIR/
      flags.txt         resolved flags (a flagfile that reproduces the run)
      preprocess.json   the spec of the data the run was trained on
      run.json          method, spec hash, target steps, last step, finished
      checkpoints/      tf.train.Checkpoint files (model, optimizer, step, EMA, queue)
      tensorboard/      scalars, images, hyper-parameters
      export/           .keras files and SavedModels
      metrics.json      final numbers
      probe.json        frozen-feature probe results, one per probe (rr_tf.training.probe)

Re-running the same command on an existing RUN_DIR resumes from the last
checkpoint. A finished run is refused unless ``overwrite`` or a larger
``train_steps`` is given; a run made with another method or another
preprocessing spec is refused.
"""

import json
import os
import shutil

from rr_tf.errors import ConfigError

STATE_NAME = "run.json"


def _atomic_write(path, text):
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class RunDir:
    """Paths and bookkeeping of one run directory (local file system)."""

    def __init__(self, path):
        self.path = os.path.abspath(str(path))
        self.flags = os.path.join(self.path, "flags.txt")
        self.spec = os.path.join(self.path, "preprocess.json")
        self.state_path = os.path.join(self.path, STATE_NAME)
        self.checkpoints = os.path.join(self.path, "checkpoints")
        self.tensorboard = os.path.join(self.path, "tensorboard")
        self.export = os.path.join(self.path, "export")
        self.metrics = os.path.join(self.path, "metrics.json")
        self.probe = os.path.join(self.path, "probe.json")

    def state(self):
        if not os.path.exists(self.state_path):
            return None
        with open(self.state_path) as f:
            return json.load(f)

    def prepare(self, method, spec, train_steps, overwrite=False):
        """Creates or re-opens the run directory before any heavy work.

        Returns True when an earlier run is continued (checkpoints may exist).
        Raises ConfigError naming ``run_dir`` when it cannot be used.
        """
        state = self.state()
        if state is not None and overwrite:
            for sub in (self.checkpoints, self.tensorboard, self.export):
                shutil.rmtree(sub, ignore_errors=True)
            for f in (self.state_path, self.metrics, self.probe):
                if os.path.exists(f):
                    os.remove(f)
            state = None
        if state is not None:
            if state["method"] != method:
                raise ConfigError("run_dir", f"{self.path} holds a {state['method']!r} run, not "
                                  f"{method!r}; use another --run_dir or pass --overwrite")
            if state["spec_hash"] != spec.hash:
                raise ConfigError("run_dir", f"{self.path} was trained on data with preprocessing "
                                  f"spec {state['spec_hash']}, this data has {spec.hash}; use another "
                                  "--run_dir or pass --overwrite")
            if state.get("finished") and train_steps <= state["last_step"]:
                raise ConfigError("run_dir", f"{self.path} is a finished run of {state['last_step']} "
                                  "steps; pass --overwrite to start again or a larger --train_steps "
                                  "to continue it")
        os.makedirs(self.checkpoints, exist_ok=True)
        os.makedirs(self.tensorboard, exist_ok=True)
        _atomic_write(self.spec, spec.to_json() + "\n")
        self.write_state(method=method, spec_hash=spec.hash, train_steps=train_steps,
                         last_step=(state or {}).get("last_step", 0), finished=False)
        return state is not None

    def write_state(self, **fields):
        state = dict(self.state() or {}, **fields)
        _atomic_write(self.state_path, json.dumps(state, indent=1) + "\n")

    def write_json(self, name, value):
        """``name`` (a file in the run directory) holding ``value`` as JSON."""
        _atomic_write(os.path.join(self.path, name), json.dumps(value, indent=1) + "\n")

    def write_flags(self, text):
        """The resolved flags (``flags.txt``), if any."""
        if text:
            _atomic_write(self.flags, text)

    def write_metrics(self, metrics):
        _atomic_write(self.metrics, json.dumps(metrics, indent=1, sort_keys=True) + "\n")
