"""Tests for the config layer: YAML loading, overrides, validation messages and round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dist_unlearn.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)

KNOWN = ("ga", "grad_diff", "npo", "simnpo")


def write_yaml(tmp_path: Path, data: object, name: str = "run.yaml") -> Path:
    """Write ``data`` as YAML into ``tmp_path`` and return the file's path."""
    path = tmp_path / name
    path.write_text("" if data is None else yaml.safe_dump(data), encoding="utf-8")
    return path


def load_error(tmp_path: Path, data: object, overrides: tuple[str, ...] = (), **kwargs: object) -> str:
    """Load a config that must be invalid and return the error message."""
    path = write_yaml(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, **kwargs)
    message = str(info.value)
    assert message.splitlines()[0] == f"invalid config ({path}):"
    return message


def problem_line(message: str, start: str) -> str:
    """The one line of ``message`` that starts with ``start``."""
    lines = [line for line in message.splitlines() if line.startswith(start)]
    assert len(lines) == 1, message
    return lines[0]


# --- loading and overrides -------------------------------------------------------------------


def test_empty_yaml_is_refused_and_an_empty_mapping_gives_defaults(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, None))
    assert "holds no settings. Fix:" in info.value.problems[0] and "write {} to run on every default" in str(info.value)
    cfg = load_config(write_yaml(tmp_path, {}))
    expected = RunConfig()
    expected.output.dir = str(Path("runs/default").resolve())
    assert cfg == expected
    assert cfg.model.path == "embedded"
    assert cfg.method.names == ["grad_diff"]
    assert cfg.train.steps == 30
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.ray.use_gpu == "auto"


def test_yaml_values_are_loaded(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"train": {"steps": 5, "lr": 0.01}, "ray": {"enabled": False}})
    cfg = load_config(path)
    assert cfg.train.steps == 5
    assert cfg.train.lr == 0.01
    assert cfg.ray.enabled is False


def test_overrides_of_each_type(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"train": {"steps": 5}})
    cfg = load_config(
        path,
        [
            "train.steps=12",
            "train.lr=0.5",
            "train.weight_decay=1e-2",
            "output.tensorboard=false",
            "method.names=[ga, npo]",
            "output.dir=runs/exp1",
            "ray.address=null",
            "ray.use_gpu=true",
        ],
    )
    assert cfg.train.steps == 12 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 0.5
    assert cfg.train.weight_decay == pytest.approx(0.01)
    assert cfg.output.tensorboard is False
    assert cfg.method.names == ["ga", "npo"]
    assert cfg.output.dir == str(Path("runs/exp1").resolve())
    assert cfg.ray.address is None
    assert cfg.ray.use_gpu == "true"


def test_int_accepted_for_float_and_integral_float_for_int(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path, {"train": {"lr": 1, "steps": 3.0}}))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 3 and isinstance(cfg.train.steps, int)


def test_comma_list_coercion(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"method": {"names": "grad_diff"}})
    assert load_config(path).method.names == ["grad_diff"]
    assert load_config(path, ["method.names=npo"]).method.names == ["npo"]
    assert load_config(path, ["method.names=ga, npo"]).method.names == ["ga", "npo"]


def test_overrides_create_nested_mappings() -> None:
    data = {"train": {"steps": 1}}
    result = apply_overrides(data, ["method.params.npo.beta=0.2", "deepspeed.config.gradient_clipping=2"])
    assert result["method"]["params"] == {"npo": {"beta": 0.2}}
    assert result["deepspeed"]["config"] == {"gradient_clipping": 2}
    assert result["train"] == {"steps": 1}
    assert "method" not in data  # the input is not modified


def test_override_params_for_selected_method() -> None:
    data = apply_overrides({}, ["method.names=npo", "method.params.npo.beta=0.2"])
    cfg = config_from_dict(data, known_methods=KNOWN)
    assert cfg.method.params == {"npo": {"beta": 0.2}}


def test_malformed_override_names_it_and_shows_form(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, {}), ["train.steps30"])
    message = str(info.value)
    assert "'train.steps30'" in message
    assert "section.key=value" in message


