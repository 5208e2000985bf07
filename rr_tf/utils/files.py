"""Writing files so that a reader never sees half of one: the one
atomic-write helper of rr_tf (local file system; the shard manifest, which
may live on a remote file system, goes through
``rr_tf.data.records.atomic_write_text`` and tf.io.gfile instead)."""

import json
import os


def atomic_write(path, data):
    """Writes ``data`` (text or bytes) to ``path`` under a temporary name in
    the same folder, then renames it into place; a failed write leaves no
    temporary file behind."""
    folder, name = os.path.split(os.fspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path, value, **dump_args):
    """``value`` as indented JSON (one trailing newline) at ``path``, atomically."""
    atomic_write(path, json.dumps(value, indent=1, **dump_args) + "\n")
