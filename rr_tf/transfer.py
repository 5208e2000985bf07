"""Moving weights between models: pre-training -> pre-training (HPT,
``--init_from``) and pre-training -> fine-tuning (``load_pretrained``): the
matching of variables and its report. Reading the source (a run directory,
an export, a ``.keras`` file) into parts is :mod:`rr_tf.runs`'.

Both sides present their transferable networks as *parts*: a dict
``{part name: keras layer}`` from ``transfer_parts()`` (methods, the export
wrappers in ``rr_tf.models.parts``, the segmenters). Standard part names:

    unet     a UNet3D (encoder only or encoder + decoder)
    hybrid   RepRec's HybridEncoder (CNN + transformer)
    vit      a ViT3D encoder
    unet2d   a 2D U-Net (sequential multi-task)

Inside a part, variables are keyed by their Keras path *below the part's own
layer name* (``enc1/unit1/conv/kernel``): explicit layer names make these
keys independent of where the part sits (inside a method, an export wrapper
or a segmenter) and of Keras' process-wide auto-numbering. Variables match
when part, key and shape agree; everything else is reported.
"""

import dataclasses
import json

import numpy as np

from rr_tf.errors import ConfigError
from rr_tf.utils.files import atomic_write


def variables_by_key(layer):
    """{key below ``layer.name``: variable} of every weight of ``layer``."""
    out = {}
    for v in layer.weights:
        parts = v.path.split("/")
        start = parts.index(layer.name) + 1 if layer.name in parts else 1
        key = "/".join(parts[start:]) or parts[-1]
        if key in out:
            raise ValueError(f"{layer.name}: two variables share the key {key!r}")
        out[key] = v
    return out


@dataclasses.dataclass
class TransferReport:
    """What a transfer did, per variable: ``part/key`` strings."""

    source: str
    matched: list = dataclasses.field(default_factory=list)
    missing: list = dataclasses.field(default_factory=list)       # in the model, not the source
    unexpected: list = dataclasses.field(default_factory=list)    # in the source, not the model
    shape_mismatch: list = dataclasses.field(default_factory=list)  # "part/key: model (..) vs source (..)"
    parts: list = dataclasses.field(default_factory=list)          # parts present on both sides

    def summary(self):
        return (f"{len(self.matched)} variables loaded from {self.source} (parts: "
                f"{', '.join(self.parts) or 'none'}); {len(self.missing)} missing (kept "
                f"initial values), {len(self.unexpected)} unused, "
                f"{len(self.shape_mismatch)} shape mismatches")

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=1)

    def save(self, path):
        atomic_write(path, self.to_json() + "\n")


def transfer(dst_parts, src_parts, source="source", parts=None, flag="init_from"):
    """Copies every matching variable of ``src_parts`` into ``dst_parts``
    (dicts of part name -> layer; ``parts`` restricts the names). Returns a
    TransferReport; raises ConfigError naming ``flag`` (the option the user
    gave the source with) if nothing matches."""
    names = [n for n in dst_parts if n in src_parts and (parts is None or n in parts)]
    if parts is not None:
        unknown = sorted(set(parts) - set(dst_parts))
        if unknown:
            raise ConfigError("parts", f"the model has no part {unknown} (it has "
                              f"{sorted(dst_parts)})")
    report = TransferReport(source=str(source), parts=names)
    for name in sorted(set(dst_parts) - set(names)):
        report.missing += [f"{name}/{k}" for k in variables_by_key(dst_parts[name])]
    for name in sorted(set(src_parts) - set(names)):
        report.unexpected += [f"{name}/{k}" for k in variables_by_key(src_parts[name])]
    done = set()  # a variable reachable from two parts (hybrid and its unet) counts once
    for name in names:
        dst, src = variables_by_key(dst_parts[name]), variables_by_key(src_parts[name])
        for key, var in dst.items():
            tag = f"{name}/{key}"
            if id(var) in done:
                continue
            done.add(id(var))
            if key not in src:
                report.missing.append(tag)
                continue
            value = np.asarray(src[key].numpy() if hasattr(src[key], "numpy") else src[key])
            if tuple(value.shape) != tuple(var.shape):
                report.shape_mismatch.append(f"{tag}: model {tuple(var.shape)} vs source "
                                             f"{tuple(value.shape)}")
                continue
            var.assign(value.astype(var.dtype))
            report.matched.append(tag)
        report.unexpected += [f"{name}/{k}" for k in src if k not in dst]
    if not report.matched:
        raise ConfigError(flag, f"{source}: no variable matches the model (model parts "
                          f"{sorted(dst_parts)}, source parts {sorted(src_parts)}; "
                          f"{len(report.shape_mismatch)} shape mismatches)")
    return report
