"""tf.distribute strategy factory and the ``jit_compile=auto`` rule.

XLA (``jit_compile``) helps on one GPU or TPU, makes Conv3D about 2.6x
slower on CPU, and crashes under MirroredStrategy in Keras 3 (which turns it
off under tf.distribute). So ``auto`` means: on for a single GPU or a TPU,
off on CPU and under Mirrored / MultiWorker strategies.

Multi-worker (``multi_worker``, one process per host, TF_CONFIG): every
worker builds the same data stream from the same seed and keeps its own
slice of each global batch (tf.data's DATA sharding, :func:`for_workers`),
so a step sees each sample once and 2 workers x 1 device train like one
process with 2 devices (tested). Only the chief writes the run directory;
:func:`worker_role` tells a process which it is before anything is written.
"""

import json
import os

import tensorflow as tf

from rr_tf.distribute import is_multi_worker
from rr_tf.errors import ConfigError

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
JIT_MODES = ("auto", "true", "false")


def make_strategy(name, tpu_address=""):
    """Returns the tf.distribute strategy called ``name``.

    Raises ConfigError (one line, naming the flag) when the hardware or the
    cluster description it needs is missing.
    """
    if name not in STRATEGIES:
        raise ConfigError("strategy", f"must be one of {STRATEGIES}, got {name!r}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError("strategy", "multi_worker needs the TF_CONFIG environment variable "
                              "describing the cluster (see tf.distribute.MultiWorkerMirroredStrategy)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("strategy", f"tpu: no TPU could be reached ({first})") from None
    return tf.distribute.TPUStrategy(resolver)


def worker_role(strategy_name, env=None):
    """``(task_type, task_index, is_chief)`` of this process: from TF_CONFIG
    under ``multi_worker`` (read without starting TensorFlow's runtime, so
    the run directory can be routed before anything is written), else
    ``("", 0, True)``. The chief is the ``chief`` task, or worker 0 when the
    cluster has none (TensorFlow's rule). ``env``: the environment (tests)."""
    if strategy_name != "multi_worker":
        return "", 0, True
    env = os.environ if env is None else env
    try:
        tf_config = json.loads(env.get("TF_CONFIG") or "{}")
        cluster, task = tf_config.get("cluster") or {}, tf_config.get("task") or {}
        task_type, index = str(task.get("type", "")), int(task.get("index", 0))
    except (ValueError, TypeError, AttributeError) as err:
        raise ConfigError("strategy", f"multi_worker: TF_CONFIG is not a JSON cluster "
                          f"description ({err})") from None
    if task_type not in ("chief", "worker") or task_type not in cluster \
            or not 0 <= index < len(cluster[task_type]):
        raise ConfigError("strategy", f"multi_worker: TF_CONFIG's task {task!r} is not a chief "
                          f"or worker of its cluster {sorted(cluster)}")
    chief = task_type == "chief" or ("chief" not in cluster and index == 0)
    return task_type, index, chief


def from_chief(strategy, value):
    """The integer ``value`` as the chief has it, on every worker (a
    collective all-reduce, so also a barrier: every worker waits for the
    chief to get here). Multi-worker runs agree this way on the step to
    resume from, which the chief alone reads from the run directory."""
    if strategy.num_replicas_in_sync == 1 or strategy.cluster_resolver is None:
        return int(value)
    mine = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(int(value) if ctx.replica_id_in_sync_group == 0 else 0, tf.int64))
    return int(strategy.reduce("SUM", mine, axis=None))


def for_workers(dataset, strategy):
    """``dataset`` as the multi-worker ``strategy`` must split it: every
    worker runs the whole (identically seeded) stream and keeps its own part
    of each global batch (DATA sharding), so no sample is seen twice in a
    step whatever the number of shards, and the split equals one process's
    split over as many devices. tf.data's default (AUTO) would shard the
    shard files instead, which starves a worker when there are fewer train
    shards than workers. Other strategies get ``dataset`` unchanged."""
    if not is_multi_worker(strategy):
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def accelerator_kind():
    """'tpu', 'gpu' or 'cpu' for the devices this process sees."""
    if tf.config.list_logical_devices("TPU"):
        return "tpu"
    if tf.config.list_logical_devices("GPU"):
        return "gpu"
    return "cpu"


def resolve_jit_compile(mode, strategy):
    """``auto`` -> True only for one GPU or a TPU strategy; ``true``/``false`` as given."""
    if mode not in JIT_MODES:
        raise ConfigError("jit_compile", f"must be one of {JIT_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "true"
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    if isinstance(strategy, (tf.distribute.MirroredStrategy,
                             tf.distribute.MultiWorkerMirroredStrategy)):
        return False
    return accelerator_kind() == "gpu" and strategy.num_replicas_in_sync == 1


def onednn_bf16_unsafe(cpuinfo=None, env=None):
    """True where TensorFlow 2.21's oneDNN bfloat16 kernels were measured to
    give NaN Conv3D weight gradients (a 2^3 feature map at a U-Net's deepest
    level): a CPU with AVX512-BF16 while oneDNN is on (its default;
    ``TF_ENABLE_ONEDNN_OPTS=0`` turns it off before TensorFlow starts).
    ``cpuinfo``/``env``: /proc/cpuinfo's text and the environment (tests)."""
    env = os.environ if env is None else env
    if env.get("TF_ENABLE_ONEDNN_OPTS", "1").strip() == "0":
        return False
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    return "avx512_bf16" in cpuinfo


def set_precision(policy):
    """Sets the Keras global dtype policy: 'none' (float32), 'bfloat16' or
    'float16' (mixed). Methods keep losses, queues and EMA in float32."""
    import keras

    names = {"none": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
    if policy not in names:
        raise ConfigError("mixed_precision", f"must be one of {tuple(names)}, got {policy!r}")
    if policy == "float16" and accelerator_kind() != "gpu":
        raise ConfigError("mixed_precision", "float16 needs a GPU: it exists for GPU tensor "
                          "cores and CPUs gain nothing from it (the float16 graph runs on CPU "
                          "in the tests); use bfloat16 on CPU and TPU")
    if policy == "bfloat16" and accelerator_kind() == "cpu" and onednn_bf16_unsafe():
        raise ConfigError("mixed_precision", "bfloat16 on this CPU (AVX512-BF16) with "
                          "TensorFlow's oneDNN kernels gives NaN Conv3D weight gradients "
                          "(measured with TF 2.21); set the environment variable "
                          "TF_ENABLE_ONEDNN_OPTS=0 before starting, or use none (float32)")
    keras.mixed_precision.set_global_policy(names[policy])
    return names[policy]
