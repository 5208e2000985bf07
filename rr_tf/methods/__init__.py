"""Pre-training methods, one file each, registered by name.

``get_method(name)`` returns the method class; each class has a ``Config``
dataclass (defaults = the published hyper-parameters, see
``../shared/docs/methods.md``) and builds from it: ``cls(config)``.
"""

import importlib

from rr_tf.errors import ConfigError

_REGISTRY = {
    "reprec": "rr_tf.methods.reprec:RepRec",
}


def method_names():
    return tuple(_REGISTRY)


def get_method(name):
    if name not in _REGISTRY:
        raise ConfigError("method", f"unknown method {name!r}; available: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
