"""A throwaway Slurm cluster on this machine, for tests: munged, slurmctld and slurmd in a private directory on
non-default ports, started in the foreground so that teardown stops them by pid.

    with SlurmCluster.start(workdir, nodes=2) as cluster:
        job = cluster.sbatch(["--nodes=2", "slurm/train_coco.sh", "train.max_steps=40"], env=..., cwd=REPO)
        cluster.wait_for(lambda: cluster.job_state(job) == "COMPLETED", 120)

One node is this machine on 127.0.0.1. Several nodes each get a network namespace of their own, with a veth
holding the node's address on a bridge that holds the controller's, and one `slurmd -N nodeK` inside; ranks on
different nodes then talk over that network, as on a real cluster. Each slurmd also has a mount namespace with a
hosts file of the cluster's bound over /etc/hosts, so that node names resolve. (`ip netns exec` would do that
from /etc/netns/, but it mounts a fresh /sys, where slurmd finds no cgroup hierarchy and refuses to start.)
munged's socket is a pathname, which every network namespace reaches.
"""
import ipaddress
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
IFNAME = "slurmnet0"  # every node's interface has this name in its namespace, so one GLOO_SOCKET_IFNAME fits all
SUBNETS = ipaddress.ip_network("10.233.0.0/16")  # private; each cluster takes a /24 no interface or route uses


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


