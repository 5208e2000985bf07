"""Flag parsing helpers shared by the launch/ scripts (never imported by rr_tf/)."""

import os
import re
import sys

from absl import flags

# TensorFlow 2.21's C++ code logs through absl before absl::InitializeLog() is
# ever called, which ignores TF_CPP_MIN_LOG_LEVEL: these lines appear on every
# console unless they are taken out of the process's stderr (file descriptor 2)
_NATIVE_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] "   # C++ INFO and WARNING lines
    r"|E\d{4} [\d:.]+ +\d+ \S+:\d+\] oneDNN supports \S+ only on platforms "
    r"with AVX-512"
    r"|To enable the following instructions: .*rebuild TensorFlow")
_QUIET_MARK = "RR_TF_QUIET_TF"  # set when the log level below is rr_tf's choice, not the user's


def quiet_tensorflow(caller=None):
    """Quiets TensorFlow unless the user set TF_CPP_MIN_LOG_LEVEL (any value
    brings everything back): TF_CPP_MIN_LOG_LEVEL=2, absl INFO lines (e.g.
    one per checkpoint save) hidden, and, when ``caller`` is ``"__main__"``
    (a launcher run as a script), the C++ INFO/WARNING lines TensorFlow
    prints regardless of that variable (``I0000 ... oneDNN custom operations
    are on``, ``E0000 ... oneDNN supports DT_INT64 only on platforms with
    AVX-512``, absl's ``WARNING: All log messages before
    absl::InitializeLog()``) are filtered out of the process's stderr
    (:func:`filter_native_stderr`). Call before TensorFlow is imported."""
    user_set = "TF_CPP_MIN_LOG_LEVEL" in os.environ and os.environ.get(_QUIET_MARK) != "1"
    if not user_set:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ[_QUIET_MARK] = "1"
        if caller == "__main__":
            filter_native_stderr()
    from absl import logging

    logging.set_verbosity(logging.WARNING)


def filter_native_stderr():
    """Routes file descriptor 2 (what C++ code and child processes write to)
    through a forked filter process that drops the lines of
    ``_NATIVE_NOISE`` and passes everything else on unchanged; Python's own
    ``sys.stderr`` keeps writing to the real stderr directly, so no error
    line of rr_tf's can be lost. The filter ignores Ctrl-C and exits when
    the last writer (this process and its children) is gone, so it also
    forwards what a crashing process wrote last. Must run before any thread
    is started (before TensorFlow is imported)."""
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read_end, write_end = os.pipe()
        pid = os.fork()
    except OSError:
        return
    if pid == 0:  # the filter
        try:
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.dup2(real, 2)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)  # hold none of the launcher's other files (e.g. a stdout pipe)
            os.dup2(null, 1)
            os.closerange(3, min(real, read_end))
            os.closerange(max(real, read_end) + 1, 1 << 16)
            for fd in range(min(real, read_end) + 1, max(real, read_end)):
                try:
                    os.close(fd)
                except OSError:
                    pass
            _copy_filtered(read_end, real)
        finally:
            os._exit(0)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = os.fdopen(real, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None),
                           errors="backslashreplace")


def _copy_filtered(src, dst, linger=0.1):
    """Copies ``src`` to ``dst`` line by line (\n or \r ends a line) without
    the noise lines; a partial line is passed on after ``linger`` seconds
    without more data (progress text), as native log lines arrive whole."""
    import select

    pending = b""
    while True:
        if pending:
            ready, _, _ = select.select([src], [], [], linger)
            if not ready:
                _write_all(dst, pending)
                pending = b""
                continue
        try:
            chunk = os.read(src, 1 << 16)
        except InterruptedError:
            continue
        if not chunk:
            break
        parts = re.split(rb"(?<=[\r\n])", pending + chunk)
        pending = parts.pop()
        kept = b"".join(p for p in parts
                        if not _NATIVE_NOISE.match(p.decode("utf-8", "replace")))
        if kept:
            _write_all(dst, kept)
    if pending and not _NATIVE_NOISE.match(pending.decode("utf-8", "replace")):
        _write_all(dst, pending)


def _write_all(fd, data):
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # the reader of our stderr is gone: nothing left to do
        pass


