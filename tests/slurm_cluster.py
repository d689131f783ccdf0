"""A throwaway one-node Slurm cluster on this machine, for tests: munged, slurmctld and slurmd in a private
directory on non-default ports, started in the foreground so that teardown stops them by pid.

    with SlurmCluster.start(workdir) as cluster:
        job = cluster.sbatch(["slurm/train_coco.sh", "train.max_steps=40"], env=..., cwd=REPO)
        cluster.wait_for(lambda: cluster.job_state(job) == "COMPLETED", 120)
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Callable, Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "munged", "mungekey"]


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def ensure_installed() -> Optional[str]:
    """Install the Debian packages when missing; None when ready, else why the cluster cannot run here."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(missing_binaries())} missing) and installing needs root"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr[-500:]}"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.daemons: list[subprocess.Popen] = []
        self.jobs: list[str] = []

    @classmethod
    def start(cls, root: str) -> "SlurmCluster":
        os.makedirs(root, mode=0o700, exist_ok=True)
        cluster = cls(root)
        try:
            cluster._start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _start(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            os.makedirs(self._path(d), mode=0o700, exist_ok=True)
        key, sock = self._path("munge", "munge.key"), self._path("munge", "munge.socket")
        subprocess.run([_sbin("mungekey"), "--create", "--keyfile", key], check=True, capture_output=True)
        os.chmod(key, 0o600)
        self._spawn("munged", [_sbin("munged"), "-F", "--force", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={self._path('munge', 'munged.pid')}",
                               f"--seed-file={self._path('munge', 'seed')}",
                               f"--log-file={self._path('log', 'munged.log')}"])
        self.wait_for(lambda: os.path.exists(sock), 30, "munged socket")
        self._write_conf(sock)
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-c", "-f", self.conf])
        self.wait_for(lambda: self._ok(["scontrol", "ping"]) and "UP" in self.scontrol("ping"), 60, "slurmctld")
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", self.conf, "-N", self.node])
        self.wait_for(lambda: re.search(r"State=(IDLE|MIXED|ALLOCATED)", self.scontrol("show", "node", self.node)),
                      60, "slurmd to register the node idle")

    def _write_conf(self, munge_socket: str) -> None:
        node_line = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        node_line = node_line.splitlines()[0].strip()  # NodeName=... CPUs=... RealMemory=...
        self.node = node_line.split()[0].split("=", 1)[1]
        ctld_port, d_port = _free_ports(2)
        p = self._path
        conf = f"""
ClusterName=pytest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={p('state')}
SlurmdSpoolDir={p('spool', '%n')}
SlurmctldPidFile={p('slurmctld.pid')}
SlurmdPidFile={p('slurmd.pid')}
SlurmctldLogFile={p('log', 'slurmctld.log')}
SlurmdLogFile={p('log', 'slurmd.log')}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
SlurmctldTimeout=60
SlurmdTimeout=60
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(conf.lstrip())

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self._path("log", f"{name}.stdout"), "ab")
        self.daemons.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True))
        time.sleep(0.2)
        if self.daemons[-1].poll() is not None:
            raise RuntimeError(f"{name} exited {self.daemons[-1].returncode} at start; see {self.root}/log")

    def _ok(self, cmd: list[str]) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True, timeout=30).returncode == 0

    def scontrol(self, *args: str) -> str:
        proc = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=30)
        return proc.stdout + proc.stderr

    def sbatch(self, args: list[str], env: dict, cwd: str) -> str:
        """Submit; returns the job id."""
        proc = subprocess.run(["sbatch", "--parsable", *args], env={**env, "SLURM_CONF": self.conf}, cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr}")
        job = proc.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict:
        """scontrol show job as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        out = self.scontrol("show", "job", "-o", job)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def job_state(self, job: str) -> str:
        return self.job(job).get("JobState", "")

    def wait_for(self, cond: Callable[[], object], timeout: float, what: str = "condition", every: float = 0.5):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            value = cond()
            if value:
                return value
            time.sleep(every)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; logs in {self.root}/log")

    def stop(self) -> None:
        """Cancel our jobs, wait for their steps to end, stop the daemons (by pid), kill stray job processes."""
        if self.jobs and self.daemons and all(d.poll() is None for d in self.daemons):
            subprocess.run(["scancel", *self.jobs], env=self.env, capture_output=True, timeout=30)
            try:
                self.wait_for(lambda: not self._job_pids(), 45, "jobs to end")
            except TimeoutError:
                pass
        for d in reversed(self.daemons):
            if d.poll() is None:
                d.send_signal(signal.SIGTERM)
        for d in reversed(self.daemons):
            try:
                d.wait(20)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait(10)
        for pid in self._job_pids():  # slurmstepd and tasks outliving slurmd
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.daemons = []

    def _job_pids(self) -> list[int]:
        """Processes whose environment names this cluster's slurm.conf (job shells, steps, ranks)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
        daemon_pids = {d.pid for d in self.daemons}
        return [p for p in pids if p not in daemon_pids]
