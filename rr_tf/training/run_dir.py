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

In a multi-worker run only the chief writes here; every other worker gets
:meth:`RunDir.for_worker`'s scratch copy, which writes the same files into
a temporary folder (removed when the process exits) and reads checkpoints,
read-only, from the chief's run directory, so a restarted job resumes on
every worker from the checkpoint the chief wrote.
"""

import atexit
import json
import os
import shutil
import tempfile

from rr_tf.errors import ConfigError
from rr_tf.runs import CHECKPOINTS_NAME, SPEC_NAME, STATE_NAME
from rr_tf.utils.files import atomic_write, atomic_write_json


class RunDir:
    """Paths and bookkeeping of one run directory (local file system)."""

    def __init__(self, path):
        self.path = os.path.abspath(str(path))
        self.flags = os.path.join(self.path, "flags.txt")
        self.spec = os.path.join(self.path, SPEC_NAME)
        self.state_path = os.path.join(self.path, STATE_NAME)
        self.checkpoints = os.path.join(self.path, CHECKPOINTS_NAME)
        self.tensorboard = os.path.join(self.path, "tensorboard")
        self.export = os.path.join(self.path, "export")
        self.metrics = os.path.join(self.path, "metrics.json")
        self.probe = os.path.join(self.path, "probe.json")
        self.is_chief = True
        self.chief = self                  # the run directory the chief writes
        self.resume_from = self.checkpoints  # where the checkpoint to resume from is read

    def for_worker(self, is_chief, task_index=0):
        """This run directory as one worker of a multi-worker run uses it:
        itself for the chief; for another worker a RunDir in a new temporary
        folder (removed at exit) that writes what the chief writes (TF's
        multi-worker rule: every worker saves, so collective reads stay in
        step, but only the chief's files are kept), checks against the
        chief's ``run.json`` and resumes from the chief's checkpoints."""
        if is_chief:
            return self
        scratch = RunDir(tempfile.mkdtemp(prefix=f"rr_tf-worker{task_index}-"))
        atexit.register(shutil.rmtree, scratch.path, True)
        scratch.is_chief, scratch.chief, scratch.resume_from = False, self, self.checkpoints
        return scratch

    def role_note(self):
        """'' for the chief; for another worker, where its files go."""
        if self.is_chief:
            return ""
        return f" (written by the chief; this worker's copies go to {self.path})"

    def state(self):
        """The run's ``run.json`` (the chief's, for any worker), or None."""
        return self.chief._own_state()

    def _own_state(self):
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
        if state is not None and overwrite and not self.is_chief:
            state = None  # the chief starts the run directory afresh
        elif state is not None and overwrite:
            for sub in (self.checkpoints, self.tensorboard, self.export):
                shutil.rmtree(sub, ignore_errors=True)
            for f in (self.state_path, self.metrics, self.probe):
                if os.path.exists(f):
                    os.remove(f)
            state = None
        if state is not None:
            if state["method"] != method:
                raise ConfigError("run_dir", f"{self.chief.path} holds a {state['method']!r} run, not "
                                  f"{method!r}; use another --run_dir or pass --overwrite")
            if state["spec_hash"] != spec.hash:
                raise ConfigError("run_dir", f"{self.chief.path} was trained on data with preprocessing "
                                  f"spec {state['spec_hash']}, this data has {spec.hash}; use another "
                                  "--run_dir or pass --overwrite")
            if state.get("finished") and train_steps <= state["last_step"]:
                raise ConfigError("run_dir", f"{self.chief.path} is a finished run of {state['last_step']} "
                                  "steps; pass --overwrite to start again or a larger --train_steps "
                                  "to continue it")
        os.makedirs(self.checkpoints, exist_ok=True)
        os.makedirs(self.tensorboard, exist_ok=True)
        atomic_write(self.spec, spec.to_json() + "\n")
        self.write_state(method=method, spec_hash=spec.hash, train_steps=train_steps,
                         last_step=(state or {}).get("last_step", 0), finished=False)
        return state is not None

    def write_state(self, **fields):
        state = dict(self._own_state() or {}, **fields)
        atomic_write_json(self.state_path, state)

    def write_json(self, name, value):
        """``name`` (a file in the run directory) holding ``value`` as JSON."""
        atomic_write_json(os.path.join(self.path, name), value)

    def write_flags(self, text):
        """The resolved flags (``flags.txt``), if any."""
        if text:
            atomic_write(self.flags, text)

    def write_metrics(self, metrics):
        atomic_write_json(self.metrics, metrics, sort_keys=True)