def test_override_into_non_mapping_is_reported() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({"model": "x"}, ["model.path=y"])
    assert "model" in str(info.value) and "not a mapping" in str(info.value)


# --- validation messages ---------------------------------------------------------------------


def test_unknown_key_with_suggestion(tmp_path: Path) -> None:
    message = load_error(tmp_path, {"method": {"nmes": ["npo"]}})
    line = problem_line(message, "unknown key 'method.nmes'")
    assert "did you mean 'method.names'?" in line
    assert "Valid keys: names, params" in line


def test_unknown_section_with_suggestion(tmp_path: Path) -> None:
    message = load_error(tmp_path, {"trian": {"steps": 3}})
    assert "did you mean 'train'?" in problem_line(message, "unknown key 'trian'")


def test_wrong_type_str_for_int(tmp_path: Path) -> None:
    message = load_error(tmp_path, {}, ("train.steps=abc",))
    line = problem_line(message, "train.steps:")
    assert "expected an integer, got 'abc' (str)" in line
    assert "Fix: set train.steps to a whole number, e.g. train.steps=30" in line


def test_wrong_type_bool_for_int(tmp_path: Path) -> None:
    line = problem_line(load_error(tmp_path, {"train": {"steps": True}}), "train.steps:")
    assert "expected an integer" in line and "(bool)" in line
    assert "e.g. train.steps=30" in line


def test_wrong_type_fractional_float_for_int(tmp_path: Path) -> None:
    line = problem_line(load_error(tmp_path, {"train": {"forget_batch_size": 3.5}}), "train.forget_batch_size:")
    assert "got 3.5 (float)" in line
    assert "a whole number" in line


def test_wrong_type_for_bool_and_float(tmp_path: Path) -> None:
    message = load_error(tmp_path, {"output": {"tensorboard": "yes please"}, "train": {"lr": "fast"}})
    assert "Fix: set output.tensorboard to true or false" in problem_line(message, "output.tensorboard:")
    assert "Fix: set train.lr to a number" in problem_line(message, "train.lr:")


def test_section_not_a_mapping(tmp_path: Path) -> None:
    line = problem_line(load_error(tmp_path, {"deepspeed": 3}), "deepspeed:")
    assert "expected a mapping of settings, got 3" in line
    assert "deepspeed.zero_stage=" in line


def test_bad_choice(tmp_path: Path) -> None:
    line = problem_line(load_error(tmp_path, {}, ("model.dtype=fp33",)), "model.dtype:")
    assert "'fp33' is not one of fp32, bf16, fp16" in line
    assert "did you mean model.dtype=fp32?" in line


def test_use_gpu_accepts_yaml_booleans(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path, {"ray": {"use_gpu": False}})).ray.use_gpu == "false"


def test_zero_stage_out_of_range(tmp_path: Path) -> None:
    line = problem_line(load_error(tmp_path, {"deepspeed": {"zero_stage": 5}}), "deepspeed.zero_stage:")
    assert "must be 0, 1, 2 or 3, got 5" in line
    assert "deepspeed.zero_stage=3" in line


def test_numeric_ranges(tmp_path: Path) -> None:
    message = load_error(tmp_path, {"data": {"forget_fraction": 1.5, "max_length": 4}, "checkpoint": {"keep": 0}})
    assert "e.g. data.forget_fraction=0.1" in problem_line(message, "data.forget_fraction:")
    assert "must be >= 8, got 4" in problem_line(message, "data.max_length:")
    assert "must be >= 1, got 0" in problem_line(message, "checkpoint.keep:")


def test_huge_batch_sizes_are_refused_at_once(tmp_path: Path) -> None:
    """A batch of 2**70 (and no retain batch) once sent the worker-count hint into a 2**35-step divisor
    search: the load hung."""
    train = {"forget_batch_size": 2**70, "retain_batch_size": 0}
    message = load_error(tmp_path, {"train": train, "ray": {"num_workers": 3}})
    assert f"must be >= 1 and <= {2**24}, got {2**70}" in problem_line(message, "train.forget_batch_size:")
    contrastive = {"job": {"kind": "contrastive"}, "contrastive": {"global_batch_size": 2**24 + 1}}
    line = problem_line(load_error(tmp_path, contrastive), "contrastive.global_batch_size:")
    assert f"and <= {2**24}, got {2**24 + 1}" in line


