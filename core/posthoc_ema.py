"""Post-hoc EMA: the EMA of any relative width sigma_rel, reconstructed after training from the snapshots of the
power-function EMAs a run kept (train.phema_stds; Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", arXiv 2312.02696, Sec. 3.2 and App. C.3).

    python -m core.posthoc_ema RUN --sigma-rel 0.08 [--step N] [--from 0.05,0.1] --out FILE.safetensors

Each snapshot i (taken at step t_i, exponent gamma_i) averages the weights of step tau with the profile
p_i(tau) = (gamma_i + 1) tau**gamma_i / t_i**(gamma_i + 1) on [0, t_i]. The reconstruction is the combination
sum_i x_i snapshot_i whose profile is nearest to the target's in L2 over tau: the normal equations A x = b with
A_ij = <p_i, p_j> and b_i = <p_i, p_target> in closed form (Eq. 151, Algorithm 3), x then scaled to sum to 1. It
writes FILE.safetensors and FILE.json in the layout of `python -m core.checkpoint RUN --out FILE` (an export), so
`eval.generate --run FILE.safetensors` samples from it.
"""
import argparse
import os

import numpy as np
import torch

from core.checkpoint import export_record, latest_checkpoint, list_snapshots, load_weights, phema_dir, write_export
from core.ema import MAX_SIGMA_REL, sigma_rel_to_gamma


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) over tau for power profiles ending at steps t_a, t_b (arrays that
    broadcast): (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * min**(gamma_a + gamma_b + 1) /
    (t_a**(gamma_a + 1) t_b**(gamma_b + 1)), written in ratios of the steps so large steps do not overflow."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    ratio = np.where(t_a < t_b, (t_a / t_b) ** gamma_b, (t_b / t_a) ** gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * ratio / np.maximum(t_a, t_b)


def solve_coefficients(steps, gammas, out_step: int, out_gamma: float) -> tuple[np.ndarray, float]:
    """(x: (n,) coefficients of the n snapshots (steps, gammas) summing to 1, the fit's relative L2 error
    ||sum_i x_i p_i - p_target|| / ||p_target||) for the target profile (out_step, out_gamma)."""
    t, g = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    gram = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    target = profile_inner(t, g, out_step, out_gamma)
    x = np.linalg.solve(gram, target)
    x = x / x.sum()
    norm = float(profile_inner(out_step, out_gamma, out_step, out_gamma))
    residual = float(x @ gram @ x - 2 * x @ target + norm)
    return x, float(np.sqrt(max(residual, 0.0) / norm))


def step_weights(t: int, gamma: float, length: int) -> np.ndarray:
    """(length,) weight of the weights after step k = 1..length in the power EMA tracked to step t (core.ema's
    update, beta = (1 - 1/k)**(gamma + 1)): (k**(gamma+1) - (k-1)**(gamma+1)) / t**(gamma+1) for k <= t, else 0."""
    k = np.arange(1, length + 1, dtype=np.float64)
    return np.where(k <= t, ((k / t) ** (gamma + 1) - ((k - 1) / t) ** (gamma + 1)), 0.0)


class ReconstructionError(ValueError):
    """Snapshots that cannot give the asked EMA: none, too few, another step, sigma_rel out of range."""


def pick_snapshots(run_dir: str, step: int | None, use: list[float] | None) -> tuple[int, list[tuple[int, float, str]]]:
    """(output step, the snapshots at or before it) of a run: `step` (None: the newest snapshot's), the
    snapshots of the sigma_rels `use` only (None: all)."""
    found = list_snapshots(run_dir)
    if not found:
        raise ReconstructionError(f"{run_dir!r} has no post-hoc EMA snapshots ({phema_dir(run_dir)}/phema-*"
                                  ".safetensors): train it with train.phema_stds=[0.05,0.1] (off by default)")
    if use is not None:
        found = [s for s in found if any(abs(s[1] - u) < 5e-4 for u in use)]
        if not found:
            raise ReconstructionError(f"{run_dir!r} has no snapshots of sigma_rel {use}; it has "
                                      f"{sorted({s[1] for s in list_snapshots(run_dir)})}")
    steps = sorted({s[0] for s in found})
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ReconstructionError(f"--step {step} is not a snapshot step of {run_dir!r}; its snapshots are at steps "
                                  f"{steps[0]} .. {steps[-1]} ({len(steps)} steps, e.g. {steps[-3:]})")
    chosen = [s for s in found if 0 < s[0] <= step]
    if len(chosen) < 2:
        raise ReconstructionError(f"too few snapshots: {len(chosen)} at or before step {step} in {run_dir!r}; the "
                                  "reconstruction needs at least 2 (more, over the whole run, for an accurate one: "
                                  "see train.phema_every)")
    return step, chosen


def reconstruct(run_dir: str, sigma_rel: float, step: int | None = None,
                use: list[float] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(full model state dict of the EMA of width `sigma_rel` at `step` (None: the newest snapshot's), float32;
    its record: step, sigma_rel, gamma, the snapshots used, the coefficients' fit error). Snapshots are read one
    at a time and summed in float64; entries equal in every snapshot (buffers) are copied from the step's own."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ReconstructionError(f"--sigma-rel {sigma_rel} is out of range: a relative EMA width is in "
                                  f"(0, {MAX_SIGMA_REL:.4f}) (edm2 keeps 0.05 and 0.1)")
    step, chosen = pick_snapshots(run_dir, step, use)
    gamma = sigma_rel_to_gamma(sigma_rel)
    x, fit_error = solve_coefficients([s[0] for s in chosen], [sigma_rel_to_gamma(s[1]) for s in chosen], step, gamma)
    order = sorted(range(len(chosen)), key=lambda i: chosen[i][0] != step)  # the output step's snapshot first
    first, sums, constant = None, {}, {}
    for i in order:
        weights = load_weights(chosen[i][2])
        if first is None:
            first = weights
            constant = {k: True for k in weights}
        elif weights.keys() != first.keys() or any(weights[k].shape != first[k].shape for k in first):
            raise ReconstructionError(f"{chosen[i][2]!r} holds other tensors than {chosen[order[0]][2]!r}: "
                                      "snapshots of another model?")
        for k, v in weights.items():
            constant[k] = constant[k] and torch.equal(v, first[k])
            sums[k] = sums[k] + x[i] * v.double() if k in sums else x[i] * v.double()
    out = {k: first[k].clone() if constant[k] else sums[k].float() for k in first}
    record = {"step": step, "sigma_rel": sigma_rel, "gamma": gamma, "fit_error": fit_error,
              "snapshots": [[s[0], s[1]] for s in chosen], "coefficients": x.tolist()}
    return out, record


def export_posthoc(run_dir: str, sigma_rel: float, out_path: str, step: int | None = None,
                   use: list[float] | None = None) -> dict:
    """Reconstruct (see reconstruct) and write `out_path` and its .json as core.checkpoint's export does, the
    model's record from the run's newest checkpoint and the reconstruction's under "phema". Returns that."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ReconstructionError(f"{run_dir!r} has no complete checkpoint to take the model's record from")
    weights, phema = reconstruct(run_dir, sigma_rel, step, use)
    record = {**export_record(checkpoint), "step": phema["step"], "phema": phema}
    write_export(weights, record, out_path, {"step": str(phema["step"]), "sigma_rel": repr(sigma_rel),
                                             "source": os.path.abspath(phema_dir(run_dir))})
    return phema


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Reconstruct the EMA of a relative width sigma_rel from a run's post-hoc "
                                            "EMA snapshots (train.phema_stds) and export it for eval.")
    p.add_argument("run_dir")
    p.add_argument("--sigma-rel", type=float, required=True, help="relative EMA width, in (0, 0.2887); edm2's "
                   "optima lie around 0.05-0.2")
    p.add_argument("--step", type=int, default=None, help="a snapshot step (default: the newest)")
    p.add_argument("--from", dest="use", type=_floats, default=None,
                   help="use the snapshots of these sigma_rels only, comma-separated (default: all)")
    p.add_argument("--out", required=True, help="output .safetensors path (a .json record is written beside)")
    args = p.parse_args(argv)
    try:
        info = export_posthoc(args.run_dir, args.sigma_rel, args.out, args.step, args.use)
    except ReconstructionError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{args.out}: EMA sigma_rel {args.sigma_rel} at step {info['step']} from {len(info['snapshots'])} "
          f"snapshots (profile fit error {info['fit_error']:.2%})")


if __name__ == "__main__":
    main()
