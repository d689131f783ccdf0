"""Sample images from a trained model, sharded over processes with accelerate.

    accelerate launch -m eval.generate --run runs/in256 --sampler ode --steps 50 --cfg 1.8 \
        --guidance-interval 0 0.7 --num-samples 50000 --out samples/in256_ode50
    accelerate launch -m eval.generate --run runs/dit_xl2_repa_in256 --sampler ddpm --steps 250 ...   # DiT

The sampler follows the run's recorded objective: ode/sde (default sde) for SiT's transport, ddpm/ddim (default
ddpm, DiT's 250 respaced steps) for the ddpm objective; a sampler of the other family is refused. The SDE's score
follows the recorded transport path (objective.path: linear or cosine).

Writes OUT/images/NNNNNN.png (uint8, one per sample, named by global index), OUT/generation.json (settings,
checkpoint step) and, when every image exists, OUT/samples.npz in the ADM layout (arr_0 uint8 (N, H, W, 3),
arr_1 labels for class-conditional models). Rank r takes the r-th contiguous slice of the indices.

Seeding: sample i draws its initial noise and its SDE noise from its own generator seeded by (seed, i), not from
a per-rank stream (the reference's seed * world + rank), so an image depends only on (checkpoint, settings,
seed, i): the same for any number of processes, any batch size, and after a resume. Resume is rerunning the
command: indices whose PNG exists are skipped (PNGs are written to a temporary name and renamed).

REG models (a class token beside the latents, docs/VARIANTS.md) integrate the token jointly with the latents,
with the ODE and the SDE alike: it starts from Gaussian noise (drawn from sample i's generator after the latents'
noise) and is guided with its own scale --cls-cfg where the image is guided (0: its conditional velocity).
"""
import argparse
import dataclasses
import json
import os
import sys
import textwrap
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image, ImageDraw
from tqdm import tqdm

from core.config import ConfigError, load_config
from core.fileio import WriteError, atomic_path, write_json_atomic
from core.latents import LatentNorm, build_autoencoder
from core.task import Conditioner, get_task
from core.transport import Transport, build_objective
from eval.guidance import GuidedVelocity
from eval.loading import load_eval_model, objective_config, resolve_weights
from eval.samplers import ddim_sample, ddpm_sample, ode_sample, randn, sde_sample

SETTINGS_FILE = "generation.json"
NPZ_FILE = "samples.npz"
# Keys of generation.json that decide the images: a rerun with different values is refused, not mixed in.
SAMPLING_KEYS = ("source", "step", "sampler", "steps", "heun", "cfg", "guidance_interval", "t_last", "seed",
                 "seeding", "num_samples", "autoencoder", "cond_file", "precision", "conditions", "cls_cfg",
                 "time_shift")


# Samplers of each objective kind (core.transport.build_objective); the first is the default.
SAMPLERS = {"transport": ("sde", "ode"), "ddpm": ("ddpm", "ddim")}


def pick_sampler(objective_kind: str, sampler: Optional[str]) -> str:
    """`sampler`, or the objective's default when None; a ValueError if it does not fit the objective."""
    if objective_kind not in SAMPLERS:
        raise ValueError(f"no sampler for objective kind {objective_kind!r}; known: {', '.join(SAMPLERS)}")
    allowed = SAMPLERS[objective_kind]
    if sampler is None:
        return allowed[0]
    if sampler not in allowed:
        raise ValueError(f"sampler {sampler!r} does not fit this model's objective {objective_kind!r}: use one of "
                         f"{', '.join(allowed)}")
    return sampler


def sample_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of sample `index`: a 63-bit seed hashed from (seed, index) by NumPy's SeedSequence."""
    hi, lo = np.random.SeedSequence([seed, index]).generate_state(2)
    return torch.Generator(device).manual_seed((int(hi) << 31 | int(lo) >> 1) & (2**63 - 1))


def image_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, "images", f"{index:06d}.png")