def test_fractions_must_leave_retain_data(tmp_path: Path) -> None:
    message = load_error(tmp_path, {"data": {"forget_fraction": 0.6, "holdout_fraction": 0.5}})
    line = problem_line(message, "data.forget_fraction + data.holdout_fraction")
    assert "must be < 1" in line and "Fix: lower one of them" in line


def test_all_problems_reported_one_per_line(tmp_path: Path) -> None:
    message = load_error(tmp_path, {"train": {"steps": "x", "lr": -1}, "model": {"dtype": "int8"}})
    problems = message.splitlines()[1:]
    assert [line.split(":")[0] for line in problems] == ["model.dtype", "train.steps", "train.lr"]


# --- files -----------------------------------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found: ") as info:
        load_config(missing)
    assert str(missing) in str(info.value)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    message = load_error(tmp_path, ["a", "b"])
    assert "expected a mapping of sections" in message


def test_missing_data_file(tmp_path: Path) -> None:
    line = problem_line(load_error(tmp_path, {"data": {"source": "/x.json"}}), "data.source:")
    assert "file not found: /x.json" in line
    assert "Fix: give a path to a local .json/.jsonl file, or use data.source=fictitious" in line


def test_data_file_resolved_against_yaml_dir(tmp_path: Path) -> None:
    (tmp_path / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    cfg = load_config(write_yaml(tmp_path, {"data": {"source": "qa.jsonl"}}))
    assert cfg.data.source == str(tmp_path / "qa.jsonl")


def test_missing_deepspeed_json(tmp_path: Path) -> None:
    line = problem_line(load_error(tmp_path, {"deepspeed": {"config": "ds.json"}}), "deepspeed.config:")
    assert f"file not found: {tmp_path / 'ds.json'}" in line
    assert "deepspeed.config=null" in line


def test_deepspeed_json_must_be_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text("[1, 2]", encoding="utf-8")
    line = problem_line(load_error(tmp_path, {"deepspeed": {"config": "ds.json"}}), "deepspeed.config:")
    assert "must hold a JSON object" in line and "Fix: give a path to a DeepSpeed JSON file" in line


def test_inline_deepspeed_mapping_accepted(tmp_path: Path) -> None:
    inline = {"gradient_clipping": 0.5, "zero_optimization": {"overlap_comm": True}}
    cfg = load_config(write_yaml(tmp_path, {"deepspeed": {"config": inline}}))
    assert cfg.deepspeed.config == inline


def test_relative_deepspeed_path_resolved_against_yaml_dir(tmp_path: Path, monkeypatch) -> None:
    conf_dir = tmp_path / "configs"
    conf_dir.mkdir()
    (conf_dir / "ds.json").write_text(json.dumps({"gradient_clipping": 1.0}), encoding="utf-8")
    path = write_yaml(conf_dir, {"deepspeed": {"config": "ds.json"}})
    monkeypatch.chdir(tmp_path)  # the cwd has no ds.json: only the YAML's directory does
    cfg = load_config(path)
    assert cfg.deepspeed.config == str(conf_dir / "ds.json")


def test_model_path_local_dir_and_hub_name(tmp_path: Path) -> None:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    cfg = load_config(write_yaml(tmp_path, {"model": {"path": "./models/tiny"}}))
    assert cfg.model.path == str(tmp_path / "models" / "tiny")
    assert load_config(write_yaml(tmp_path, {"model": {"path": "org/name"}})).model.path == "org/name"


def test_model_path_missing_local_dir(tmp_path: Path) -> None:
    line = problem_line(load_error(tmp_path, {"model": {"path": "./missing"}}), "model.path:")
    assert "directory not found" in line and "model.path=embedded" in line


# --- cross-field checks and methods ----------------------------------------------------------


def test_batch_size_divisibility_names_both_fields(tmp_path: Path) -> None:
    message = load_error(tmp_path, {"train": {"forget_batch_size": 10}, "ray": {"num_workers": 4}})
    line = problem_line(message, "train.forget_batch_size")
    assert "ray.num_workers (4)" in line
    assert "Fix: set train.forget_batch_size to 8 or 12" in line
    assert "train.retain_batch_size" not in message  # 8 is divisible by 4


def test_a_contrastive_job_checks_only_its_own_batch(tmp_path: Path) -> None:
    """The contrastive job reads contrastive.global_batch_size, never the unlearning batches."""
    contrastive = {"job": {"kind": "contrastive"}, "ray": {"num_workers": 3}, "train": {"forget_batch_size": 8}}
    cfg = load_config(write_yaml(tmp_path, {**contrastive, "contrastive": {"global_batch_size": 6}}))
    assert cfg.ray.num_workers == 3
    message = load_error(tmp_path, {**contrastive, "contrastive": {"global_batch_size": 8}})
    line = problem_line(message, "contrastive.global_batch_size")
    assert "ray.num_workers (3)" in line and "Fix: set contrastive.global_batch_size to 6 or 9" in line
    assert "forget_batch_size" not in message


def test_siglip_is_a_contrastive_loss_and_its_scale_and_bias_are_checked(tmp_path: Path) -> None:
    """``contrastive.loss=siglip`` loads with its initial scale and bias; a scale <= 0, a non-number bias and a
    misspelt loss are each one line naming the field."""
    job = {"job": {"kind": "contrastive"}, "contrastive": {"global_batch_size": 8}}
    cfg = load_config(write_yaml(tmp_path, job), ("contrastive.loss=siglip", "contrastive.sigmoid_scale=5"))
    assert (cfg.contrastive.loss, cfg.contrastive.sigmoid_scale, cfg.contrastive.sigmoid_bias) == ("siglip", 5.0, -10.0)
    bad = ("contrastive.sigmoid_scale=0", "contrastive.sigmoid_bias=low", "contrastive.loss=SigLIP")
    message = load_error(tmp_path, job, bad)
    assert "must be > 0.0, got 0.0" in problem_line(message, "contrastive.sigmoid_scale")
    assert "expected a number" in problem_line(message, "contrastive.sigmoid_bias")
    assert "siglip" in problem_line(message, "contrastive.loss")


def test_a_contrastive_job_is_not_refused_for_settings_it_never_reads(tmp_path: Path) -> None:
    """The checks are chosen by job.kind: method names, saliency and the embedded model's shape are unlearning's."""
    unused = {"method": {"names": [], "saliency": 0.5}, "train": {"weight_decay": 0.1}, "prepare": {"num_heads": 3}}
    cfg = load_config(write_yaml(tmp_path, {"job": {"kind": "contrastive"}, **unused}), known_methods=KNOWN)
    assert cfg.method.names == []
    message = load_error(tmp_path, unused, known_methods=KNOWN)  # the same settings for an unlearning job
    assert "method.names: must name at least one method" in message
    assert problem_line(message, "method.saliency=0.5 with train.weight_decay=0.1")
    assert problem_line(message, "prepare.hidden_size (128) must be divisible by prepare.num_heads (3)")


def test_unknown_attack_is_refused_from_the_schema_choice_list(tmp_path: Path) -> None:
    line = problem_line(load_error(tmp_path, {}, ("eval.attacks=relearn,nf5",)), "eval.attacks:")
    assert "'nf5' is not one of relearn, nf4, int8" in line and "did you mean 'nf4'?" in line


def test_a_format_name_without_a_location_is_a_missing_file_not_a_crash(tmp_path: Path) -> None:
    line = problem_line(load_error(tmp_path, {"data": {"source": "tofu"}}), "data.source:")
    assert "file not found" in line


def test_deep_checks_run_through_the_registries_once_the_others_pass(tmp_path: Path) -> None:
    """Checks that need the layers above the config get what they know passed in (Registries), and run only
    when they are given and every other check has passed."""
    from dist_unlearn.config import Registries

    built: list[str] = []

    def build_objective(cfg: RunConfig, name: str) -> object:
        built.append(name)
        raise ValueError(f"method '{name}' does not take parameter(s) gamma")

    registries = Registries(methods=KNOWN, build_objective=build_objective)
    data = {"method": {"names": ["npo"], "params": {"npo": {"gamma": 2}}}}
    assert load_config(write_yaml(tmp_path, data), known_methods=KNOWN).method.names == ["npo"]  # no registries
    assert built == []
    line = problem_line(load_error(tmp_path, data, registries=registries), "method.params.npo:")
    assert line == "method.params.npo: method 'npo' does not take parameter(s) gamma"
    built.clear()
    message = load_error(tmp_path, {**data, "train": {"steps": 0}}, registries=registries)
    assert built == [] and "method.params.npo" not in message  # the schema problem first


def test_retain_batch_zero_allowed_and_checked(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path, {"train": {"retain_batch_size": 0}}))
    assert cfg.train.retain_batch_size == 0
    message = load_error(tmp_path, {"train": {"retain_batch_size": 3}})
    line = problem_line(message, "train.retain_batch_size")
    assert "ray.num_workers (2)" in line and "to 2 or 4" in line


