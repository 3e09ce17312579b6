"""A real, throw-away Slurm cluster on one machine, for the launch-script tests.

It starts a private munged, one slurmctld and one slurmd per emulated node
(Debian's slurm-wlm 22.05 and munge packages), with every file (key, socket,
configuration, state, spool, logs) in one temporary directory. The daemons run
in the foreground as children of this process and are stopped by their PIDs.

Needs root (slurmd runs jobs as the submitting user and must be able to
switch to it) and the binaries slurmctld, slurmd, sbatch, munged, mungekey.

Every Slurm command needs ``SLURM_CONF``; use ``cluster.env`` (a copy of
``os.environ`` with it set) or ``cluster.run([...])``.

The emulated nodes are called n1, n2, ...; those names do not resolve, which is
why the launch scripts take the master address from ``scontrol show node``
(NodeAddr, here 127.0.0.1).

Used by tests/integration/test_slurm.py; ``python -m tests.helpers.slurm_cluster`` starts one and
keeps it up until Ctrl-C, for trying the scripts by hand.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REQUIRED_BINARIES = (
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "scontrol",
    "scancel",
    "sinfo",
    "srun",
    "munged",
    "mungekey",
)


def missing_binaries() -> list[str]:
    """Names of the programs this module needs that are not on PATH (or /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [b for b in REQUIRED_BINARIES if shutil.which(b, path=path) is None]


def _which(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise FileNotFoundError(name)
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (bound together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """``c = SlurmCluster(nodes=2).start(); c.run(["sinfo"]); c.stop()``."""

    def __init__(
        self, nodes: int = 2, cpus_per_node: int = 1, root: str | os.PathLike | None = None, first_job_id: int = 1
    ):
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        self.first_job_id = first_job_id
        # munged insists that every directory above its socket is searchable
        # by all users (pytest's tmp_path is not), so use our own temp dir.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="slurm-test-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.sock"
        self.log_dir = self.root / "log"
        self._procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # Client commands must not inherit a surrounding job's identity.
        for k in list(self.env):
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del self.env[k]
        self.env["SLURM_CONF"] = str(self.conf)

    # ---------------------------------------------------------------- setup
    def _write_config(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(exist_ok=True)
        (r / "munge").chmod(0o755)
        lines = [
            # Unique name: a second test run on the same machine must not
            # share anything with this one.
            f"ClusterName=rwtest{os.getpid()}",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "ReturnToService=2",
            "MpiDefault=none",
            "MailProg=/bin/true",
            # Keep finished jobs visible to scontrol for the test's checks.
            "MinJobAge=600",
            "KillWait=20",
            "InactiveLimit=0",
            "JobRequeue=1",
            f"FirstJobId={self.first_job_id}",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory=4000 State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (r / "plugstack.conf").write_text("")

    def _spawn(self, name: str, argv: list[str]) -> None:
        # The daemon keeps its own copy of the log's file descriptor.
        with open(self.log_dir / f"{name}.stdout", "wb") as log:
            self._procs[name] = subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self._write_config()
        key = self.root / "munge" / "munge.key"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                f"--log-file={self.log_dir / 'munged.log'}",
            ],
        )
        self._wait_for(lambda: self.munge_socket.exists(), 10, "munged socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._wait_for(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout, "slurmctld")
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])

        def all_idle() -> bool:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n) == "idle" for n in self.nodes)

        self._wait_for(all_idle, timeout, "nodes idle")

    def _wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited with {p.returncode}\n{self.logs()}")
            if cond():
                return
            time.sleep(0.3)
        raise SlurmError(f"timed out waiting for {what}\n{self.logs()}")

    def stop(self) -> None:
        # Cancel leftovers first so slurmd reaps its job processes.
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", "root"], check=False)
            self.run(["scancel", "--user", "root"], check=False)
            time.sleep(1)
        for name in reversed(list(self._procs)):
            p = self._procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in self._procs.items():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()

    # ------------------------------------------------------------- commands
    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        argv = [_which(argv[0])] + list(argv[1:])
        p = subprocess.run(argv, check=False, env=kw.pop("env", self.env), capture_output=True, text=True, **kw)
        if check and p.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def sbatch(self, argv: list[str], env: dict | None = None, cwd: str | os.PathLike | None = None) -> int:
        """Submit; returns the job id."""
        full_env = dict(self.env)
        full_env.update(env or {})
        p = self.run(["sbatch", "--parsable", *argv], env=full_env, cwd=cwd)
        return int(p.stdout.strip().split(";")[0])

    TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")

    def jobs(self, job_id: int) -> list[dict[str, str]]:
        """``scontrol show job`` as dicts (JobState, Restarts, ExitCode, ...): one
        per job, or one per task of a job array."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def job(self, job_id: int) -> dict[str, str]:
        return self.jobs(job_id)[0]

    def wait_job(self, job_id: int, timeout: float, until=TERMINAL) -> list[dict[str, str]]:
        """Wait until the job (every task of an array) is in one of the states ``until``."""
        deadline = time.monotonic() + timeout
        while True:
            infos = self.jobs(job_id)
            if infos and all(info.get("JobState") in until for info in infos):
                return infos
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} not in {until} after {timeout}s: {infos}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail: int = 40) -> str:
        parts = []
        for f in sorted(self.log_dir.glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    # Ctrl-C, or SIGTERM (a background process may have SIGINT ignored), stops it.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    c = SlurmCluster().start()
    print(f"export SLURM_CONF={c.conf}   # cluster up; Ctrl-C stops it", flush=True)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
        print(f"stopped; logs in {c.log_dir}")