def netns_problem() -> Optional[str]:
    """None when nodes can have network namespaces here (a bridge, a namespace, a veth into it), else why not."""
    if os.geteuid() != 0:
        return "a node's network namespace needs root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed: no network namespaces for a second node"
    tag = f"slprobe{os.getpid()}"
    steps = [["link", "add", tag, "type", "bridge"], ["netns", "add", tag],
             ["link", "add", f"{tag}v", "type", "veth", "peer", "name", IFNAME, "netns", tag]]
    try:
        for args in steps:
            proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
            if proc.returncode != 0:
                return f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}"
        return None
    finally:  # deleting the namespace deletes the veth in it
        _ip_quiet("netns", "del", tag)
        _ip_quiet("link", "del", tag)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _ip_quiet(*args: str) -> None:
    subprocess.run(["ip", *args], capture_output=True, timeout=30)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of SUBNETS that overlaps no address or route of this machine (another test cluster's included)."""
    out = "".join(subprocess.run(["ip", "-4", *args], capture_output=True, text=True, timeout=30).stdout
                  for args in (["-o", "addr"], ["route"]))
    used = [ipaddress.ip_network(a, strict=False) for a in re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?", out)]
    subnets = list(SUBNETS.subnets(new_prefix=24))
    start = os.getpid() % len(subnets)  # concurrent test sessions start their search apart
    for net in subnets[start:] + subnets[:start]:
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError(f"every /24 of {SUBNETS} is in use here")


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
    def __init__(self, root: str, nodes: int = 1, cpus: Optional[int] = None):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.daemons: list[subprocess.Popen] = []
        self.jobs: list[str] = []
        self.size, self.cpus = nodes, cpus
        self.nodes: dict[str, tuple[str, Optional[str]]] = {}  # node name -> (address, network namespace)
        self.ctld_addr = "127.0.0.1"
        self.links: list[str] = []  # what teardown deletes: veths, then the bridge; then the namespaces
        self.namespaces: list[str] = []

    @classmethod
    def start(cls, root: str, nodes: int = 1, cpus: Optional[int] = None) -> "SlurmCluster":
        """nodes > 1 needs netns_problem() to be None; cpus: CPUs each node declares (default: this machine's)."""
        os.makedirs(root, mode=0o700, exist_ok=True)
        cluster = cls(root, nodes, cpus)
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
        hardware = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        hardware = dict(kv.split("=", 1) for kv in hardware.splitlines()[0].split())  # NodeName, CPUs, ...
        host = hardware.pop("NodeName")
        if self.size == 1:
            self.nodes = {host: ("127.0.0.1", None)}
        else:
            self._start_network()
        self._write_conf(sock, host, hardware)
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-c", "-f", self.conf])
        self.wait_for(lambda: self._ok(["scontrol", "ping"]) and "UP" in self.scontrol("ping"), 60, "slurmctld")
        for name, (_, ns) in self.nodes.items():
            os.makedirs(self._path("spool", name), mode=0o700, exist_ok=True)
            self._spawn(f"slurmd-{name}", [*self._enter(ns), _sbin("slurmd"), "-D", "-f", self.conf, "-N", name])
        for name in self.nodes:
            self.wait_for(lambda n=name: re.search(r"State=(IDLE|MIXED|ALLOCATED)", self.scontrol("show", "node", n)),
                          60, f"slurmd to register {name} idle")

    def _start_network(self) -> None:
        """The controller's address on a bridge here; node K in namespace slurmPID-nodeK, a veth into the bridge."""
        net = _free_subnet()
        tag = str(os.getpid())
        bridge = f"slbr{tag}"
        _ip("link", "add", bridge, "type", "bridge")
        self.links.append(bridge)
        self.ctld_addr = str(net[1])
        _ip("addr", "add", f"{self.ctld_addr}/{net.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        self.nodes = {f"node{k}": (str(net[10 + k]), f"slurm{tag}-node{k}") for k in range(1, self.size + 1)}
        # The nodes' names first; then this machine's own lines, so its hostname resolves as it does here
        with open("/etc/hosts") as f, open(self._path("hosts"), "w") as out:
            out.write("".join(f"{a} {n}\n" for n, (a, _) in self.nodes.items()) + f.read())
        for k, (addr, ns) in enumerate(self.nodes.values(), 1):
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            veth = f"slv{tag}n{k}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", IFNAME, "netns", ns)
            self.links.insert(0, veth)
            _ip("link", "set", veth, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/{net.prefixlen}", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def _enter(self, ns: Optional[str]) -> list[str]:
        """The command prefix that runs a node's daemon in its network namespace, with the cluster's hosts file."""
        if ns is None:
            return []
        bind = 'mount --bind "$0" /etc/hosts && exec "$@"'  # unshare makes the mount private to this daemon
        return ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "sh", "-c", bind, self._path("hosts")]

    def _write_conf(self, munge_socket: str, host: str, hardware: dict) -> None:
        if self.cpus:  # more than the machine has: with config_overrides, slurmd takes the declared count
            hardware.update(CPUs=self.cpus, Boards=1, SocketsPerBoard=1, CoresPerSocket=self.cpus, ThreadsPerCore=1)
        spec = " ".join(f"{k}={v}" for k, v in hardware.items())
        node_lines = "\n".join(f"NodeName={n} NodeAddr={a} {spec} State=UNKNOWN" for n, (a, _) in self.nodes.items())
        ctld_port, d_port = _free_ports(2)
        p = self._path
        conf = f"""
ClusterName=pytest
SlurmctldHost={host}({self.ctld_addr})
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
SlurmdPidFile={p('slurmd-%n.pid')}
SlurmctldLogFile={p('log', 'slurmctld.log')}
SlurmdLogFile={p('log', 'slurmd-%n.log')}
SlurmdParameters=config_overrides
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
{node_lines}
PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
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

    def ranks(self, job: str) -> dict[int, tuple[str, str]]:
        """{RANK: (SLURMD_NODENAME, network namespace)} of the job's running processes that have a RANK."""
        found = {}
        for pid, env in self._environs():
            if env.get("SLURM_JOB_ID") == job and "RANK" in env:
                try:
                    found[int(env["RANK"])] = (env.get("SLURMD_NODENAME", ""), os.readlink(f"/proc/{pid}/ns/net"))
                except OSError:  # it has just exited
                    continue
        return found

    def wait_for(self, cond: Callable[[], object], timeout: float, what: str = "condition", every: float = 0.5):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            value = cond()
            if value:
                return value
            time.sleep(every)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; logs in {self.root}/log")

    def stop(self) -> None:
        """Cancel our jobs, wait for their steps to end, stop the daemons (by pid), kill stray job processes, then
        delete the nodes' network."""
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
        self._stop_network()

    def _stop_network(self) -> None:
        for link in self.links:  # deleting a veth's end here deletes its peer in the namespace
            _ip_quiet("link", "del", link)
        for ns in self.namespaces:
            _ip_quiet("netns", "del", ns)
        self.links, self.namespaces = [], []

    def _environs(self):
        """(pid, environment) of every other process that can be read."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    pairs = [kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv]
            except OSError:
                continue
            yield int(entry), {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}

    def _job_pids(self) -> list[int]:
        """Processes whose environment names this cluster's slurm.conf (job shells, steps, ranks)."""
        daemon_pids = {d.pid for d in self.daemons}
        return [pid for pid, env in self._environs() if env.get("SLURM_CONF") == self.conf and pid not in daemon_pids]
