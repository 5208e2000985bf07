"""Names of the label values (``{1: "liver", 2: "spleen", ...}``) and where
they travel: a data set's ``manifest.json`` (``"label_names"``), an
export's ``segmenter.json`` (``"label_names"``), and the ``--label_names``
flags of ``launch/prepare_data.py`` and ``launch/evaluate.py``.

In Python the names are ``{int value: str name}`` without the background
(0); in JSON the keys are strings (``{"1": "liver"}``), sorted by value.
"""

import json
import os

from rr_tf.errors import ConfigError, DataError


def _normalised(mapping):
    """{int: str} sorted by value; ValueError with the reason otherwise."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ValueError(f"must be an object {{value: name}}, got {type(mapping).__name__}")
    names = {}
    for key, name in mapping.items():
        text = str(key).strip()
        if isinstance(key, bool) or not text.isdigit() or not 1 <= int(text) <= 255:
            raise ValueError(f"key {key!r} is not a label value in 1..255")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"label {text} needs a non-empty name, got {name!r}")
        if int(text) in names:
            raise ValueError(f"label {int(text)} is named twice")
        names[int(text)] = name.strip()
    if len(set(names.values())) != len(names):
        raise ValueError(f"repeats a name: {sorted(names.values())}")
    return dict(sorted(names.items()))


def normalise(mapping, where):
    """``{value: name}`` with int or digit-string keys -> ``{int: str}``
    sorted by value; None -> {}. Raises DataError naming ``where`` (the
    file) for anything else: values outside 1..255, empty or repeated
    names."""
    try:
        return _normalised(mapping)
    except ValueError as err:
        raise DataError(where, f"label_names: {err}") from None


def check_names(mapping, option="label_names"):
    """:func:`normalise` for an option value: ConfigError naming ``option``."""
    try:
        return _normalised(mapping)
    except ValueError as err:
        raise ConfigError(option, str(err)) from None


def to_json(names):
    """``{int: name}`` -> ``{"1": name, ...}`` (sorted by value); None or {} -> None."""
    if not names:
        return None
    return {str(k): v for k, v in check_names(names).items()}


def parse_label_names(text, flag="--label_names"):
    """Flag text -> ``{int: name}``: comma-separated names of the labels
    1..K (``liver,spleen``), or ``value=name`` pairs (``1=liver,3=kidney``).
    Raises ConfigError naming ``flag``."""
    items = [p.strip() for p in str(text).split(",")]
    if not items or not all(items):
        raise ConfigError(flag, f"has an empty name in {text!r}")
    pairs = ["=" in p for p in items]
    if any(pairs) and not all(pairs):
        raise ConfigError(flag, f"use either names or label=name pairs, not both ({text!r})")
    if not all(pairs):
        raw = {i + 1: name for i, name in enumerate(items)}
    else:
        raw = {}
        for p in items:
            key, name = (s.strip() for s in p.split("=", 1))
            if not key.isdigit() or not 1 <= int(key) <= 255 or not name:
                raise ConfigError(flag, f"{p!r} is not label=name with a label in 1..255")
            if int(key) in raw:
                raise ConfigError(flag, f"label {int(key)} is named twice")
            raw[int(key)] = name
    if len(raw) > 255:
        raise ConfigError(flag, f"{len(raw)} names; at most 255 labels fit uint8")
    if len(set(raw.values())) != len(raw):
        raise ConfigError(flag, f"names are not unique: {sorted(raw.values())}")
    return dict(sorted(raw.items()))


def names_file(path):
    """The file holding the label names of ``path``: ``manifest.json`` of a
    data folder, or ``segmenter.json`` of an export folder or of a
    fine-tuning run folder (its ``export/``). None when there is none."""
    path = str(path)
    for candidate in (os.path.join(path, "manifest.json"), os.path.join(path, "segmenter.json"),
                      os.path.join(path, "export", "segmenter.json")):
        if os.path.isfile(candidate):
            return candidate
    if os.path.isfile(path) and os.path.basename(path) in ("manifest.json", "segmenter.json"):
        return path
    return None


def read_label_names(path):
    """``{int: name}`` recorded in a data folder's manifest.json or an
    export's / run's segmenter.json (see :func:`names_file`); {} when the
    file records none (older files). Local paths; reads JSON only, no
    TensorFlow. Raises DataError naming the folder or file."""
    found = names_file(path)
    if found is None:
        raise DataError(path, "holds no manifest.json (data folder) or segmenter.json (export or "
                        "fine-tuning run)")
    try:
        with open(found) as f:
            info = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(found, f"cannot read ({err})")
    if not isinstance(info, dict):
        raise DataError(found, "not a JSON object")
    return normalise(info.get("label_names"), found)