def parse_numbers(text, count, cast=float, name="value"):
    """'1.5,1.5,2' -> (1.5, 1.5, 2.0); raises ValueError naming the flag."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if len(parts) != count:
        raise ValueError(f"--{name} needs {count} comma-separated numbers, got {text!r}")
    try:
        return tuple(cast(p) for p in parts)
    except ValueError:
        raise ValueError(f"--{name} needs {count} comma-separated numbers, got {text!r}") from None


def register_numbers_validator(name, count, cast=float, positive=False, allow=()):
    """Validates a comma-separated list flag at parse time (one clear line)."""

    def check(value):
        if value is None or value in allow:
            return True
        try:
            nums = parse_numbers(value, count, cast, name)
        except ValueError as err:
            raise flags.ValidationError(str(err))
        if positive and not all(n > 0 for n in nums):
            raise flags.ValidationError(f"--{name} values must be > 0, got {value!r}")
        return True

    flags.register_validator(name, check)


def define_phantom_flags():
    """--prepare_phantom_if_missing / --phantom_spacing / --phantom_seed of
    the training launchers (their demos generate the embedded data)."""
    flags.DEFINE_integer("prepare_phantom_if_missing", 0, "If --data_dir holds no manifest, first "
                         "generate this many phantom cases there (0 = fail instead).",
                         lower_bound=0)
    flags.DEFINE_string("phantom_spacing", "3,3,3", "Spacing (mm) of phantoms made by "
                        "--prepare_phantom_if_missing.")
    flags.DEFINE_integer("phantom_seed", 0, "Data seed of phantoms made by "
                         "--prepare_phantom_if_missing (cases and train/val split).")
    register_numbers_validator("phantom_spacing", 3, positive=True)


def ensure_phantom_data(data_dir):
    """Nothing when ``data_dir`` holds a manifest; else generates the
    phantom shards of --prepare_phantom_if_missing there, or raises
    ValueError naming --data_dir."""
    from rr_tf.data import records

    if os.path.exists(records.manifest_path(data_dir)):
        return
    count = flags.FLAGS.prepare_phantom_if_missing
    if not count:
        raise ValueError(f"--data_dir={data_dir}: no manifest.json here; run "
                         "launch/prepare_data.py first (or pass --prepare_phantom_if_missing=N)")
    from rr_tf.data.prepare import PrepareConfig, prepare
    from rr_tf.data.spec import PreprocessSpec

    spacing = parse_numbers(flags.FLAGS.phantom_spacing, 3)
    print(f"{data_dir}: no data yet; generating {count} phantom cases first "
          f"({spacing[0]:g}x{spacing[1]:g}x{spacing[2]:g} mm)", file=sys.stderr)
    result = prepare(PrepareConfig(source="phantom", output_dir=data_dir, num_cases=count,
                                   seed=flags.FLAGS.phantom_seed,
                                   spec=PreprocessSpec(spacing=spacing)))
    if not result.ok:
        raise ValueError(f"--data_dir={data_dir}: phantom generation failed")


def fail(script, message, code=2):
    """Prints one line ``script: error: message`` to stderr and exits."""
    print(f"{os.path.basename(script)}: error: {message}", file=sys.stderr)
    sys.exit(code)


# the exit-status contract of every launcher (README, "Bad input")
EXIT_OK, EXIT_BAD_CASES, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 130
_FS_WORDS = re.compile(r"director|file|No such|Read-only|space|permission|not permitted", re.I)


def environment_error(err):
    """One line (path and reason) for an error of the file system around a
    run: an OSError (read-only or full folder, a file where a folder is
    expected) or TensorFlow's file-system errors (tf.io.gfile); None for
    anything else (a defect, which keeps its traceback)."""
    if isinstance(err, OSError):
        reason = err.strerror or type(err).__name__
        paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
        return f"{' -> '.join(paths)}: {reason}" if paths else f"{reason} ({err})"
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(err, tf.errors.OpError):
        return None
    always = (tf.errors.PermissionDeniedError, tf.errors.ResourceExhaustedError,
              tf.errors.AlreadyExistsError)
    maybe = (tf.errors.NotFoundError, tf.errors.FailedPreconditionError)
    text = (err.message or str(err)).strip().splitlines()[0] if (err.message or str(err)) else ""
    if isinstance(err, always) or (isinstance(err, maybe) and _FS_WORDS.search(text)):
        return f"{text} ({type(err).__name__})"
    return None


_HELP_FLAGS = ("help", "helpfull", "helpshort", "helpxml", "?")
TRAIN_INTERRUPTED = ("interrupted (Ctrl-C); the last checkpoint is kept and the same command "
                     "resumes from it")


def main(script, main_fn, interrupted="interrupted (Ctrl-C)"):
    """``absl.app.run(main_fn)`` under the launchers' exit-status contract:
    0 success; 1 = bad input cases reported (the launcher exits 1 itself);
    2 = invalid flags (absl's own parsing and validators included, one line
    instead of absl's "FATAL Flags parsing error" with status 1) or a
    problem that stops the whole run, such as an unwritable, full or
    misplaced output folder (one line naming the path, no traceback); 130 =
    interrupted (Ctrl-C), one line ``interrupted``: what was written before
    stays (checkpoints; data sets are only published complete)."""
    from absl import app

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as err:
            fail(script, " ".join(str(err).split()), EXIT_STOPPED)
        except SystemExit as done:  # absl's --help/--helpfull print and exit 1: asked for, so 0
            asked = any(a.split("=")[0].lstrip("-") in _HELP_FLAGS for a in argv[1:])
            if done.code == 1 and asked:
                sys.exit(EXIT_OK)
            raise

    def run(argv):
        try:
            return main_fn(argv)
        except KeyboardInterrupt:
            fail(script, interrupted, EXIT_INTERRUPTED)
        except Exception as err:  # noqa: BLE001  (re-raised unless a known environment error)
            line = environment_error(err)
            if line is None:
                raise
            fail(script, line, EXIT_STOPPED)

    app.run(run, flags_parser=parse)


def define_memory_flag():
    """``--memory_limit_gb`` of the launchers that train or segment."""
    flags.DEFINE_float("memory_limit_gb", 0.0, "Stop with one line when this process's resident "
                       "memory passes this many GiB (0 = what it held plus what was available "
                       "at start, less 5 %; the kernel would otherwise kill it without a "
                       "message). Host memory only: GPU/TPU memory errors are reported by "
                       "TensorFlow.", lower_bound=0.0)


def guard_memory(script, hint):
    """Starts the memory guard of ``--memory_limit_gb`` (see
    rr_tf.utils.memory): past the limit the process prints one line naming
    its peak, the limit and ``hint`` (the flags that reduce memory) and
    exits 2. Returns the guard (None when the limit cannot be known)."""
    from rr_tf.utils import memory

    limit = flags.FLAGS.memory_limit_gb * memory.GIB if flags.FLAGS.memory_limit_gb else \
        memory.default_limit()
    if not limit:
        return None
    origin = "--memory_limit_gb" if flags.FLAGS.memory_limit_gb else \
        "what was free at start; --memory_limit_gb sets it"
    return memory.MemoryGuard(limit, memory.exit_over_limit(script, hint, EXIT_STOPPED,
                                                            origin)).start()


TRAINING_MEMORY_HINT = "lower --batch_size, --crop_size or --base_width"


def run_job(script, job, memory_hint=TRAINING_MEMORY_HINT):
    """Runs a training launcher's ``job()`` and exits: 0 when it returns, 1
    with one line when the run diverged (the last good checkpoint is kept),
    2 with one line on bad input or configuration (no traceback), or when
    the process outgrows ``--memory_limit_gb`` (if the launcher defines it;
    the line names ``memory_hint``)."""
    from rr_tf.errors import RrTfError

    if "memory_limit_gb" in flags.FLAGS:
        guard_memory(script, memory_hint)
    try:
        job()
    except (RrTfError, ValueError) as err:
        # the training loop (and TensorFlow) are only imported once the job got that far
        loop = sys.modules.get("rr_tf.training.loop")
        fail(script, str(err), code=1 if loop and isinstance(err, loop.TrainingDiverged) else 2)
    sys.exit(0)


def define_config_flags(configs, module_name=None):
    """One flag per field of the given Config dataclasses ({owner name:
    Config class}), named like the field, default None (= the owner's own
    default, shown in the help), validated from the field's ``param``
    metadata. A field shared by several owners must have one type. Returns
    {flag name: {owner: default}}."""
    import dataclasses

    owners = {}
    fields = {}
    for owner, cls in configs.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            owners.setdefault(f.name, {})[owner] = default
            if f.name in fields and type(fields[f.name][1]) is not type(default):
                raise TypeError(f"Config field {f.name!r} has type {type(default).__name__} in "
                                f"{owner} but {type(fields[f.name][1]).__name__} elsewhere")
            fields.setdefault(f.name, (f, default))
    for name, (f, default) in fields.items():
        meta = dict(f.metadata)
        defaults = ", ".join(f"{o}={_show(v)}" for o, v in owners[name].items())
        help_text = f"{meta.get('help', name)} [default {defaults}]"
        choices = meta.get("choices")
        kwargs = {"module_name": module_name} if module_name else {}
        if choices:
            flags.DEFINE_enum(name, None, list(choices), help_text, **kwargs)
        elif isinstance(default, bool):
            flags.DEFINE_boolean(name, None, help_text, **kwargs)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, None, help_text, lower_bound=meta.get("low"),
                                 upper_bound=meta.get("high"), **kwargs)
        elif isinstance(default, float):
            flags.DEFINE_float(name, None, help_text, lower_bound=meta.get("low"),
                               upper_bound=meta.get("high"), **kwargs)
        elif isinstance(default, tuple):
            flags.DEFINE_string(name, None, help_text + " (comma-separated)", **kwargs)
            cast = type(default[0]) if default else float
            register_numbers_validator(name, len(default), cast=cast,
                                       positive=(meta.get("low") or 0) > 0)
        else:
            flags.DEFINE_string(name, None, help_text, **kwargs)
    return owners


def config_from_flags(owner, cls, owners):
    """``cls`` with every field whose flag was given; a given flag that
    ``owner`` does not have raises ValueError naming it."""
    import dataclasses

    FLAGS = flags.FLAGS
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, per_owner in owners.items():
        value = FLAGS[name].value
        if value is None:
            continue
        if name not in names:
            raise ValueError(f"--{name} is not a parameter of {owner} (it belongs to "
                             f"{', '.join(per_owner)})")
        default = per_owner[owner]
        if isinstance(default, tuple):
            value = parse_numbers(value, len(default), type(default[0]) if default else float, name)
        values[name] = value
    return cls(**values)


def _show(value):
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def flagfile_values(path):
    """{flag: text} a flagfile sets (nested flagfiles followed in order,
    later lines win; paths relative to the repository root)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    values = {}

    def read(p):
        with open(p) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("--") or "=" not in line:
                    continue
                key, value = line[2:].split("=", 1)
                if key == "flagfile":
                    read(value if os.path.isabs(value) else os.path.join(root, value))
                else:
                    values[key] = value

    read(path)
    return values


def flagfile_config(path, config_cls):
    """(values, crop_size) that a flagfile (:func:`flagfile_values`) sets
    for the fields of ``config_cls``; crop_size is None when not set."""
    import dataclasses

    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(config_cls)}
    values, crop = {}, None
    for key, value in flagfile_values(path).items():
        if key == "crop_size":
            crop = tuple(int(v) for v in value.split(","))
        elif key in defaults:
            default = defaults[key]
            if isinstance(default, bool):
                values[key] = value.lower() in ("true", "1")
            elif isinstance(default, tuple):
                values[key] = tuple(type(default[0])(v) for v in value.split(","))
            else:
                values[key] = type(default)(value)
    return values, crop


