"""Starts N workers of a multi-worker training job on this machine (127.0.0.1),
for testing multi-worker runs without a cluster.

  python launch/local_workers.py --workers=2 -- launch/pretrain.py --flagfile=configs/demo_moco.flags

Picks N free ports on 127.0.0.1, gives worker i the TF_CONFIG that names
all of them and itself as task i (worker 0 is the chief, which alone writes
the run directory), appends ``--strategy=multi_worker`` to the command
(later flags win), and starts the N processes (a ``.py`` command runs with
this Python). Their output is passed on line by line, prefixed ``[w<i>]``
(stdout to stdout, stderr to stderr). When a worker ends with a non-zero
status or is killed, the others are stopped (SIGTERM, then SIGKILL after
``--grace_seconds``) and this launcher exits with that worker's status (2
when it was killed by a signal) after one line naming it. Running the same
command again resumes from the chief's last checkpoint. Exit status: 0 when
every worker ended with 0; 130 on Ctrl-C (the workers are stopped too).
The workers' temporary files (TMPDIR) go to a folder of the job that is
removed at the end, also when a worker was killed.

On real hosts, start one process per host yourself with TF_CONFIG naming
every host (docs/gpu.md, "Several hosts").
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from launch import flagutil  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("workers", 2, "Number of worker processes (one TF_CONFIG task each; worker "
                     "0 is the chief).", lower_bound=1, upper_bound=64)
flags.DEFINE_float("grace_seconds", 10.0, "After a worker fails, seconds the others get to end "
                   "after SIGTERM before they are killed (SIGKILL).", lower_bound=0.0)
flags.DEFINE_boolean("add_strategy_flag", True, "Append --strategy=multi_worker to the command "
                     "(turn off for a command that is not an rr_tf training launcher).")


def free_ports(count, host="127.0.0.1"):
    """``count`` distinct ports free on ``host`` right now (held open
    together while choosing, so they differ; another program may still take
    one before the workers bind it, which then fails that worker)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_configs(ports, host="127.0.0.1"):
    """One TF_CONFIG (JSON text) per worker of the cluster on ``ports``."""
    cluster = {"worker": [f"{host}:{p}" for p in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(len(ports))]


def worker_command(command, add_strategy=True):
    """The command a worker runs: a ``.py`` script with this Python, plus
    ``--strategy=multi_worker`` when ``add_strategy``."""
    cmd = list(command)
    if cmd[0].endswith(".py"):
        cmd.insert(0, sys.executable)
    if add_strategy:
        cmd.append("--strategy=multi_worker")
    return cmd


def _pump(stream, out, prefix, lock):
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        with lock:
            out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            out.flush()
    stream.close()


def _describe(status):
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def _stop(procs, grace):
    """SIGTERM to every worker still running, SIGKILL to those left after ``grace`` s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_workers(command, workers, grace, add_strategy=True, log=None):
    """Runs the job; returns this launcher's exit status (see the module doc)."""
    log = log or (lambda m: print(f"local_workers.py: {m}", file=sys.stderr, flush=True))
    ports = free_ports(workers)
    cmd = worker_command(command, add_strategy)
    lock = threading.Lock()
    procs, pumps = [], []
    # the workers' temporary files (the non-chief workers' copies of the run
    # directory) go to a folder of this job, removed at the end even when a
    # worker was killed before it could remove its own
    scratch = tempfile.mkdtemp(prefix="rr_tf-local-workers-")
    try:
        return _run(cmd, ports, scratch, grace, log, lock, procs, pumps)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(cmd, ports, scratch, grace, log, lock, procs, pumps):
    for i, config in enumerate(tf_configs(ports)):
        env = dict(os.environ, TF_CONFIG=config, PYTHONUNBUFFERED="1", TMPDIR=scratch)
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL)
        procs.append(p)
        log(f"worker {i}{' (chief)' if i == 0 else ''}: pid {p.pid}, 127.0.0.1:{ports[i]}")
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, out, f"[w{i}] ", lock), daemon=True)
            t.start()
            pumps.append(t)
    failed = None
    try:
        while failed is None and any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if p.poll() is not None and p.returncode != 0:
                    failed = i
                    break
            else:
                time.sleep(0.2)
        if failed is None:  # all ended: one may have failed in the last interval
            failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
    except KeyboardInterrupt:
        _stop(procs, grace)
        for t in pumps:
            t.join(timeout=2)
        log("interrupted (Ctrl-C); the workers were stopped; the same command resumes from "
            "the chief's last checkpoint")
        return flagutil.EXIT_INTERRUPTED
    if failed is not None:
        _stop(procs, grace)
    for t in pumps:
        t.join(timeout=5)
    if failed is None:
        return flagutil.EXIT_OK
    status = procs[failed].returncode
    log(f"error: worker {failed} (pid {procs[failed].pid}) {_describe(status)}; stopped the "
        f"other worker(s)" + ("; the same command resumes from the chief's last checkpoint"
                              if status < 0 else ""))
    return status if status > 0 else flagutil.EXIT_STOPPED


def main(argv):
    command = argv[1:]
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        flagutil.fail(__file__, "no command: give it after '--', e.g. "
                      "local_workers.py --workers=2 -- launch/pretrain.py --flagfile=...")
    if command[0].endswith(".py") and not os.path.isfile(command[0]):
        flagutil.fail(__file__, f"{command[0]}: no such script")
    sys.exit(run_workers(command, FLAGS.workers, FLAGS.grace_seconds, FLAGS.add_strategy_flag))


if __name__ == "__main__":
    flagutil.main(__file__, main)
