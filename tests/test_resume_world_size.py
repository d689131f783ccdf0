"""Resuming on another number of ranks: a step's draws and data do not depend on the layout (core.draws,
core.data.StepSampler), and a checkpoint of N ranks resumes on M through DeepSpeed's universal format.

Tolerance of the end-to-end comparisons: a run on 2 ranks averages the two halves' gradients in an all-reduce where
one rank sums the whole batch, so float32 sums are taken in another order (~1 ulp each) and compound over the steps;
measured here at <= 2.4e-7 on the losses (about 1.3) and 2.1e-7 on the EMA weights after 6 steps. A lost optimiser
state (Adam moments zeroed at the resume) moves the next losses by 2e-2 and the EMA by 8e-5, far outside.
"""
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_train
from core.checkpoint import list_checkpoints, reshards, to_universal
from core.data import StepSampler
from core.draws import RowDraws, as_draws, step_generator
from core.engine import build_ds_config
from core.logging import read_metrics

LOSS_RTOL = 1e-5  # float32 reduction order over 6 steps, with room: measured <= 2e-7 relative
EMA_ATOL = 2e-6  # measured 2.1e-7
# The post-hoc EMA's short profile (sigma_rel 0.05) after 6 steps is close to the raw weights, where Adam's division
# by sqrt(v) magnifies ulp-level gradient differences: measured 3.6e-6 (ZeRO-2 run), 1.3e-7 (ZeRO-3 run)
PHEMA_ATOL = 2e-5


# ---------------------------------------------------------------------------------------------------- the layout


def _global_stream(world_size: int, step: int, global_batch: int = 12, n: int = 10) -> list:
    """Every rank's (index, position) draws of `step`, rank by rank: what the global batch of that step reads."""
    out = []
    for rank in range(world_size):
        it = iter(StepSampler(n, global_batch, world_size, rank, seed=3, start_step=step))
        out += [next(it) for _ in range(global_batch // world_size)]
    return out


@pytest.mark.parametrize("step", [0, 1, 7])
def test_the_data_of_a_step_is_the_same_on_any_number_of_ranks(step):
    one = _global_stream(1, step)
    assert one == _global_stream(2, step) == _global_stream(3, step) == _global_stream(4, step)
    assert [p for _, p in one] == list(range(12 * step, 12 * (step + 1)))  # consecutive stream positions
    assert one != _global_stream(1, step + 1)


def test_row_draws_of_any_split_equal_the_whole_batch_draws():
    whole = RowDraws(step_generator(0, 5, torch.device("cpu")), 0, 8)
    noise, t, s = whole.randn((8, 3, 2, 2), "cpu"), whole.rand((8,), "cpu"), whole.randint(1000, (8,), "cpu")
    for micro in (1, 2, 4):  # e.g. 2 ranks x 2 micro-batches of 2
        parts = [RowDraws(step_generator(0, 5, torch.device("cpu")), start, 8) for start in range(0, 8, micro)]
        drawn = [(d.randn((micro, 3, 2, 2), "cpu"), d.rand((micro,), "cpu"), d.randint(1000, (micro,), "cpu"))
                 for d in parts]
        assert torch.equal(torch.cat([a for a, _, _ in drawn]), noise)
        assert torch.equal(torch.cat([b for _, b, _ in drawn]), t) and torch.equal(torch.cat([c for *_, c in drawn]), s)
    assert not torch.equal(RowDraws(step_generator(0, 6, torch.device("cpu")), 0, 8).randn((8, 3, 2, 2), "cpu"), noise)
    with pytest.raises(ValueError, match="rows 6..9 are outside a batch of 8"):
        RowDraws(torch.Generator(), 6, 8).randn((4,), "cpu")


def test_a_plain_generator_draws_exactly_its_own_torch_draws():
    d = as_draws(torch.Generator().manual_seed(4))
    ref = torch.Generator().manual_seed(4)
    assert torch.equal(d.randn((3, 2), "cpu"), torch.randn((3, 2), generator=ref))
    assert torch.equal(d.rand((5,), "cpu"), torch.rand(5, generator=ref))
    assert torch.equal(d.randint(7, (5,), "cpu"), torch.randint(0, 7, (5,), generator=ref))
    assert as_draws(d) is d


def test_the_engine_loads_a_universal_checkpoint_only_when_resharding(tmp_path):
    from omegaconf import OmegaConf

    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 2}, "checkpoint": {"tag_validation": "Warn"}}')
    train = OmegaConf.create({"ds_config": str(ds_json), "global_batch": 8, "micro_batch": 0, "grad_clip": 1.0})
    assert build_ds_config(train, 2)["checkpoint"] == {"tag_validation": "Warn"}
    assert build_ds_config(train, 2, load_universal=True)["checkpoint"] == {"tag_validation": "Warn",
                                                                           "load_universal": True}