RUN_FLAGS = []  # names defined by define_run_flags (recorded in flags.txt with the script's own)


def define_run_flags(defaults=None, helps=None):
    """The flags of :class:`rr_tf.training.settings.RunSettings` (schedule,
    distribution, precision, checkpoints, logging, export, seed), with its
    defaults changed by ``defaults`` (e.g. ``FINETUNE_DEFAULTS``) and the
    help texts in ``helps`` replacing the generic ones. Read them back with
    :func:`run_settings`. Imports no TensorFlow."""
    from rr_tf.training.settings import OPTIMIZERS, SHARD_CHECKS, VERBOSITY, run_defaults

    default = run_defaults(defaults)
    verbose = {v: k for k, v in VERBOSITY.items()}[default["verbose"]]
    text = dict(
        train_steps="Optimizer steps in total.",
        batch_size="Global batch size (split across replicas).",
        crop_size="Crop (patch) size D,H,W in voxels.",
        crops_per_volume="Crops cut from each decoded volume.",
        optimizer="Optimizer: adamw, sgd (momentum 0.9) and lamb with the warm-up + cosine "
                  "schedule; nnunet_sgd = nnU-Net's SGD (Nesterov momentum 0.99, polynomial "
                  "decay lr * (1 - step/steps)^0.9, no warm-up).",
        learning_rate="Peak learning rate.",
        weight_decay="Weight decay.",
        warmup_steps="Linear warm-up steps before the cosine decay.",
        strategy="tf.distribute strategy (multi_worker reads TF_CONFIG; tpu needs --tpu).",
        tpu="TPU name or address for --strategy=tpu.",
        jit_compile="XLA: auto = on for one GPU or TPU, off on CPU and under MirroredStrategy.",
        mixed_precision="Compute dtype; variables, losses and queues stay float32 (float16 uses "
                        "loss scaling; not on CPU).",
        checkpoint_every="Steps between checkpoints.",
        keep_checkpoints="Checkpoints kept.",
        log_every="Steps between TensorBoard scalar writes.",
        image_every="Steps between TensorBoard image panels.",
        verbose="Console progress.",
        export="Export at the end.",
        seed="Seed of weights and the data stream.",
        overwrite="Start the run directory afresh.",
        verify_shards="How every shard is checked against the manifest before it is read: size "
                      "(cheap) or sha256 (reads every shard once more; finds flipped bytes before "
                      "training). Either way a record that cannot be read stops the run with the "
                      "shard named.",
        skip_corrupt_shards="Leave out a shard that fails the check (or whose records stop "
                            "reading part-way, for the rest of that shard) with a warning naming "
                            "it, instead of stopping the run.")
    text.update(helps or {})
    for name in ("train_steps", "batch_size", "crops_per_volume", "checkpoint_every",
                 "keep_checkpoints", "log_every", "image_every"):
        flags.DEFINE_integer(name, default[name], text[name], lower_bound=1)
    flags.DEFINE_integer("warmup_steps", default["warmup_steps"], text["warmup_steps"],
                         lower_bound=0)
    flags.DEFINE_string("crop_size", ",".join(str(c) for c in default["crop_size"]),
                        text["crop_size"])
    flags.DEFINE_enum("optimizer", default["optimizer"], list(OPTIMIZERS),
                      text["optimizer"])
    flags.DEFINE_float("learning_rate", default["learning_rate"], text["learning_rate"],
                       lower_bound=0.0)
    flags.DEFINE_float("weight_decay", default["weight_decay"], text["weight_decay"],
                       lower_bound=0.0)
    flags.DEFINE_enum("strategy", default["strategy"], ["default", "mirrored", "multi_worker",
                                                        "tpu"], text["strategy"])
    flags.DEFINE_string("tpu", default["tpu"], text["tpu"])
    flags.DEFINE_enum("jit_compile", default["jit_compile"], ["auto", "true", "false"],
                      text["jit_compile"])
    flags.DEFINE_enum("mixed_precision", default["mixed_precision"],
                      ["none", "bfloat16", "float16"], text["mixed_precision"])
    flags.DEFINE_enum("verbose", verbose, list(VERBOSITY), text["verbose"])
    flags.DEFINE_boolean("export", default["export"], text["export"])
    flags.DEFINE_integer("seed", default["seed"], text["seed"])
    flags.DEFINE_boolean("overwrite", default["overwrite"], text["overwrite"])
    flags.DEFINE_enum("verify_shards", default["verify_shards"], list(SHARD_CHECKS),
                      text["verify_shards"])
    flags.DEFINE_boolean("skip_corrupt_shards", default["skip_corrupt_shards"],
                         text["skip_corrupt_shards"])
    register_numbers_validator("crop_size", 3, cast=int, positive=True)
    RUN_FLAGS[:] = [name for name in default if name in text]


