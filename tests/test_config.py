"""Config loading, overrides and the error messages a user sees."""
import os

import pytest
import yaml

from conftest import REPO, TINY, run_train
from class_cond.task import ClassCondConfig
from core.config import ConfigError, config_hash, load_config, save_config
from core.engine import build_ds_config


def load(*overrides, path=TINY):
    return load_config(ClassCondConfig, path, list(overrides))


def test_yaml_and_overrides_typed():
    cfg = load("train.lr=2e-4", "train.max_steps=7", "repa.encoders=[dinov2-tiny,dinov2-tiny]", "run.dir=x/y",
               "train.skip_nonfinite=true")
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.repa.encoders == ["dinov2-tiny", "dinov2-tiny"]
    assert cfg.run.dir == "x/y" and cfg.train.skip_nonfinite is True
    assert cfg.model.preset == "tiny" and cfg.repa.depth == 2  # from the YAML
    assert cfg.train.beta2 == 0.999  # default


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'lr'?); valid keys in train: beta1, beta2, ckpt_"),
    ("trian.lr=1", "unknown config key 'trian.lr' (did you mean 'train'?); valid keys in the top level: data, disp, model, monitor, objective, reg, repa, run, task, train"),
    ("train.max_steps=ten", "train.max_steps: expected an integer, got 'ten'"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("train.skip_nonfinite=maybe", "train.skip_nonfinite: expected true or false, got 'maybe'"),
    ("train.global_batch=-4", "train.global_batch must be > 0, got -4"),
    ("train=3", "'train' is a section"),
    ("model.preset=XXL/2", "model.preset: 'XXL/2' is not one of: S/1, S/2"),
    ("repa.encoders=[dinov3-g]", "repa.encoders[0]: unknown encoder 'dinov3-g'"),
    ("repa.depth=9", "repa.depth=9 is outside the tiny model's blocks 1..4"),
    ("objective.path=quadratic", "objective.path: 'quadratic' is not one of: linear, cosine"),
    ("train.ds_config=ds_configs/nope.json", "train.ds_config: file 'ds_configs/nope.json' does not exist"),
    ("noequals", "is not of the form section.key=value"),
    ("run.seed=-1", "run.seed must be >= 0, got -1"),
    ("data.path=/data/in256", "data.path='/data/in256' is for a prepared dataset, and data.kind=synthetic generates "
     "its own under run.dir/data: set data.kind=shards"),
    ("train.beta2=1.5", "train.beta2 must be in [0, 1), got 1.5"),
    ("train.grad_clip=-1", "train.grad_clip must be >= 0 (0 = no clipping), got -1.0"),
    ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1"),
    ("repa.loss=ntxent repa.ntxent_temperature=0", "repa.ntxent_temperature must be > 0, got 0.0"),
    ("objective.kind=ddpm objective.time_sampling=lognormal",
     "objective.time_sampling=lognormal applies to objective.kind=transport only"),
    ("objective.beta_schedule=cosine", "objective.beta_schedule=cosine applies to objective.kind=ddpm only"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load(*override.split(" "))
    assert message in str(err.value)


def test_missing_data_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path: directory '.*nowhere' does not exist"):
        load("data.kind=shards", f"data.path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="data.path: .* has no manifest.json"):
        load("data.kind=shards", f"data.path={tmp_path}")
    with pytest.raises(ConfigError, match="config file 'missing.yaml' does not exist"):
        load(path="missing.yaml")


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"max_step": 3}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step' \(did you mean 'max_steps'\?\); valid keys in train: .*max_steps"):
        load(path=str(p))


def test_resolved_config_round_trips(tmp_path):
    cfg = load("train.lr=3e-4")
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(ClassCondConfig, str(tmp_path / "config.yaml"))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load("run.dir=elsewhere", "train.max_steps=9")) == config_hash(load())  # bookkeeping only
    assert config_hash(load("train.lr=1e-2")) != config_hash(load())


def test_config_changes_name_keys_and_spare_options_added_since(tmp_path):
    from core.config import config_changes, to_dict

    saved = to_dict(load())
    del saved["model"]["qk_norm"]  # a run saved before this option existed
    assert config_changes(load(), saved) == []
    assert config_changes(load("model.qk_norm=true"), saved) == ["model.qk_norm: False -> True"]
    assert config_changes(load("train.lr=2e-3", "train.max_steps=7"), saved) == ["train.lr: 0.001 -> 0.002"]


def test_batch_fields_filled_from_training_config(tmp_path):
    cfg = load("train.global_batch=64", "train.micro_batch=8", "train.grad_clip=0.5")
    ds = build_ds_config(cfg.train, world_size=4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="train.global_batch=64 is not divisible by the world size 3"):
        build_ds_config(cfg.train, world_size=3)
    bad = load("train.global_batch=60", "train.micro_batch=8")
    with pytest.raises(ConfigError, match="not divisible by world size 2 x train.micro_batch=8"):
        build_ds_config(bad.train, world_size=2)
    p = tmp_path / "ds.json"
    p.write_text('{"train_batch_size": 8, "zero_optimization": {"stage": 1}}')
    with pytest.raises(ConfigError, match="sets 'train_batch_size', which is filled from the training config"):
        build_ds_config(load(f"train.ds_config={p}").train, world_size=1)


def test_cli_reports_config_error_before_building_anything(tmp_path):
    proc = run_train(["--config", TINY, f"run.dir={tmp_path / 'r'}", "train.lrr=1"], check=False)
    assert proc.returncode == 2
    assert "config error: unknown config key 'train.lrr'" in proc.stderr
    assert not os.path.exists(tmp_path / "r")  # nothing written


def test_resolved_config_written_to_run_dir(tmp_path, tiny_args):
    proc = run_train(tiny_args("train.max_steps=1", "train.lr=3e-4"))
    said = [line for line in proc.stdout.splitlines() if line.startswith(("run", "data:", "model:", "DeepSpeed:"))
            or ": a new run" in line]
    assert [s.split(":")[0] for s in said[1:]] == ["data", "data", "model", "DeepSpeed"], proc.stdout[-2000:]
    assert said[0].endswith(": a new run")  # start-up says what it is doing before the first step
    written = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
    assert written["train"]["lr"] == 3e-4 and written["model"]["preset"] == "tiny"
    assert written["run"]["dir"] == str(tmp_path / "run")


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "configs", "class_cond"))))
def test_presets_load(name, tmp_path):
    """Every shipped preset is valid (its data path replaced by a prepared tiny dataset)."""
    from class_cond.data import make_synthetic_class_cond

    make_synthetic_class_cond(str(tmp_path), 4, 2, 32)
    cfg = load(f"data.path={tmp_path}", path=os.path.join(REPO, "configs", "class_cond", name))
    # App. D, Table 7; LightningDiT's recipe (its configs/lightningdit_xl_vavae_f16d32.yaml) has its own
    expected = (1024, 2e-4) if name.startswith("lightningdit") else (256, 1e-4)
    assert (cfg.train.global_batch, cfg.train.lr) == expected