def test_unknown_method_with_suggestion(tmp_path: Path) -> None:
    message = load_error(tmp_path, {}, ("method.names=npoo",), known_methods=KNOWN)
    line = problem_line(message, "method.names:")
    assert "unknown method 'npoo'; did you mean 'npo'?" in line
    assert "Known methods: ga, grad_diff, npo, simnpo" in line


def test_method_names_unchecked_without_registry(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path, {}), ["method.names=whatever"]).method.names == ["whatever"]


def test_empty_method_names(tmp_path: Path) -> None:
    line = problem_line(load_error(tmp_path, {"method": {"names": []}}), "method.names:")
    assert "at least one method" in line and "method.names=grad_diff" in line


def test_params_for_unknown_method(tmp_path: Path) -> None:
    data = {"method": {"names": ["npo"], "params": {"simnpoo": {"beta": 0.1}}}}
    line = problem_line(load_error(tmp_path, data, known_methods=KNOWN), "method.params.simnpoo:")
    assert "nor a known method. Did you mean 'simnpo'?" in line
    assert "remove method.params.simnpoo" in line


def test_params_for_a_known_method_that_is_not_run_are_kept(tmp_path: Path) -> None:
    data = {"method": {"names": ["npo"], "params": {"simnpo": {"beta": 0.1}}}}
    cfg = load_config(write_yaml(tmp_path, data), known_methods=KNOWN)
    assert cfg.method.params == {"simnpo": {"beta": 0.1}}