def run_settings(script, extra=()):
    """The RunSettings keyword arguments from the flags of
    :func:`define_run_flags`, ``flags_text`` (see :func:`resolved_flags`)
    included."""
    from rr_tf.training.settings import VERBOSITY

    values = {name: flags.FLAGS[name].value for name in RUN_FLAGS}
    values["crop_size"] = parse_numbers(values["crop_size"], 3, int, "crop_size")
    values["verbose"] = VERBOSITY[values["verbose"]]
    values["flags_text"] = resolved_flags(script, extra)
    return values


def resolved_flags(script, extra=()):
    """The flags ``script`` (its ``__file__``) defines, plus the flags named
    in ``extra`` (e.g. the method flags of :func:`define_config_flags`, which
    are registered by this module), with their values, as a flagfile that
    reproduces the run (what ``flags.txt`` records); flags left at None (the
    method's own default) are left out. ``--overwrite`` is left out too:
    replaying the file must resume the run, never wipe it."""
    name = os.path.basename(script)
    own = [f for module, fl in flags.FLAGS.flags_by_module_dict().items()
           if os.path.basename(module) == name for f in fl]
    own += [flags.FLAGS[n] for n in list(RUN_FLAGS) + list(extra)
            if all(f.name != n for f in own)]
    return "".join(f.serialize() + "\n" for f in own
                   if f.name != "overwrite" and f.value is not None and f.serialize())
