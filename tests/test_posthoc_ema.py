"""Post-hoc EMA (Karras et al. 2024, arXiv 2312.02696): the power-function EMA against its closed form, the
sigma_rel <-> gamma conversion, the reconstruction against directly tracked EMAs, snapshots, resume and refusals."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from class_cond.task import ClassCondConfig
from conftest import TINY, run_train
from core import checkpoint as ckpt
from core.config import ConfigError, config_changes, load_config, to_dict
from core.dist import DistContext
from core.ema import EMA, PowerEMA, gamma_to_sigma_rel, sigma_rel_to_gamma, snapshot_every, update_averages
from core.posthoc_ema import ReconstructionError, main, reconstruct, solve_coefficients, step_weights

CPU = DistContext(0, 1, 0, torch.device("cpu"))


class Vector(torch.nn.Module):
    """One trainable vector and a buffer (a snapshot carries buffers unchanged)."""

    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))
        self.register_buffer("pos", torch.arange(3.0))


def _cfg(tmp_path, *overrides):
    return load_config(ClassCondConfig, TINY, [f"run.dir={tmp_path / 'run'}", *overrides])


# -------------------------------------------------------------------------------------------------- the formulas


def test_sigma_rel_and_gamma_convert_as_edm2():
    # edm2's two profiles: gamma 16.97 and 6.94 (the paper's Sec. 3.1 numbers)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.9722, abs=1e-4)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.9372, abs=1e-4)
    for sigma in (0.01, 0.05, 0.08, 0.1, 0.2, 0.28):
        gamma = sigma_rel_to_gamma(sigma)
        # Eq. 123, as edm2 writes it: sqrt((g + 1) / (g + 2)**2 / (g + 3))
        assert math.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3)) == pytest.approx(sigma, rel=1e-12)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma, rel=1e-12)
    # the width is the profile's own: std of tau ~ (g + 1) tau**g on [0, 1]
    g = sigma_rel_to_gamma(0.08)
    tau = (np.arange(200_000) + 0.5) / 200_000
    p = (g + 1) * tau ** g / 200_000
    mean = (p * tau).sum()
    assert math.sqrt((p * (tau - mean) ** 2).sum()) == pytest.approx(0.08, rel=1e-4)
    for bad in (0.0, -0.1, 0.2887, 0.3):
        with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0.2887\)"):
            sigma_rel_to_gamma(bad)


def test_power_ema_update_matches_its_closed_form():
    """Weights e_k at step k: the profile's shadow after T steps is the weight each step's weights carry."""
    T = 400
    module = Vector(T)
    ema = EMA(module, decay=0.9)
    power = PowerEMA(ema, [0.05, 0.1])
    for k in range(1, T + 1):
        with torch.no_grad():
            module.w.zero_()
            module.w[k - 1] = 1.0
        update_averages(module, ema, power, k)
        if k == 1:  # beta_1 = 0: the average starts at the weights of step 1
            assert all(s["w"][0].item() == 1.0 and s["w"][1:].abs().max() == 0 for s in power.shadows)
    for sigma, gamma, shadow in zip(power.sigma_rels, power.gammas, power.shadows):
        w = shadow["w"].double().numpy()
        assert w.sum() == pytest.approx(1.0, abs=1e-5)
        closed = step_weights(T, gamma, T)  # (k**(g+1) - (k-1)**(g+1)) / T**(g+1)
        assert closed.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(w, closed, atol=2e-7)
        k = np.arange(T // 2, T + 1)  # the power profile (g + 1) tau**g / T**(g + 1) at the step's middle
        np.testing.assert_allclose(w[k - 1], (gamma + 1) * (k - 0.5) ** gamma / T ** (gamma + 1), rtol=2e-3)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma)


def test_update_averages_leaves_the_classic_ema_bit_identical():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    ema_a, ema_b = EMA(a, 0.99), EMA(b, 0.99)
    power = PowerEMA(ema_b, [0.05])
    for t in range(1, 6):
        with torch.no_grad():
            for m in (a, b):
                m.weight.add_(torch.full_like(m.weight, 0.1 * t)).sin_()
        ema_a.update(a)
        update_averages(b, ema_b, power, t)
    assert all(torch.equal(ema_a.shadow[n], ema_b.shadow[n]) for n in ema_a.shadow)


def test_snapshot_cadence_is_edm2s_8_mi_images_in_steps():
    assert snapshot_every(0, 2048) == 4096  # edm2: batch 2048, a snapshot every 8 Mi images
    assert snapshot_every(0, 256) == 32768  # REPA's batch 256: the same images between snapshots
    assert snapshot_every(0, 1 << 24) == 1 and snapshot_every(7, 256) == 7


# ------------------------------------------------------------------------------------------- the reconstruction


def _track(run_dir, T: int, every: int, sigma_rels, seed: int = 0, dim: int = 64) -> tuple[PowerEMA, np.ndarray]:
    """A synthetic parameter trajectory (a random walk with drift, dim coordinates) over T steps, its power EMAs
    `sigma_rels` tracked by core.ema, snapshots every `every` steps written by the checkpoint module."""
    g = torch.Generator().manual_seed(seed)
    path = torch.cumsum(torch.randn(T, dim, generator=g) * 0.1 + 0.02, 0)
    module = Vector(dim)
    ema = EMA(module, 0.99)
    power = PowerEMA(ema, sigma_rels)
    for k in range(1, T + 1):
        with torch.no_grad():
            module.w.copy_(path[k - 1])
        update_averages(module, ema, power, k)
        if k % every == 0:
            ckpt.save_snapshots(str(run_dir), module, power, k, CPU)
    return power, path.double().numpy()


def test_reconstruction_equals_a_directly_tracked_power_ema(tmp_path):
    """The EMA of sigma_rel 0.08 rebuilt from snapshots of 0.05 and 0.1 every 50 of 1000 steps equals the one
    tracked at 0.08. Tolerance: the reconstruction weighs step k's weights by w_hat_k = sum_i x_i w_k(t_i, g_i)
    (the closed form), the direct one by w_k; both sum to 1, so per coordinate |error| <= 1/2 ||w_hat - w||_1
    (max - min of the trajectory), plus float32 round-off of the tracking; ||w_hat - w||_1 is 0.2% here."""
    T, every = 1000, 50
    power, path = _track(tmp_path, T, every, [0.05, 0.1, 0.08])
    weights, record = reconstruct(str(tmp_path), 0.08, use=[0.05, 0.1])
    assert record["step"] == T and len(record["snapshots"]) == 2 * T // every
    assert sum(record["coefficients"]) == pytest.approx(1.0)
    w_hat = sum(x * step_weights(t, sigma_rel_to_gamma(s), T)
                for x, (t, s) in zip(record["coefficients"], record["snapshots"]))
    w = step_weights(T, sigma_rel_to_gamma(0.08), T)
    l1 = np.abs(w_hat - w).sum()
    assert l1 < 0.005 and record["fit_error"] < 0.005
    direct = power.shadows[2]["w"].double().numpy()
    error = np.abs(weights["w"].double().numpy() - direct)
    bound = 0.5 * l1 * (path.max(0) - path.min(0)) + 1e-5
    assert (error <= bound).all(), (error.max(), bound.min())
    # and far nearer the direct EMA than either input profile is
    spread = np.abs(power.shadows[0]["w"].double().numpy() - power.shadows[1]["w"].double().numpy())
    assert error.max() < 0.002 * spread.mean()  # measured 0.0003
    assert torch.equal(weights["pos"], torch.arange(3.0))  # buffers copied, not averaged
    # the snapshots themselves: full state, step and width recorded
    snap = ckpt.list_snapshots(str(tmp_path))
    assert snap[0][:2] == (every, 0.05) and len(snap) == 3 * T // every
    assert set(load_file(snap[0][2])) == {"w", "pos"}


def test_reconstruction_at_an_earlier_step_and_of_other_widths(tmp_path):
    T, every = 600, 30
    power, _ = _track(tmp_path, T, every, [0.05, 0.1])
    # at an earlier snapshot step, the reconstruction of a kept width returns that snapshot (coefficient 1)
    weights, record = reconstruct(str(tmp_path), 0.1, step=300)
    assert record["step"] == 300 and max(s for s, _ in record["snapshots"]) == 300
    assert torch.allclose(weights["w"], load_file(ckpt.snapshot_path(str(tmp_path), 300, 0.1))["w"], atol=1e-5)
    # narrower and wider than the kept ones: the profile fit still within a few per cent (the method's reach)
    for sigma, worst in ((0.03, 0.05), (0.15, 0.02)):  # measured 2.6% and 0.6%
        assert reconstruct(str(tmp_path), sigma)[1]["fit_error"] < worst


def test_solve_coefficients_is_exact_for_a_kept_profile():
    x, err = solve_coefficients([10, 20, 10, 20], [sigma_rel_to_gamma(s) for s in (0.05, 0.05, 0.1, 0.1)], 20,
                                sigma_rel_to_gamma(0.1))
    np.testing.assert_allclose(x, [0, 0, 0, 1], atol=1e-9)
    assert err < 1e-6


def test_reconstruction_refuses_what_it_cannot_do(tmp_path, capsys):
    run = str(tmp_path)
    with pytest.raises(ReconstructionError, match=r"has no post-hoc EMA snapshots .* train.phema_stds=\[0.05,0.1\]"):
        reconstruct(run, 0.08)
    _track(tmp_path, 20, 10, [0.05])
    with pytest.raises(ReconstructionError, match=r"--sigma-rel 0.3 is out of range: .* \(0, 0.2887\)"):
        reconstruct(run, 0.3)
    with pytest.raises(ReconstructionError, match=r"--sigma-rel 0.0 is out of range"):
        reconstruct(run, 0.0)
    with pytest.raises(ReconstructionError, match=r"too few snapshots: 1 at or before step 10 .* at least 2"):
        reconstruct(run, 0.08, step=10)
    with pytest.raises(ReconstructionError, match=r"--step 15 is not a snapshot step .* steps 10 \.\. 20"):
        reconstruct(run, 0.08, step=15)
    with pytest.raises(ReconstructionError, match=r"no snapshots of sigma_rel \[0.1\]; it has \[0.05\]"):
        reconstruct(run, 0.08, use=[0.1])
    with pytest.raises(SystemExit, match=r"error: .*no complete checkpoint"):  # the command names the problem
        main([run, "--sigma-rel", "0.08", "--out", str(tmp_path / "out.safetensors")])


# ---------------------------------------------------------------------------------------- checkpoints, resume


class _Engine:
    """What the checkpointer needs of a DeepSpeed engine: the module, and its weights saved and loaded."""

    def __init__(self, module):
        self.module = module

    def save_checkpoint(self, save_dir, tag, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save(self.module.state_dict(), os.path.join(save_dir, tag, "model.pt"))

    def load_checkpoint(self, root, tag):
        self.module.load_state_dict(torch.load(os.path.join(root, tag, "model.pt")))
        return os.path.join(root, tag), {}


def _loop(cfg, start_from: str | None, stop_after: int):
    """The training loop's EMA and checkpoint calls (core.trainer._train) over a toy 'optimiser step' that moves
    the weights by a step-seeded amount, from a checkpoint or from scratch, up to step `stop_after`."""
    torch.manual_seed(0)
    module = Vector(32)
    engine, ema = _Engine(module), EMA(module, cfg.train.ema_decay)
    phema = PowerEMA(ema, cfg.train.phema_stds) if cfg.train.phema_stds else None
    checkpointer = ckpt.Checkpointer(cfg, CPU, SimpleNamespace(received=None))
    state = ckpt.RunState("hash", 1, {"task": "t", "kwargs": {}}, {"shape": [1]}, {})
    if start_from is not None:
        state = checkpointer.restore(start_from, engine, ema, state, phema)
    while state.step < stop_after:
        with torch.no_grad():
            module.w.add_(torch.randn(32, generator=torch.Generator().manual_seed(state.step)))
        update_averages(module, ema, phema, state.step + 1)
        state.step += 1
        checkpointer.step_done(engine, ema, state, state.step >= cfg.train.max_steps, phema)


def _metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _files(root) -> dict:
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


def test_resume_with_posthoc_ema_is_bit_exact(tmp_path):
    common = ("train.max_steps=10", "train.ckpt_every=4", "train.phema_stds=[0.05,0.1]", "train.phema_every=3",
              "run.keep_last=5")
    straight = load_config(ClassCondConfig, TINY, [f"run.dir={tmp_path / 'a'}", *common])
    _loop(straight, None, 10)
    split = load_config(ClassCondConfig, TINY, [f"run.dir={tmp_path / 'b'}", *common])
    _loop(split, None, 7)  # killed after step 7: its newest checkpoint is step 4, snapshots 3 and 6 are written
    assert ckpt.latest_checkpoint(split.run.dir).endswith("step_00000004")
    resume = ckpt.find_resume(split)
    _loop(split, resume, 10)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b)  # the same files
    snapshots = sorted(k for k in a if k.startswith("phema" + os.sep))
    assert [os.path.basename(k) for k in snapshots] == [f"phema-{s:08d}-{std}.safetensors" for s in (3, 6, 9, 10)
                                                       for std in ("0.050", "0.100")]
    for name in snapshots + [os.path.join("checkpoints", "step_00000010", f) for f in ("phema.safetensors",
                                                                                        "ema.safetensors")]:
        ta, tb = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name  # the same bits
        assert _metadata(tmp_path / "a" / name) == _metadata(tmp_path / "b" / name)  # the same step and width
    state = load_file(tmp_path / "b" / "checkpoints" / "step_00000010" / "phema.safetensors")
    assert set(state) == {"0/w", "1/w"}


def test_resume_refuses_turning_posthoc_ema_on_or_changing_it_mid_run(tmp_path):
    off = _cfg(tmp_path, "train.max_steps=4", "train.ckpt_every=4")
    _loop(off, None, 4)
    with pytest.raises(ConfigError, match=r"step_00000004 was written with post-hoc EMA off, and this run has "
                       r"train.phema_stds=\[0.05, 0.1\]: .* cannot start or change width mid-run"):
        ckpt.find_resume(_cfg(tmp_path, "train.phema_stds=[0.05,0.1]", "run.allow_config_change=true"))
    on = _cfg(tmp_path / "on", "train.max_steps=4", "train.ckpt_every=4", "train.phema_stds=[0.05,0.1]")
    _loop(on, None, 4)
    with pytest.raises(ConfigError, match=r"written with train.phema_stds=\[0.05, 0.1\], and this run has "
                       r"train.phema_stds=\[0.08\]"):
        ckpt.find_resume(_cfg(tmp_path / "on", "train.phema_stds=[0.08]", "run.allow_config_change=true"))
    with pytest.raises(ConfigError, match=r"different config \(train.phema_stds: \[0.05, 0.1\] -> \[0.08\]"):
        ckpt.find_resume(_cfg(tmp_path / "on", "train.phema_stds=[0.08]"))
    # the cadence is bookkeeping: a resume may change it
    assert ckpt.find_resume(_cfg(tmp_path / "on", "train.phema_stds=[0.05,0.1]", "train.phema_every=7"))


def test_off_by_default_the_checkpoint_holds_what_it_did(tmp_path):
    cfg = _cfg(tmp_path, "train.max_steps=4", "train.ckpt_every=2")
    assert cfg.train.phema_stds == [] and cfg.train.phema_every == 0
    _loop(cfg, None, 4)
    files = _files(tmp_path / "run")
    assert not any(k.startswith("phema") for k in files)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints" / "step_00000004")) == [
        "config.yaml", "ema.safetensors", "model.pt", "rng_rank0.json", "state.json"]
    # a run recorded before these keys existed resumes: they count only away from their defaults
    saved = to_dict(cfg)
    del saved["train"]["phema_stds"], saved["train"]["phema_every"]
    assert config_changes(cfg, saved) == []


@pytest.mark.parametrize("override,message", [
    ("train.phema_stds=[0.3]", r"train.phema_stds\[0\]=0.3 is not a relative EMA width in \(0, 0.2887\) "
                               r"\(edm2 keeps 0.05 and 0.1\)"),
    ("train.phema_stds=[0.05,0]", r"train.phema_stds\[1\]=0.0 is not a relative EMA width"),
    ("train.phema_stds=[0.05,0.0504]", r"train.phema_stds=\[0.05, 0.0504\] must differ at 3 decimals"),
    ("train.phema_every=-1", r"train.phema_every must be >= 0 \(0 = edm2's 8 Mi images in steps\), got -1"),
    ("train.phema_stds=[wide]", r"train.phema_stds\[0\]: expected a number, got 'wide'"),
    ("train.phema_std=[0.05]", r"unknown config key 'train.phema_std' \(did you mean 'phema_stds'\?\)"),
])
def test_config_refuses_bad_posthoc_ema_keys(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, override)


# ---------------------------------------------------------------------------------------------- a tiny run


def test_tiny_run_reconstructs_a_directly_tracked_ema_and_eval_loads_it(tmp_path, tiny_args):
    """A tiny training keeps 0.05 and 0.1 and, for the test, tracks 0.08 directly; the command rebuilds 0.08 from
    the first two much nearer the tracked one than the two kept ones are to each other."""
    from eval.loading import load_eval_model

    run = tmp_path / "run"
    run_train(tiny_args("train.max_steps=24", "train.ckpt_every=24", "train.log_every=24",
                        "train.phema_stds=[0.05,0.1,0.08]", "train.phema_every=2"))
    assert len(ckpt.list_snapshots(str(run))) == 3 * 12
    out = tmp_path / "phema-0.08.safetensors"
    main([str(run), "--sigma-rel", "0.08", "--from", "0.05,0.1", "--out", str(out)])
    rebuilt = load_file(out)
    direct = load_file(ckpt.snapshot_path(str(run), 24, 0.08))
    kept = [load_file(ckpt.snapshot_path(str(run), 24, s)) for s in (0.05, 0.1)]
    assert rebuilt.keys() == direct.keys()
    trained = [k for k in direct if not torch.equal(kept[0][k], kept[1][k])]
    assert len(trained) > 10

    def dist(a, b):
        return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in trained))

    error, spread = dist(rebuilt, direct), dist(kept[0], kept[1])
    record = json.load(open(out.with_suffix(".json")))
    # measured: fit error 0.5%, error 0.0008 of the spread
    assert record["phema"]["fit_error"] < 0.02 and error < 0.01 * spread, (error, spread, record["phema"])
    model, meta = load_eval_model(str(out))  # the export layout: eval.generate --run FILE takes it
    assert meta["step"] == 24 and meta["model"]["task"] == "class_cond"
    assert torch.equal(model.state_dict()["pos_embed"].float(), rebuilt["pos_embed"])