def shard(num_samples: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous slice of range(num_samples)."""
    per, extra = divmod(num_samples, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


class JointTokenModel(torch.nn.Module):
    """A REG model (class_cond.models.SiT with reg_dim > 0) as a plain model(x, t, **cond) -> velocity over a flat
    joint state: x (B, C*H*W + D) holds the latents (C, H, W) flattened, then the class token (D,); the result
    is their velocities in the same layout, so the samplers and GuidedVelocity (tail = D) run on it unchanged."""

    def __init__(self, model: torch.nn.Module, latent_shape: Sequence[int], token_dim: int):
        super().__init__()
        self.model, self.latent_shape, self.token_dim = model, tuple(latent_shape), int(token_dim)
        self.latent_size = int(np.prod(self.latent_shape))

    def pack(self, latents: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return torch.cat([latents.flatten(1), token], dim=1)

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1:] != (self.latent_size + self.token_dim,):
            raise ValueError(f"joint state of shape {tuple(x.shape)}; expected (B, {self.latent_size + self.token_dim})")
        return x[:, : self.latent_size].reshape(-1, *self.latent_shape), x[:, self.latent_size:]

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        latents, token = self.unpack(x)
        out, _, extras = self.model(latents, t, cls=token, **cond)
        c = self.latent_shape[0]  # a learned-sigma head's extra channels are not part of the state
        return self.pack(out[:, :c], extras["cls"])


class Generator:
    """Samples images of a model: `images(indices) -> uint8 (B, 3, H, W)`; `settings` records what is used.

    model, meta: from eval.loading.load_eval_model (or `Generator.load(source, ...)`). The conditions of sample
    indices come from `conditioner` (core.task.Conditioner), else from the task of the model's record
    (Task.conditioner with {"cond_file": cond_file}). `autoencoder`: the decoder, if already built.
    cls_cfg: REG models only, the class token's guidance scale (REG's default 1.5; 0 = its conditional velocity);
    None picks that default for a REG model and is required for any other.
    time_shift: the ODE's time grid shifted as LightningDiT's sampler (eval.samplers.shift_times; 1 = none).
    """

    def __init__(self, model: torch.nn.Module, meta: dict, sampler: Optional[str] = None, steps: int = 250,
                 heun: bool = False, cfg: float = 1.0, guidance_interval: Sequence[float] = (0.0, 1.0),
                 t_last: float = 0.04, seed: int = 0, vae: Optional[str] = None, cond_file: Optional[str] = None,
                 conditioner: Optional[Conditioner] = None, precision: str = "fp32", compile: bool = False,
                 autoencoder=None, cls_cfg: Optional[float] = None, time_shift: float = 1.0):
        known = [name for names in SAMPLERS.values() for name in names]
        if sampler is not None and sampler not in known:
            raise ValueError(f"sampler must be one of {', '.join(known)}, got {sampler!r}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if heun and sampler != "ode":
            raise ValueError("--heun applies to the ODE sampler only")
        check_sampling_values(cfg, t_last, cls_cfg, time_shift)
        self.model, self.meta = model, meta
        self.device = next(model.parameters()).device
        objective_cfg = objective_config(self.meta)
        sampler = pick_sampler(objective_cfg.kind, sampler)
        # the SDE's score from velocity follows the path the model was trained on
        self.path = Transport(objective_cfg.path) if objective_cfg.kind == "transport" else None
        # ddpm/ddim run on the recorded diffusion respaced to `steps` (DiT: 250 of 1000)
        self.diffusion = build_objective(objective_cfg).respace(steps) if objective_cfg.kind == "ddpm" else None
        self.forward = torch.compile(self.model) if compile else self.model
        # REG: the class token is integrated with the latents (JointTokenModel's flat state)
        self.token_dim = int((self.meta.get("model") or {}).get("kwargs", {}).get("reg_dim", 0))
        if self.token_dim:
            cls_cfg = REG_CLS_CFG if cls_cfg is None else float(cls_cfg)
            if self.diffusion is not None:
                raise ValueError("a REG model needs the transport objective's samplers (ode, sde)")
        elif cls_cfg is not None:
            raise ValueError("--cls-cfg is the guidance scale of a REG model's class token; this model has none")
        task_name = (self.meta.get("model") or {}).get("task")
        if conditioner is None:
            conditioner = get_task(task_name).conditioner(self.meta, {"cond_file": cond_file})
        self.conditioner = conditioner
        latent = self.meta["latent"]
        # `autoencoder`: one already built (an in-training monitor keeps its SD-VAE instead of loading it each time)
        self.autoencoder = autoencoder or build_autoencoder(vae or latent["autoencoder"], self.device)
        self.latent_shape = tuple(latent["shape"])
        self.norm = LatentNorm.from_record(latent)
        self.precision = precision
        self.settings = {
            "source": self.meta.get("source"), "step": self.meta.get("step"), "task": task_name,
            "objective": objective_cfg.kind, "path": objective_cfg.path if self.diffusion is None else None,
            "sampler": sampler, "steps": steps, "heun": heun, "cfg": cfg,
            "guidance_interval": list(guidance_interval),
            "t_last": t_last, "seed": seed, "seeding": "per-sample (seed, index)",
            "autoencoder": vae or latent["autoencoder"], "cond_file": cond_file, "precision": precision,
            "conditions": getattr(self.conditioner, "protocol", None),  # how sample i's condition is chosen
            "nfe": 2 * steps - 1 if heun else steps, "cls_cfg": cls_cfg,
            "time_shift": None if time_shift == 1.0 else float(time_shift),  # absent before: None for no shift
        }
        if time_shift != 1.0 and self.settings["sampler"] != "ode":
            raise ValueError(f"--time-shift applies to the ODE sampler (LightningDiT's), not {sampler}")

    @classmethod
    def load(cls, source: str, device: torch.device | str = "cpu", **settings) -> "Generator":
        """A generator of the EMA model of `source` (run dir, step_* checkpoint or exported .safetensors)."""
        model, meta = load_eval_model(source, torch.device(device))
        return cls(model, meta, **settings)

    @torch.no_grad()
    def latents(self, indices: Sequence[int], progress: Optional[Callable[[float], None]] = None) -> torch.Tensor:
        """(B, C, h, w) float32 scaled latents of samples `indices`. `progress(images)`: called after each model
        evaluation with the share of the batch it advanced (len(indices) / NFE), so a bar moves within a batch."""
        s = self.settings
        tick = None if progress is None else (lambda: progress(len(indices) / s["nfe"]))
        gens = [sample_generator(s["seed"], i, self.device) for i in indices]
        x1 = randn((len(indices), *self.latent_shape), gens, self.device, torch.float32)
        if self.token_dim:  # REG: the token's initial noise, after the latents' from the same generators
            joint = JointTokenModel(self.forward, self.latent_shape, self.token_dim)
            x1 = joint.pack(x1, randn((len(indices), self.token_dim), gens, self.device, torch.float32))
        cond = self.conditioner.cond(indices, self.device)
        null = self.conditioner.null(cond)
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16")
        if self.diffusion is not None:  # DiT: guided [eps | v], the model fed the original step index
            denoiser = GuidedVelocity(self.forward, cond, null, s["cfg"], s["guidance_interval"],
                                      model_time=self.diffusion.model_step, keep_sigma=True, on_call=tick)
            with autocast:
                if s["sampler"] == "ddpm":
                    return ddpm_sample(denoiser, x1, self.diffusion, gens)
                return ddim_sample(denoiser, x1, self.diffusion)
        model, tail = (joint, self.token_dim) if self.token_dim else (self.forward, 0)
        velocity = GuidedVelocity(model, cond, null, s["cfg"], s["guidance_interval"], on_call=tick, tail=tail,
                                  tail_scale=s["cls_cfg"] if tail else 1.0)
        with autocast:
            if s["sampler"] == "ode":
                x0 = ode_sample(velocity, x1, s["steps"], heun=s["heun"], time_shift=s["time_shift"] or 1.0)
            else:
                x0 = sde_sample(velocity, x1, s["steps"], gens, t_last=s["t_last"],
                                coefficients=self.path.alpha_sigma)
        return joint.unpack(x0)[0] if self.token_dim else x0

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The model's latents -> uint8 (B, 3, H, W): undo the run's normalisation (its scale and shift, or its
        per-channel statistics), then the autoencoder decodes its own latents."""
        return self.autoencoder.decode_raw(self.norm.denormalize(z))

    def images(self, indices: Sequence[int], progress: Optional[Callable[[float], None]] = None) -> torch.Tensor:
        return self.decode(self.latents(indices, progress))


