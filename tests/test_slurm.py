"""slurm/: the sbatch scripts on a real Slurm cluster of two nodes started on this machine (tests/slurm_cluster.py).

The tiny text-to-image run on 2 CPU ranks through `sbatch slurm/train_coco.sh`, twice at once: on one node x 2
ranks and on 2 nodes x 1 rank. USR1 to the batch shell mid-run (`scancel --signal=USR1 --batch`) must make the
trainer checkpoint, the job requeue itself, resume from that step in the appended log and finish with the
configured step count; the two-node run must then match the one-node run's metrics and EMA weights exactly.
"""
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, cpu_env
from slurm_cluster import IFNAME, SlurmCluster, ensure_installed, netns_problem

MAX_STEPS = 30
SIGNAL_AFTER = 3  # steps logged before the signal: the trainer is past start-up and far from the end
TIMEOUT = 240  # seconds per phase; the machine is shared with other test runs
ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")


def test_scripts_are_valid_bash_and_thin():
    scripts = sorted(f for f in os.listdir(os.path.join(REPO, "slurm")) if f.endswith(".sh"))
    assert {"common.sh", "train_coco.sh", "train_imagenet256.sh", "train_imagenet512.sh", "eval_fid.sh",
            "prep_coco.sh"} <= set(scripts)
    for name in scripts:
        path = os.path.join(REPO, "slurm", name)
        assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0, name
        if name == "common.sh":
            continue
        lines = open(path).read().replace("\\\n", " ").splitlines()  # continuation lines joined
        code = [l for l in lines if l.strip() and not l.startswith("#")]
        assert len(code) == 1 and code[0].startswith("exec ") and "slurm/common.sh" in code[0], (name, code)
        config = re.search(r"(configs/\S+\.yaml)", code[0])
        assert config is None or os.path.isfile(os.path.join(REPO, config.group(1))), (name, config)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nodes where network namespaces can be made, else one (the two-node test then skips)."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (munged/slurmd as root, apt-get to install)")
    why = ensure_installed()
    if why:
        pytest.skip(why)
    nodes = 1 if netns_problem() else 2
    # 4 CPUs declared a node: node1 holds the one-node job's 2 ranks and a rank of the two-node job at once
    c = SlurmCluster.start(str(tmp_path_factory.mktemp("slurm_cluster")), nodes=nodes, cpus=4 if nodes > 1 else None)
    yield c
    c.stop()


def job_env(**extra) -> dict:
    """cpu_env for jobs that activate this venv. Its PATH puts the venv's ninja (1.13) before the system one
    (1.11), whose build logs hash commands differently: sharing one extension cache, each would rebuild
    DeepSpeed's shm op (30-80 s on this machine) after the other; a cache of their own builds it once."""
    cache = os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions_venv")
    return cpu_env(VENV=sys.prefix, TORCH_EXTENSIONS_DIR=cache, **extra)


def _logged_steps(run_dir) -> list[int]:
    return [m["step"] for m in _metrics(run_dir)]


def _metrics(run_dir) -> list[dict]:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _checkpoints(run_dir) -> list[int]:
    root = os.path.join(run_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(n[5:]) for n in names if re.fullmatch(r"step_\d{8,}", n))


def _submit(cluster, tmp, layout: list[str], **env) -> dict:
    """`sbatch slurm/train_coco.sh` of the tiny T2I config with these --nodes/--ntasks-per-node flags."""
    run_dir, log = tmp / "run", tmp / "train.out"
    env = job_env(CONFIG="configs/debug/t2i_tiny.yaml", RUN_DIR=str(run_dir), **env)
    # The script's #SBATCH lines ask for 8 GPUs; flags override them: CPU ranks (GPUS_PER_NODE 0 -> gloo).
    job = cluster.sbatch(["--gpus-per-node=0", *layout, "--cpus-per-task=1", "--time=10", f"--output={log}",
                          "slurm/train_coco.sh", f"train.max_steps={MAX_STEPS}", "train.ckpt_every=1000",
                          "train.log_every=1", "train.num_workers=0", "train.tensorboard=false",
                          "data.synthetic_samples=128"], env=env, cwd=REPO)
    return dict(job=job, run_dir=run_dir, log_path=log)