def test_a_failed_conversion_names_the_checkpoint_and_leaves_nothing(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a pickle")
    with pytest.raises(RuntimeError, match=f"converting {ckpt} to DeepSpeed's universal format failed"):
        to_universal(str(ckpt))
    universal = tmp_path / "run" / "checkpoints" / "universal"
    assert not universal.exists() or os.listdir(universal) == []  # no partial conversion
    assert os.listdir(ckpt) == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def test_only_a_checkpoint_of_another_number_of_ranks_reshards(tmp_path):
    (tmp_path / "state.json").write_text('{"step": 2, "world_size": 2}')
    assert reshards(str(tmp_path), 1) and reshards(str(tmp_path), 4) and not reshards(str(tmp_path), 2)
    (tmp_path / "state.json").write_text('{"step": 2}')  # from before world sizes were recorded: as saved
    assert not reshards(str(tmp_path), 1)


# ---------------------------------------------------------------------------------------------- end to end


def _assert_same_run(run, ref, last_step: int) -> None:
    got, want = read_metrics(run), read_metrics(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, last_step + 1))
    for g, w in zip(got, want):
        for key in ("loss", "denoise_loss", "repa_loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=LOSS_RTOL), (g["step"], key, g[key], w[key])
    tag = f"step_{last_step:08d}"
    files = {os.path.join("checkpoints", tag, "ema.safetensors"): EMA_ATOL,  # the EMA, the post-hoc EMA's snapshots
             **{os.path.join("phema", f"phema-{last_step:08d}-{s}.safetensors"): PHEMA_ATOL for s in ("0.050", "0.100")}}
    for path, atol in files.items():
        a, b = (load_file(os.path.join(d, path)) for d in (run, ref))
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"{path}: max difference {worst:.2e}")
        assert worst <= atol, (path, worst)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run on one rank."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_train(_args(run, 6, "zero2_fp32"))
    return run


def _args(run, max_steps: int, zero: str) -> list[str]:
    return ["--config", os.path.join("configs", "debug", "class_cond_tiny.yaml"), f"run.dir={run}",
            f"train.max_steps={max_steps}", "train.ckpt_every=2", "train.log_every=1", "train.num_workers=0",
            "data.synthetic_samples=64", "train.tensorboard=false", f"train.ds_config=ds_configs/{zero}.json",
            "train.phema_stds=[0.05,0.1]", "train.phema_every=2"]


@pytest.mark.parametrize("zero,ranks", [("zero2_fp32", (2, 1, 2)), ("zero3_fp32", (1, 2))])
def test_a_run_resumed_on_another_number_of_ranks_continues_the_same_trajectory(tmp_path, reference, zero, ranks):
    """The 6 steps in equal segments on alternating numbers of ranks (ZeRO-2: 2 -> 1 -> 2, steps 1-2, 3-4, 5-6;
    ZeRO-3: 1 -> 2, steps 1-3, 4-6), each resume through the universal format, equal an uninterrupted run within the
    float reduction-order tolerance: losses, EMA and the post-hoc EMA's snapshots (under ZeRO-3 each rank keeps
    only its partition of the averages)."""
    run = tmp_path / "run"
    ends = [6 * (segment + 1) // len(ranks) for segment in range(len(ranks))]
    for segment, n in enumerate(ranks):
        proc = run_train(_args(run, ends[segment], zero), launcher="torchrun" if n > 1 else "python", ranks=n)
        if segment:
            out = proc.stdout + proc.stderr
            at = ends[segment - 1]
            assert f"was written by {ranks[segment - 1]} rank(s), this run has {n}: converting" in out, out[-3000:]
            assert f"resumed from {run / 'checkpoints' / f'step_{at:08d}'} at step {at}" in out
        # the next save removes the converted copy: resumes start from the newest checkpoint
        assert not (run / "checkpoints" / "universal").exists()
    assert [s for s, _ in list_checkpoints(run)][-1] == 6
    _assert_same_run(run, reference, 6)
