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
