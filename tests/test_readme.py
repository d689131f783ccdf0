"""Every command in the README's code blocks is either run here as a new user would type it (shortened, with run
directories moved into a temporary directory) or listed in NOT_RUN with the reason; a new command that is
neither fails the test, so the README cannot drift from what works."""
import os
import re
import shlex
import subprocess

from conftest import BIN, REPO, cpu_env

# Commands that need what a CPU test machine lacks, by the start of the command line, with the reason.
NOT_RUN = {
    "make demo": "~8 min; tests/test_demo.py runs the same pipeline shortened",
    "make test": "this suite itself (CI runs it on a clean clone)",
    "python3 -m venv .venv": "the install, which `make test` (CI) performs",
    ".venv/bin/pip install": "the install, which `make test` (CI) performs",
    "deepspeed --num_gpus 8": "8 GPUs and a prepared COCO/ImageNet",
    "accelerate launch -m data_prep": "raw ImageNet/COCO under /data (tests/test_data_prep*.py run the same code)",
    "accelerate launch -m eval": "a trained COCO/ImageNet model and 30K-50K samples (tests/test_eval_*.py)",
    "python -m eval.fid samples/coco_sde": "the COCO samples of the command before it",
    "python -m class_cond.import_repa SiT-XL-2-256.pt": "the official checkpoint (tests/test_eval_import_repa.py)",
    "python -m core.posthoc_ema": "a run trained with train.phema_stds and its snapshots (tests/test_posthoc_ema.py)",
    "sbatch": "a Slurm cluster (tests/test_slurm.py starts one and submits these scripts)",
    "CONFIG=": "a Slurm cluster (tests/test_slurm.py)",
    "HF_HUB_OFFLINE=1": "the weights downloaded to /models (tests/test_user_errors.py: the offline errors)",
    # the variants' tiny presets, trained (longer, on two ranks) by tests/test_variants.py; the README's plain
    # tiny command below runs the same entry point as written
    "python -m core.train --config configs/debug/class_cond_tiny_irepa.yaml": "tests/test_variants.py trains it",
    "python -m core.train --config configs/debug/class_cond_tiny_haste.yaml": "tests/test_variants.py trains it",
    "python -m core.train --config configs/debug/class_cond_tiny_disp.yaml": "tests/test_variants.py trains it",
    "python -m core.train --config configs/debug/class_cond_tiny_reg.yaml": "tests/test_variants.py trains it",
}
# The run directories the README's later commands read, played by runs the earlier commands train.
STAND_INS = {"runs/coco": "t2i_tiny", "runs/x": "tiny"}
TRAIN_SHORT = ["train.max_steps=3", "train.ckpt_every=3", "train.log_every=1", "train.num_workers=0",
               "data.synthetic_samples=64", "train.tensorboard=false"]
TRAIN_ENTRIES = ("t2i/train.py", "class_cond/train.py", "-m core.train", "--module core.train")


def readme_commands() -> list[str]:
    """The command lines of the README's ```bash blocks, continuations joined, comments dropped."""
    text = open(os.path.join(REPO, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def runnable(command: str) -> bool:
    return not any(command.startswith(prefix) for prefix in NOT_RUN)


def as_test_command(command: str) -> list[str]:
    """The README command as typed, with this venv's launchers; training commands get a few steps only, and a
    benchmark suite its baseline only."""
    args = shlex.split(command)
    if args[0] in ("deepspeed", "torchrun"):
        args[0:1] = [os.path.join(BIN, args[0]), "--master_port", str(_free_port())]
    elif args[0] == "python":
        args[0] = os.path.join(BIN, "python")
    if any(e in command for e in TRAIN_ENTRIES):
        args += TRAIN_SHORT
    if "core.bench_suite" in command:  # the suite's first lever only: the other eight are the same code path
        args += ["--only", "baseline"]
    return args


def _free_port() -> int:
    from conftest import free_port

    return free_port()


def test_every_readme_command_is_run_or_has_a_reason():
    commands = readme_commands()
    assert len(commands) > 20, "the README's bash blocks were not found"
    run = [c for c in commands if runnable(c)]
    known = ("deepspeed --num_gpus 2", "torchrun", "python -m core.train", "python -m t2i.sample",
             "python -m eval.report", "python -m core.checkpoint", "python -m core.bench", "python -m core.bench_suite",
             "python -m eval.export_diffusers")
    unknown = [c for c in run if not c.startswith(known)]
    assert not unknown, f"README commands neither run by this test nor listed in NOT_RUN: {unknown}"


def test_readme_cpu_commands_work_as_written(tmp_path):
    """Run them in README order from a fresh working directory holding the repository's code and configs."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("configs", "ds_configs", "core", "class_cond", "t2i", "eval", "data_prep", "slurm"):
        (work / name).symlink_to(os.path.join(REPO, name))
    (work / "runs").mkdir()
    for link, target in STAND_INS.items():
        (work / link).symlink_to(target)
    commands = [c for c in readme_commands() if runnable(c)]
    for command in commands:
        proc = subprocess.run(as_test_command(command), cwd=work, env=cpu_env(OMP_NUM_THREADS="1"),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README command failed: {command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (work / "grid.png").is_file() and (work / "ema.safetensors").is_file()
    assert (work / "outputs" / "bench.jsonl").is_file()