def _follow(cluster, job: str, run_dir, log_path) -> dict:
    """USR1 to the batch shell after SIGNAL_AFTER logged steps, then follow the job to its end; -> dict(job,
    run_dir, log text, the ranks' nodes at the signal, checkpoints at the requeue and at the end, final record)."""
    # The log interleaves the bytes of several processes (tasks, the batch shell), which can split a UTF-8
    # character such as tqdm's bar blocks: decode it leniently.
    text = lambda: log_path.read_text(errors="replace") if log_path.exists() else ""  # noqa: E731
    state, wait = lambda: cluster.job(job), cluster.wait_for  # noqa: E731
    try:
        wait(lambda: len(_logged_steps(run_dir)) >= SIGNAL_AFTER or state().get("JobState") not in
             ("PENDING", "RUNNING", "CONFIGURING"), TIMEOUT, "training to start", every=0.5)
        assert state().get("JobState") == "RUNNING", (state(), text()[-3000:])
        ranks = cluster.ranks(job)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True, timeout=30)
        # The batch shell forwards the signal, the ranks checkpoint and exit 75, the shell requeues the job.
        wait(lambda: int(state().get("Restarts", 0)) >= 1, TIMEOUT, "the job to requeue itself")
        at_requeue = _checkpoints(run_dir)
        # Slurm starts the requeued job itself after its begin-time delay (~120 s): forcing it earlier raced the
        # clean-up of the last run on a quiet machine (the job died at launch, "job credential revoked").
        wait(lambda: state().get("JobState") != "PENDING", TIMEOUT, "the requeued job to start", every=2.0)
        wait(lambda: state().get("JobState") not in ACTIVE, TIMEOUT, "the resumed job to finish")
    except TimeoutError as e:
        raise AssertionError(f"{e}\njob: {state()}\nlog:\n{text()[-5000:]}") from None
    return dict(job=job, run_dir=run_dir, log=text(), ranks=ranks, at_requeue=at_requeue,
                at_end=_checkpoints(run_dir), final=state())