def caption_grid(images: np.ndarray, captions: list[str], columns: int = 8, scale: int = 2) -> Image.Image:
    """The samples in a grid of up to `columns` per row (as many as there are samples when fewer), each with its
    caption underneath (wrapped)."""
    n, h, w, _ = images.shape
    columns = max(1, min(columns, n))
    cell_w = max(w * scale, 160)
    lines = [textwrap.wrap(c, width=cell_w // 6)[:4] for c in captions]
    text_h = 11 * max(len(x) for x in lines) + 4
    rows = (n + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * (h * scale + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, caption_lines) in enumerate(zip(images, lines)):
        x, y = (i % columns) * cell_w, (i // columns) * (h * scale + text_h)
        grid.paste(Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST), (x + (cell_w - w * scale) // 2, y))
        for j, line in enumerate(caption_lines):
            draw.text((x + 2, y + h * scale + 2 + 11 * j), line, fill="black")
    return grid


def write_png(path: str, image: torch.Tensor) -> None:
    """uint8 (3, H, W) -> PNG, written to a temporary name and renamed so a PNG is complete or absent."""
    with atomic_path(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")


def sampler_changes_since(old: dict, settings: dict) -> str:
    """What makes `settings` draw other images than the version that wrote `old` did, "" if nothing. Records
    without "path" predate two fixes: the SDE's score on the cosine path, and Heun's corrector taking the guidance
    decision of its step's start (which matters with guidance limited to an interval)."""
    if "path" in old:
        return ""
    if settings.get("sampler") == "sde" and settings.get("path") == "cosine":
        return "the SDE's score on the cosine path"
    guided = settings.get("cfg") != 1.0 and list(settings.get("guidance_interval", [0, 1])) != [0.0, 1.0]
    if settings.get("heun") and guided:
        return "Heun's corrector and the guidance interval"
    return ""


def check_settings(out_dir: str, settings: dict) -> None:
    """Write OUT/generation.json, or refuse a rerun whose image-deciding settings differ from the recorded ones."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        diff = [k for k in SAMPLING_KEYS if old.get(k) != settings.get(k)]
        if diff:
            raise ValueError(f"{out_dir!r} holds samples made with other settings ({', '.join(diff)}: "
                             f"{[old.get(k) for k in diff]} there, {[settings.get(k) for k in diff]} now); "
                             "use another --out")
        changed = sampler_changes_since(old, settings)
        if changed:
            raise ValueError(f"{out_dir!r} holds samples of an earlier version whose sampler differs for these "
                             f"settings ({changed}); use another --out")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    write_json_atomic(path, settings)


def write_npz(out_dir: str, num_samples: int, labels: Optional[np.ndarray]) -> str:
    """OUT/samples.npz in the ADM layout, streamed image by image (50K 256-px images do not fit in memory twice)."""
    first = np.asarray(Image.open(image_path(out_dir, 0)).convert("RGB"))
    shape = (num_samples, *first.shape)
    path = os.path.join(out_dir, NPZ_FILE)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for i in range(num_samples):
                img = np.asarray(Image.open(image_path(out_dir, i)).convert("RGB"))
                if img.shape != first.shape:
                    raise ValueError(f"{image_path(out_dir, i)} is {img.shape}, image 0 is {first.shape}")
                f.write(np.ascontiguousarray(img).tobytes())
        if labels is not None:
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
    return path


def generate(args: argparse.Namespace) -> dict:
    """Run generation on this process's shard; rank 0 writes the .npz at the end. Returns the settings record."""

    state = PartialState(cpu=not torch.cuda.is_available())  # else a CPU-only launch runs N copies of rank 0
    gen = Generator.load(args.run, state.device, sampler=args.sampler, steps=args.steps, heun=args.heun,
                         cfg=args.cfg, guidance_interval=args.guidance_interval, t_last=args.t_last, seed=args.seed,
                         vae=args.vae, cond_file=args.cond_file, precision=args.precision, compile=args.compile,
                         cls_cfg=args.cls_cfg, time_shift=args.time_shift)
    available = gen.conditioner.num_available
    if available is not None and args.num_samples > available:
        raise ValueError(f"--num-samples {args.num_samples} exceeds the {available} conditions available")
    settings = {**gen.settings, "num_samples": args.num_samples}
    if state.is_main_process:
        check_settings(args.out, settings)
    state.wait_for_everyone()
    todo = [i for i in shard(args.num_samples, state.process_index, state.num_processes)
            if not os.path.isfile(image_path(args.out, i))]
    done, start = 0, time.perf_counter()
    # in images, advanced at every model evaluation: it moves (with a rate and an ETA) within a batch
    bar = tqdm(total=len(todo), desc=f"rank {state.process_index}", unit="img", disable=not state.is_local_main_process,
               bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}, {rate_fmt}]")
    for b in range(0, len(todo), args.batch_size):
        indices = todo[b:b + args.batch_size]
        for i, img in zip(indices, gen.images(indices, progress=bar.update)):
            write_png(image_path(args.out, i), img)
        done += len(indices)
        bar.n = done  # the evaluations' shares add up to the batch, up to rounding
        bar.refresh()
    bar.close()
    rate = done / max(time.perf_counter() - start, 1e-9)
    print(f"rank {state.process_index}: {done} images in {time.perf_counter() - start:.1f} s ({rate:.2f} img/s)",
          flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        missing = [i for i in range(args.num_samples) if not os.path.isfile(image_path(args.out, i))]
        if missing:
            raise RuntimeError(f"{len(missing)} images missing after generation (first: {missing[0]})")
        labels = gen.conditioner.labels(range(args.num_samples))
        print(f"wrote {write_npz(args.out, args.num_samples, labels)}", flush=True)
    state.wait_for_everyone()
    return settings


SAMPLER_NAMES = ("ode", "sde", "ddpm", "ddim")
REG_CLS_CFG = 1.5  # REG's generate.py default --cls-cfg-scale


@dataclass
class SamplingPreset:
    """The sampling settings of a paper result as data (configs/eval/*.yaml, `--preset FILE`): the defaults of
    the command-line options of the same names, which override them. These defaults are the options' own."""

    sampler: Optional[str] = None  # None: the objective's default (SAMPLERS)
    steps: int = 250
    heun: bool = False
    cfg: float = 1.0
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    t_last: float = 0.04
    num_samples: int = 50000
    seed: int = 0
    precision: str = "fp32"
    cls_cfg: Optional[float] = None  # REG models: the class token's guidance scale (None: REG's 1.5)
    time_shift: float = 1.0  # ODE: LightningDiT's time shift s (eval.samplers.shift_times); 1 = none

    def validate(self, check_data: bool = True) -> None:
        if self.sampler is not None and self.sampler not in SAMPLER_NAMES:
            raise ConfigError(f"sampler: {self.sampler!r} is not one of: {', '.join(SAMPLER_NAMES)}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision: {self.precision!r} is not one of: fp32, bf16")
        if len(self.guidance_interval) != 2:
            raise ConfigError(f"guidance_interval: expected [low, high], got {self.guidance_interval}")
        if self.cls_cfg is not None and not self.cls_cfg >= 0:
            raise ConfigError(f"cls_cfg: must be >= 0, got {self.cls_cfg}")
        if not self.time_shift > 0:
            raise ConfigError(f"time_shift: must be > 0 (1 = none), got {self.time_shift}")


def apply_preset(p: argparse.ArgumentParser, argv: Optional[list[str]]) -> None:
    """Make the values of `--preset FILE` (if given in argv) the parser's defaults; p.error naming a bad key."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    path = pre.parse_known_args(argv)[0].preset
    if path:
        try:
            p.set_defaults(**dataclasses.asdict(load_config(SamplingPreset, path)))
        except ConfigError as err:
            p.error(f"--preset: {err}")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    d = SamplingPreset()
    p.add_argument("--run", required=True, help="run directory, step_* checkpoint, or exported .safetensors (+ .json)")
    p.add_argument("--preset", default=None, metavar="YAML",
                   help="a paper's sampling settings as defaults, e.g. configs/eval/in256_sde250_cfg1.8.yaml")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=d.sampler,
                   help="SiT: sde (default) or ode; DiT (ddpm objective): ddpm (default) or ddim")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="ODE steps (NFE 50 in the paper), SDE steps (NFE 250), or DDPM/DDIM respaced steps (DiT: 250)")
    p.add_argument("--heun", action="store_true", default=d.heun, help="ODE: Heun's method (2N-1 model calls)")
    p.add_argument("--cfg", type=float, default=d.cfg, help="guidance scale w (1 = no guidance)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=tuple(d.guidance_interval),
                   metavar=("LOW", "HIGH"),
                   help="apply guidance only where LOW <= t <= HIGH (t=1 noise; DiT: t = step / 1000)")
    p.add_argument("--t-last", type=float, default=d.t_last, help="SDE: last time before the noiseless jump to 0")
    p.add_argument("--cls-cfg", type=float, default=d.cls_cfg,
                   help=f"REG models: guidance scale of the class token where the image is guided (default "
                        f"{REG_CLS_CFG}; 0 = its conditional velocity)")
    p.add_argument("--time-shift", type=float, default=d.time_shift, metavar="S",
                   help="ODE: shift the time grid as LightningDiT's sampler, t -> t / (S + (1 - S) t) with t = 1 "
                        "noise; S < 1 spends more steps near the noise (its VA-VAE setting 0.3); 1 = none")
    p.add_argument("--num-samples", type=int, default=d.num_samples)
    p.add_argument("--batch-size", type=int, default=64, help="samples per process and batch")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--vae", default=None, help="autoencoder override: local AutoencoderKL path or hub id")
    p.add_argument("--cond-file", default=None, help="conditions file of tasks that need one (t2i captions)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision, help="bf16: autocast for the model")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")


def check_sampling_values(cfg: float, t_last: float, cls_cfg: Optional[float] = None,
                          time_shift: float = 1.0) -> None:
    """ValueError naming the option when --cfg, --t-last, --cls-cfg or --time-shift is out of range (checked
    before anything is written)."""
    if not cfg >= 0:  # also refuses nan
        raise ValueError(f"--cfg must be >= 0, got {cfg}")
    if not 0 < t_last < 1:
        raise ValueError(f"--t-last must be in (0, 1), got {t_last}")
    if cls_cfg is not None and not cls_cfg >= 0:
        raise ValueError(f"--cls-cfg must be >= 0, got {cls_cfg}")
    if not time_shift > 0:
        raise ValueError(f"--time-shift must be > 0 (1 = none), got {time_shift}")


def validate_generation_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the options and resolve the default sampler; p.error (exit 2) naming the option, before any output."""
    if args.num_samples < 1 or args.batch_size < 1 or args.steps < 1:
        p.error("--num-samples, --batch-size and --steps must be positive")
    low, high = args.guidance_interval
    if not 0 <= low <= high <= 1:
        p.error(f"--guidance-interval must satisfy 0 <= LOW <= HIGH <= 1, got {low} {high}")
    try:
        check_sampling_values(args.cfg, args.t_last, args.cls_cfg, args.time_shift)
        # resolve the default sampler from the run's objective now: output names depend on it
        args.sampler = pick_sampler(objective_config(resolve_weights(args.run)[1]).kind, args.sampler)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    if args.heun and args.sampler != "ode":
        p.error("--heun applies to the ODE sampler only")
    if args.time_shift != 1.0 and args.sampler != "ode":
        p.error(f"--time-shift applies to the ODE sampler (LightningDiT's), not {args.sampler}")
    if args.sampler == "sde" and args.steps < 2:
        p.error(f"--steps must be >= 2 for the SDE sampler (its last step is the noiseless jump to 0), "
                f"got {args.steps}")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_generation_args(p)
    p.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    apply_preset(p, argv)
    args = p.parse_args(argv)
    validate_generation_args(p, args)
    exit_on_user_error(generate, args)


USER_ERRORS = (ValueError, FileNotFoundError, WriteError)  # bad files, settings that do not fit, a full disk


def exit_on_user_error(fn, *args):
    """fn(*args); an error of the user's input (a corrupt or missing file, settings that do not fit an existing
    folder, missing weights) is one line on stderr and exit code 2, not a traceback."""
    try:
        return fn(*args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