def test_config_from_dict_header_without_path() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"train": {"steps": 0}})
    assert str(info.value).splitlines()[0] == "invalid config:"
    assert info.value.problems[0].startswith("train.steps: must be >= 1, got 0")
    assert isinstance(info.value, ValueError)


# --- round trip ------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text("{}", encoding="utf-8")
    path = write_yaml(
        tmp_path,
        {
            "method": {"names": ["ga", "npo"], "params": {"npo": {"beta": 0.2}}},
            "deepspeed": {"config": "ds.json", "zero_stage": 2},
            "ray": {"address": "auto", "use_gpu": True},
            "train": {"lr": "1e-4"},
        },
    )
    cfg = load_config(path, known_methods=KNOWN)
    plain = config_to_dict(cfg)
    assert json.loads(json.dumps(plain)) == plain
    assert config_from_dict(plain, known_methods=KNOWN) == cfg
    defaults = config_from_dict({})
    assert config_from_dict(config_to_dict(defaults)) == defaults


def test_relative_output_dir_becomes_absolute_against_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        write_yaml(tmp_path / "sub", {"output": {"dir": "runs/x"}}) if (tmp_path / "sub").mkdir() is None else None
    )
    assert cfg.output.dir == str(tmp_path / "runs" / "x")


def test_params_for_other_methods_survive_a_worker_reload(tmp_path: Path) -> None:
    """Workers rebuild the validated config without the registry: params of unrun methods must not fail."""
    data = {"method": {"names": ["npo"], "params": {"simnpo": {"beta": 0.1}}}}
    cfg = load_config(write_yaml(tmp_path, data), known_methods=KNOWN)
    assert config_from_dict(config_to_dict(cfg)).method.params == {"simnpo": {"beta": 0.1}}


