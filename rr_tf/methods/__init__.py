"""Pre-training methods, one file each, registered by name.

``get_method(name)`` returns the method class; each class has a ``Config``
dataclass (defaults = the published hyper-parameters, see
``docs/methods.md``) and builds from it: ``cls(config)``.
"""

import importlib

from rr_tf.errors import ConfigError

_REGISTRY = {
    "reprec": "rr_tf.methods.reprec:RepRec",
    "genesis": "rr_tf.methods.genesis:ModelsGenesis",
    "pcrl": "rr_tf.methods.pcrl:PCRL",
    "multitask": "rr_tf.methods.multitask:SequentialMultiTask",
    "pcrlv2": "rr_tf.methods.pcrlv2:PCRLv2",
    "pgl": "rr_tf.methods.pgl:PGL",
    "moco": "rr_tf.methods.moco:MoCo",
    "simclr": "rr_tf.methods.simclr:SimCLR",
    "mae": "rr_tf.methods.mae:MAE",
}


def method_names():
    return tuple(_REGISTRY)


def get_method(name):
    if name not in _REGISTRY:
        raise ConfigError("method", f"unknown method {name!r}; available: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
