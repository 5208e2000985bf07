"""What every training run (pre-training and fine-tuning) is configured by:
schedule, distribution, precision, checkpoints, logging, export. The run
kinds' configs (``PretrainConfig``, ``FinetuneConfig``) extend it."""

import dataclasses

from rr_tf.errors import ConfigError
from rr_tf.optim import OPTIMIZERS  # noqa: F401  (launch/flagutil reads it here)

VERBOSITY = {"bar": 1, "line": 2, "none": 0}  # console progress -> Keras verbose
SHARD_CHECKS = ("size", "sha256")  # how shards are checked against the manifest before reading

# where fine-tuning's defaults differ from pre-training's (FinetuneConfig and
# launch/finetune.py's flags both read them)
FINETUNE_DEFAULTS = dict(batch_size=2, crops_per_volume=2, weight_decay=1e-5, keep_checkpoints=2)


@dataclasses.dataclass(kw_only=True)
class RunSettings:
    train_steps: int = 1000
    batch_size: int = 4                  # global (split across replicas)
    crop_size: tuple = (64, 64, 32)
    crops_per_volume: int = 4            # crops cut from each decoded volume
    optimizer: str = "adamw"
    learning_rate: float = 1e-3          # peak, cosine decay after warm-up
    weight_decay: float = 0.05
    warmup_steps: int = 0
    strategy: str = "default"            # default | mirrored | multi_worker | tpu
    tpu: str = ""
    jit_compile: str = "auto"
    mixed_precision: str = "none"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    image_every: int = 100
    verbose: int = 1
    export: bool = True
    seed: int = 0
    overwrite: bool = False
    verify_shards: str = "size"          # size | sha256: shard check against the manifest
    skip_corrupt_shards: bool = False    # leave a damaged shard out (warning) instead of stopping
    flags_text: str = ""                 # the resolved flags, written to the run's flags.txt

    def start(self, run):
        """What every run does before building its model: records the flags
        in ``run``, sets the precision policy, makes the strategy, resolves
        jit_compile, reads the step to resume from and seeds Keras.
        In a multi-worker run the chief reads that step from the run
        directory and every worker takes the chief's (which also waits for
        all of them to be there). Returns ``(strategy, jit_compile,
        resume_step)``."""
        import keras

        from rr_tf.training import loop, strategy as st

        run.write_flags(self.flags_text)
        st.set_precision(self.mixed_precision)
        strategy = st.make_strategy(self.strategy, self.tpu)
        jit = st.resolve_jit_compile(self.jit_compile, strategy)
        step0 = st.from_chief(strategy, loop.latest_step(run.checkpoints) if run.is_chief else 0)
        keras.utils.set_random_seed(self.seed)
        return strategy, jit, step0

    def build_optimizer(self):
        """The run's optimizer and schedule (:func:`rr_tf.optim.build_optimizer`)."""
        from rr_tf.optim import build_optimizer

        return build_optimizer(self.optimizer, self.learning_rate, self.train_steps,
                               self.weight_decay, self.warmup_steps,
                               mixed_precision=self.mixed_precision)

    def train_config(self):
        """The training loop's settings of the run (checkpoints, logging)."""
        from rr_tf.training import loop

        return loop.TrainConfig(train_steps=self.train_steps,
                                checkpoint_every=self.checkpoint_every,
                                keep_checkpoints=self.keep_checkpoints,
                                log_every=self.log_every, image_every=self.image_every,
                                global_batch_size=self.batch_size, verbose=self.verbose)

    def run_dir_of_this_worker(self):
        """The RunDir of ``run_dir`` this process writes: the run directory
        itself, or in a multi-worker run for a worker other than the chief a
        temporary stand-in (:meth:`RunDir.for_worker`)."""
        from rr_tf.training import strategy as st
        from rr_tf.training.run_dir import RunDir

        _, index, chief = st.worker_role(self.strategy)
        return RunDir(self.run_dir).for_worker(chief, index)

    def stream_checks(self):
        """The StreamConfig fields of the shard checks (every stream of the run)."""
        return dict(verify=self.verify_shards, skip_corrupt=self.skip_corrupt_shards)

    def validate_run(self):
        if self.verify_shards not in SHARD_CHECKS:
            raise ConfigError("verify_shards", f"must be one of {SHARD_CHECKS}, got "
                              f"{self.verify_shards!r}")
        if len(self.crop_size) != 3 or min(self.crop_size) < 1:
            raise ConfigError("crop_size", f"need three positive sizes, got {self.crop_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.warmup_steps and self.warmup_steps >= self.train_steps:
            raise ConfigError("warmup_steps", f"({self.warmup_steps}) must be smaller than "
                              f"train_steps ({self.train_steps})")
        if self.optimizer == "nnunet_sgd" and self.warmup_steps:
            raise ConfigError("warmup_steps", "nnunet_sgd uses nnU-Net's polynomial decay from the "
                              "first step; set --warmup_steps=0")


def run_defaults(overrides=None):
    """{field: default} of :class:`RunSettings`, with ``overrides``."""
    return dict({f.name: f.default for f in dataclasses.fields(RunSettings)}, **(overrides or {}))
