"""One pre-training run, from shards to checkpoints, TensorBoard and export
(the engine of ``launch/pretrain.py``; takes a config object, reads no flags)."""

import dataclasses
import os
import sys


from rr_tf.data import records
from rr_tf.data.pipeline import StreamConfig, pair_view_dataset, shard_errors_named, view_dataset
from rr_tf.errors import ConfigError
from rr_tf.methods import get_method
from rr_tf.training import loop
from rr_tf.training.probe import DEFAULT_EVERY, LinearProbe, ProbeCallback, ProbeConfig
from rr_tf.training.settings import RunSettings

_DATA_RESEED = 1_000_003  # data seed = seed + _DATA_RESEED * resumed step


@dataclasses.dataclass
class PretrainConfig(RunSettings):
    """A pre-training run: the method, its Config and the shared
    :class:`~rr_tf.training.settings.RunSettings`."""
    method: str
    data_dir: str
    run_dir: str
    method_config: object = None
    pairing: str = "views"       # "views" | "patient" (MICLe: views from two scans of a patient)
    init_from: str | None = None
    probe_every: int = DEFAULT_EVERY  # frozen-feature probe every N steps (0 = off)
    probe_patches: int = 8            # labelled patches it fits on (and as many it scores on)

    def probe_config(self):
        return ProbeConfig(every=self.probe_every, patches=self.probe_patches, seed=self.seed)

    def validate(self):
        self.validate_run()
        self.probe_config().validate()
        if self.pairing not in ("views", "patient"):
            raise ConfigError("pairing", f"must be 'views' or 'patient', got {self.pairing!r}")
        if self.init_from and not os.path.exists(self.init_from):
            raise ConfigError("init_from", f"{self.init_from} does not exist")


def micle_summary(manifest):
    """One line: how many training patients have two or more scans."""
    import collections

    count = collections.Counter(c["patient_id"] for c in manifest["cases"] if c["split"] == "train")
    multi = sum(1 for n in count.values() if n > 1)
    line = (f"MICLe pairing: {multi} of {len(count)} training patients have two or more scans "
            "(their views come from two different scans)")
    if not multi:
        line += "; none do, so every pair is two views of one scan (plain two-view pairing)"
    return line


def make_probe(config, run, log):
    """The frozen-feature probe callback of a run, or None (off, too few
    labelled cases, or a run shorter than one probe interval: one line)."""
    if not config.probe_every:
        return None
    if config.probe_every > config.train_steps:
        log(f"probe: off (--probe_every={config.probe_every} > --train_steps={config.train_steps})")
        return None
    probe = LinearProbe.from_data(config.data_dir, config.crop_size, config.probe_config(), log)
    if probe is None:
        return None
    return ProbeCallback(probe, config.probe_every, os.path.join(run.tensorboard, "probe"),
                         run.probe, log)


@shard_errors_named()
def run_pretraining(config, log=None):
    """Runs (or resumes) a pre-training; returns the final metrics dict."""
    log = log or (lambda m: print(m, file=sys.stderr))
    config.validate()
    manifest = records.read_manifest(config.data_dir)
    spec = manifest["spec_obj"]
    records.check_crop_fits(manifest, config.crop_size)
    cls = get_method(config.method)
    method_config = config.method_config or cls.Config()
    cls.check_config(method_config, config)
    run = config.run_dir_of_this_worker()
    resumed = run.prepare(config.method, spec, config.train_steps, config.overwrite)
    run.write_state(method_config=dataclasses.asdict(method_config),
                    crop_size=list(config.crop_size), seed=config.seed)
    strategy, jit, step0 = config.start(run)
    log(f"{config.method}: {'resuming at step ' + str(step0) if resumed and step0 else 'new run'} in "
        f"{run.chief.path}{run.role_note()}; {strategy.num_replicas_in_sync} replica(s), "
        f"jit_compile={jit}, "
        f"data {config.data_dir} ({spec.describe()})")
    stream = StreamConfig(batch_size=config.batch_size, crops_per_volume=config.crops_per_volume,
                          seed=config.seed + _DATA_RESEED * step0, **config.stream_checks())
    if config.pairing == "patient":
        pair_fn = cls.pair_recipe(method_config, tuple(config.crop_size))
        log(micle_summary(manifest))
        dataset, _ = pair_view_dataset(config.data_dir, "train", pair_fn, stream)
    else:
        recipe = cls.recipe(method_config, tuple(config.crop_size))
        dataset, _ = view_dataset(config.data_dir, "train", recipe, stream)
    preview = next(iter(dataset))
    with strategy.scope():
        method = cls(method_config, seed=config.seed)
        method.compile(optimizer=config.build_optimizer(), jit_compile=jit)
        method.build_for(preview)
        if config.init_from and step0 == 0:
            report = method.init_from(config.init_from)
            report.save(os.path.join(run.path, "init_from.json"))
            log(f"init_from: {report.summary()}; details in {run.path}/init_from.json")
    probe = make_probe(config, run, log)
    hparams = dict(dataclasses.asdict(method_config), method=config.method,
                   batch_size=config.batch_size, crop_size=str(config.crop_size), pairing=config.pairing,
                   learning_rate=config.learning_rate, optimizer=config.optimizer,
                   spec_hash=spec.hash)
    result = loop.train(method, dataset, run,
                        config.train_config(),
                        preview_batch=preview, hparams=hparams,
                        callbacks=[probe] if probe else None)
    metrics = dict(result["metrics"], step=result["step"], spec_hash=spec.hash, method=config.method)
    metrics.update(probe.last() if probe else {})
    run.write_metrics(metrics)
    if config.export:
        from rr_tf.export import export_method

        paths = export_method(method, run.export, spec, sample=preview)
        log(f"exported: {', '.join(sorted(paths))} -> {run.export}")
    return metrics