# --- the shipped example configs ---------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def test_checkout_configs_are_the_packaged_ones() -> None:
    """``configs/`` of a checkout is the package data that ``dist-unlearn init`` writes (one copy)."""
    from dist_unlearn.launch.init import CONFIG_DIR, shipped_configs

    assert (REPO / "configs").resolve() == CONFIG_DIR
    names = [str(path.relative_to(REPO / "configs")) for path in SHIPPED]
    assert names == [str(rel) for rel in shipped_configs()]
    assert {"quickstart/unlearn.yaml", "quickstart/contrastive.yaml", "bench/unlearning.yaml"} <= set(names)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: str(path.relative_to(REPO / "configs")))
def test_shipped_config_loads_and_validates(path: Path, tmp_path: Path, monkeypatch) -> None:
    """What ``dist-unlearn run`` checks before any work (schema, methods, job checks, eval), from another cwd."""
    from dist_unlearn.cli import _load

    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = _load(str(path), [])
    assert cfg.job.kind == raw.get("job", {}).get("kind", "unlearn")
    assert cfg.model.path == raw["model"]["path"]
    assert cfg.output.dir == str(tmp_path / raw["output"]["dir"])
    if cfg.job.kind == "unlearn":
        assert cfg.method.names == raw["method"]["names"]
        assert cfg.train.steps == raw["train"]["steps"]
    else:
        assert cfg.contrastive.steps == raw["contrastive"]["steps"]


def test_config_command_prints_the_resolved_config_which_loads_back_unchanged(tmp_path: Path, capsys) -> None:
    from dist_unlearn.cli import main

    path = write_yaml(tmp_path, {"job": {"kind": "contrastive"}, "contrastive": {"global_batch_size": 6}})
    assert main(["config", str(path), "ray.num_workers=3", "contrastive.steps=2"]) == 0
    printed = capsys.readouterr().out
    shown = yaml.safe_load(printed)
    assert shown["ray"]["num_workers"] == 3 and shown["contrastive"]["steps"] == 2
    assert shown["train"]["lr"] == RunConfig().train.lr  # defaults filled in
    again = tmp_path / "resolved.yaml"
    again.write_text(printed)
    assert config_to_dict(load_config(again)) == config_to_dict(
        load_config(path, ("ray.num_workers=3", "contrastive.steps=2"))
    )
    assert main(["config", str(path), "ray.num_workers=4"]) == 2  # 6 does not divide over 4 workers
    assert "contrastive.global_batch_size (6) must be divisible by ray.num_workers (4)" in capsys.readouterr().err


def test_a_finished_run_may_be_extended_but_not_changed(tmp_path: Path) -> None:
    """Resuming keeps every setting a checkpoint depends on; the step count of the job kind may grow."""
    from dist_unlearn.engine.job import Job
    from dist_unlearn.engine.runner import RUN_SETTINGS_FILE, check_resumable, run_settings

    def job(kind: str, *overrides: str) -> Job:
        base = {"job": {"kind": kind}, "contrastive": {"global_batch_size": 8}}
        cfg = config_to_dict(load_config(write_yaml(tmp_path, base), overrides))
        return Job(cfg, kind, kind, "/models/target", str(tmp_path / kind))

    for kind, steps in (("contrastive", "contrastive.steps"), ("unlearn", "train.steps")):
        first = job(kind, f"{steps}=3")
        (tmp_path / kind / "checkpoints").mkdir(parents=True)
        (tmp_path / kind / RUN_SETTINGS_FILE).write_text(json.dumps(run_settings(first, 2)))
        check_resumable([job(kind, f"{steps}=5", "checkpoint.every_steps=1")], 2)  # extended: allowed
        with pytest.raises(ConfigError, match=r"other settings \(.*lr: 5e-05 -> 0.001"):
            check_resumable([job(kind, f"{steps}=5", "contrastive.lr=1e-3", "train.lr=1e-3")], 2)
        with pytest.raises(ConfigError, match="world_size: 2 -> 4"):
            check_resumable([first], 4)