def test_the_yaml_names_its_task(tmp_path):
    """core.train reads the task from the YAML; an alias entry point refuses another task's config."""
    from class_cond.task import ClassCondTask
    from core.task import get_task, load_task_config, task_names
    from t2i.task import T2ITask

    assert task_names() == ["class_cond", "t2i"] and get_task("t2i") is T2ITask
    task, cfg = load_task_config(TINY)
    assert task is ClassCondTask and isinstance(cfg, ClassCondConfig) and cfg.task == "class_cond"
    t2i_yaml = os.path.join(REPO, "configs", "debug", "t2i_tiny.yaml")
    assert load_task_config(t2i_yaml)[0] is T2ITask
    with pytest.raises(ConfigError, match="is a 't2i' config, and this entry point trains 'class_cond' models"):
        load_task_config(t2i_yaml, default_task="class_cond")
    with pytest.raises(ConfigError, match=r"task: unknown task 'video'; registered tasks: class_cond, t2i"):
        load_task_config(TINY, ["task=video"])
    with pytest.raises(ConfigError, match=r"task: 't2i' is not this config's task \('class_cond'\)"):
        load_config(ClassCondConfig, t2i_yaml)
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(open(TINY)).items() if k != "task"}))
    with pytest.raises(ConfigError, match="names no task: add `task: <name>` \\(class_cond, t2i\\)"):
        load_task_config(str(bare))
    assert load_task_config(str(bare), default_task="class_cond")[1].task == "class_cond"  # an older YAML
