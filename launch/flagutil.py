"""Flag parsing helpers shared by the launch/ scripts (never imported by rr_tf/)."""

import os
import sys

from absl import flags


def quiet_tensorflow():
    """Hides TensorFlow's C++ INFO/WARNING lines and its absl INFO lines (e.g.
    one per checkpoint save) unless the user set TF_CPP_MIN_LOG_LEVEL.
    Call before TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging

    logging.set_verbosity(logging.WARNING)


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


def fail(script, message, code=2):
    """Prints one line ``script: error: message`` to stderr and exits."""
    print(f"{os.path.basename(script)}: error: {message}", file=sys.stderr)
    sys.exit(code)


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


def flagfile_config(path, config_cls):
    """(values, crop_size) that a flagfile (nested flagfiles followed in
    order, later lines win; paths relative to the repository root) sets
    for the fields of ``config_cls``; crop_size is None when not set."""
    import dataclasses

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(config_cls)}
    values, crop = {}, [None]

    def read(p):
        with open(p) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("--") or "=" not in line:
                    continue
                key, value = line[2:].split("=", 1)
                if key == "flagfile":
                    read(value if os.path.isabs(value) else os.path.join(root, value))
                elif key == "crop_size":
                    crop[0] = tuple(int(v) for v in value.split(","))
                elif key in defaults:
                    default = defaults[key]
                    if isinstance(default, bool):
                        values[key] = value.lower() in ("true", "1")
                    elif isinstance(default, tuple):
                        values[key] = tuple(type(default[0])(v) for v in value.split(","))
                    else:
                        values[key] = type(default)(value)

    read(path)
    return values, crop[0]


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
    own += [flags.FLAGS[n] for n in extra if all(f.name != n for f in own)]
    return "".join(f.serialize() + "\n" for f in own
                   if f.name != "overwrite" and f.value is not None and f.serialize())