def test_a_moved_output_directory_still_resumes(tmp_path: Path) -> None:
    """output.dir and the embedded models inside it may move together; a model outside may not change."""
    import shutil

    from dist_unlearn.engine.job import Job
    from dist_unlearn.engine.runner import RUN_SETTINGS_FILE, check_resumable, run_settings

    def job(out: Path, model_dir: Path) -> Job:
        cfg = config_to_dict(load_config(write_yaml(tmp_path, {}), (f"output.dir={out}",)))
        return Job(cfg, "unlearn", "ga", str(model_dir), str(out / "ga"))

    old = tmp_path / "scratch" / "run"
    (old / "ga" / "checkpoints").mkdir(parents=True)
    (old / "ga" / RUN_SETTINGS_FILE).write_text(json.dumps(run_settings(job(old, old / "embedded" / "target"), 2)))
    new = tmp_path / "project" / "run"
    shutil.copytree(old, new)
    check_resumable([job(new, new / "embedded" / "target")], 2)
    with pytest.raises(ConfigError, match="model_dir: 'embedded/target' -> '/models/other'"):
        check_resumable([job(new, Path("/models/other"))], 2)


def test_settings_written_before_an_option_existed_still_resume(tmp_path: Path) -> None:
    """A run started by a version without some option resumes under a version that has it, as long as
    the option keeps its default; set to anything else, it is a change like any other."""
    from dist_unlearn.engine.job import Job
    from dist_unlearn.engine.runner import RUN_SETTINGS_FILE, check_resumable, run_settings

    def job(*overrides: str) -> Job:
        cfg = config_to_dict(load_config(write_yaml(tmp_path, {}), overrides))
        return Job(cfg, "unlearn", "ga", "/models/target", str(tmp_path / "ga"))

    older = run_settings(job(), 2)
    del older["train"]["seed"], older["data"]  # options (and a whole section) the older version lacked
    (tmp_path / "ga" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ga" / RUN_SETTINGS_FILE).write_text(json.dumps(older))
    check_resumable([job()], 2)
    with pytest.raises(ConfigError, match=r"other settings \(train\.seed: None -> 7\)"):
        check_resumable([job("train.seed=7")], 2)


def test_a_tofu_source_brings_tofus_lengths_unless_they_are_set(tmp_path: Path) -> None:
    """``data.source=tofu:...`` without ``data.max_length`` / ``eval.max_new_tokens``: TOFU's 512 / 200
    (open-unlearning's TOFU setup); a value the user sets wins, also one equal to the plain default; other
    sources keep 64 / 16; a worker's reload keeps what was resolved."""
    (tmp_path / "forget10.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    source = f"tofu:{tmp_path}@forget10"
    cfg = load_config(write_yaml(tmp_path, {"data": {"source": source}}))
    assert (cfg.data.max_length, cfg.eval.max_new_tokens) == (512, 200)
    assert config_from_dict(config_to_dict(cfg)).data.max_length == 512
    cfg = load_config(write_yaml(tmp_path, {"data": {"source": source, "max_length": 64}}))
    assert (cfg.data.max_length, cfg.eval.max_new_tokens) == (64, 200)
    cfg = load_config(write_yaml(tmp_path, {}), [f"data.source={source}", "eval.max_new_tokens=32"])
    assert (cfg.data.max_length, cfg.eval.max_new_tokens) == (512, 32)
    cfg = load_config(write_yaml(tmp_path, {"eval": None}))
    assert (cfg.data.max_length, cfg.eval.max_new_tokens) == (64, 16)
    (tmp_path / "raw").mkdir()
    cfg = config_from_dict({"data": {"source": f"muse:{tmp_path}"}})
    assert (cfg.data.max_length, cfg.eval.max_new_tokens) == (64, 16)