@pytest.fixture(scope="module")
def coco_jobs(cluster, tmp_path_factory):
    """The tiny T2I run on 2 CPU ranks twice at once, so that their requeue delays overlap: "one" on one node x 2
    ranks, "two" (with two nodes) on 2 nodes x 1 rank. Each is USR1'd mid-run and followed to its end."""
    layouts, env = {"one": ["--nodes=1", "--ntasks-per-node=2"]}, {"one": {}}
    if len(cluster.nodes) > 1:
        layouts["two"] = ["--nodes=2", "--ntasks-per-node=1"]
        # gloo binds the address the hostname resolves to (here, as on many hosts, the loopback: its peer on the
        # other node then connects to itself and fails) unless it is named the interface
        env["two"] = {"GLOO_SOCKET_IFNAME": IFNAME}
    submitted = {k: _submit(cluster, tmp_path_factory.mktemp(f"coco_{k}"), v, **env[k]) for k, v in layouts.items()}
    with ThreadPoolExecutor(len(submitted)) as pool:
        futures = {k: pool.submit(_follow, cluster, **v) for k, v in submitted.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.fixture(scope="module")
def coco_job(coco_jobs):
    return coco_jobs["one"]


def _check_requeued_once(run: dict, capsys) -> None:
    """The run checkpointed on USR1, requeued itself once, resumed from that step and finished, each step logged
    once."""
    out, final, saved, run_dir = run["log"], run["final"], run["at_requeue"], run["run_dir"]
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", out)
    saves = re.findall(r"checkpoint (\S+) written in ([\d.]+) s", out)
    with capsys.disabled():
        print(f"\n[slurm] job {run['job']}: {final.get('JobState')} exit {final.get('ExitCode')} after "
              f"{final.get('Restarts')} requeue(s) on {final.get('NodeList')}; checkpoints {saved} at the requeue, "
              f"{run['at_end']} at the end; ranks {run['ranks']} at the signal")
        key = re.compile(r"\[20\S+ (job|USR1|requeu|train).*|(resumed from|checkpoint /\S+ written|training done) .*")
        for line in out.splitlines():  # the evidence, without the progress bars sharing its lines
            if m := key.search(line):
                print(f"[slurm] log: {m.group(0)[:160]}")
    assert saved and SIGNAL_AFTER <= saved[-1] < MAX_STEPS, (saved, out[-3000:])
    assert final.get("JobState") == "COMPLETED" and final.get("ExitCode") == "0:0", (final, out[-3000:])
    assert final.get("Restarts") == "1", final
    assert "USR1: asking the trainer to checkpoint" in out and "training step exited 75" in out, out[-3000:]
    assert f"requeueing job {run['job']}" in out and "(restart 1)" in out, out[-3000:]
    assert resumed == [(os.path.join(str(run_dir), "checkpoints", f"step_{saved[-1]:08d}"), str(saved[-1]))], out
    assert f"training done at step {MAX_STEPS}" in out and "training step exited 0" in out, out[-3000:]
    steps = _logged_steps(run_dir)
    assert steps == list(range(1, MAX_STEPS + 1)), steps  # each step logged once: none lost or redone
    assert run["at_end"][-1] == MAX_STEPS
    assert len(saves) == 2 and all(float(s) < 30 for _, s in saves), saves


def test_train_coco_requeues_on_usr1_and_resumes(coco_job, capsys):
    _check_requeued_once(coco_job, capsys)
    assert sorted(coco_job["ranks"]) == [0, 1] and len(set(coco_job["ranks"].values())) == 1, coco_job["ranks"]


def test_two_nodes_requeue_and_match_one_node(cluster, coco_jobs, capsys):
    """The multi-node path: rendezvous on the first node, one rank per node, one srun, USR1 and the requeue; the
    same global batch on the same world size as the one-node run gives the same numbers, bit for bit."""
    if "two" not in coco_jobs:
        pytest.skip(f"one node only: {netns_problem()}")
    two, one = coco_jobs["two"], coco_jobs["one"]
    _check_requeued_once(two, capsys)
    first = next(iter(cluster.nodes))
    assert re.search(rf"\(restart 0\): 2 node\(s\) x 1 tasks, master {first}:\d+", two["log"]), two["log"][-3000:]
    assert two["final"].get("NodeList") == "node[1-2]", two["final"]
    (node0, net0), (node1, net1) = two["ranks"][0], two["ranks"][1]  # rank -> (SLURMD_NODENAME, netns)
    assert (node0, node1) == ("node1", "node2") and net0 != net1, two["ranks"]
    # Floats compared exactly: gloo sums 2 values and a + b == b + a. The runs were requeued at whichever steps
    # their signals fell, so this also checks that a resume continues the run exactly.
    got, want = _curves(two["run_dir"]), _curves(one["run_dir"])
    assert got == want, next(((a, b) for a, b in zip(got, want) if a != b), None)
    ema = [load_file(os.path.join(r["run_dir"], "checkpoints", f"step_{MAX_STEPS:08d}", "ema.safetensors"))
           for r in (one, two)]
    assert ema[0].keys() == ema[1].keys() and all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    with capsys.disabled():
        print(f"\n[slurm] 2 nodes x 1 rank vs 1 node x 2 ranks: {len(got)} logged steps and {len(ema[0])} EMA "
              f"tensors identical (final loss {got[-1][1]:.6f})")


def _curves(run_dir) -> list[tuple]:
    """(step, loss, denoise_loss, repa_loss, grad_norm) of each logged step."""
    return [(m["step"], m["loss"], m["denoise_loss"], m["repa_loss"], m["grad_norm"]) for m in _metrics(run_dir)]


def test_eval_fid_job_on_the_trained_run(cluster, coco_job, tmp_path, capsys):
    """`sbatch slurm/eval_fid.sh RUN ...`: accelerate launch with 2 CPU processes, proxy FID of the final EMA."""
    run_dir, log = coco_job["run_dir"], tmp_path / "eval.out"
    val = run_dir / "data" / "val"  # the tiny config's generated val split: captions and reference statistics
    job = cluster.sbatch(["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
                          f"--output={log}", "slurm/eval_fid.sh", str(run_dir), "--cond-file", str(val),
                          "--sampler", "ode", "--steps", "4", "--cfg", "2.0", "--num-samples", "8", "--batch-size",
                          "4", "--ref", str(val), "--features", "proxy", "--no-is", "--no-prec-recall",
                          "--out", str(tmp_path / "samples")], env=job_env(), cwd=REPO)
    try:
        cluster.wait_for(lambda: cluster.job(job).get("JobState") not in ACTIVE, TIMEOUT, "the eval job to finish")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{log.read_text(errors='replace')[-5000:] if log.exists() else ''}") from None
    out, final = log.read_text(errors="replace"), cluster.job(job)
    assert final.get("JobState") == "COMPLETED" and final.get("ExitCode") == "0:0", (final, out[-3000:])
    assert "rank 0: 4 images" in out and "rank 1: 4 images" in out, out[-3000:]
    metrics = json.loads((tmp_path / "samples" / "metrics.json").read_text())
    assert metrics["is_proxy"] and metrics["num_samples"] == 8 and metrics["checkpoint_step"] == MAX_STEPS, metrics
    with capsys.disabled():
        print(f"\n[slurm] eval job {job}: {final.get('JobState')}, proxy FID {metrics['proxy_fid']:.3f} of the "
              f"step-{metrics['checkpoint_step']} EMA from 2 accelerate processes")
