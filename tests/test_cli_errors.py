"""Bad input fails before any work starts: exit code 2, one message naming the field and the fix,
and nothing written to the output directory."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, small_run_config, write_config

from dist_unlearn.cli import main


def run_main(args, capsys):
    """The CLI in this process (fast; the subprocess path is covered by the end-to-end tests)."""
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err


CASES = [
    ({"method": {"names": ["npoo"]}}, (), "method.names: unknown method 'npoo'; did you mean 'npo'"),
    ({"train": {"stpes": 3}}, (), "unknown key 'train.stpes'; did you mean 'train.steps'"),
    ({}, ("train.steps=abc",), "train.steps: expected an integer"),
    ({"deepspeed": {"config": "missing_ds.json"}}, (), "deepspeed.config"),
    ({"deepspeed": {"zero_stage": 5}}, (), "deepspeed.zero_stage"),
    (
        {"method": {"names": ["npo"], "params": {"npo": {"gamma": 2}}}},
        (),
        "method.params.npo: method 'npo' does not take",
    ),
    ({"method": {"names": ["npo"], "reference": "none"}}, (), "method.reference: 'npo' needs a reference model"),
    ({"train": {"forget_batch_size": 5}}, (), "train.forget_batch_size"),
    ({"data": {"source": "no_such_file.jsonl"}}, (), "data.source: file not found"),
    ({"model": {"path": "./no/such/model"}}, (), "model.path"),
    ({}, ("data.source=muse:/nonexistent/muse",), "data.source: directory not found: /nonexistent/muse"),
    ({}, ("data.source=tofu:./no/such/tofu@forget05",), "data.source: directory not found"),
]


@pytest.mark.parametrize(("sections", "overrides", "expected"), CASES, ids=[c[2][:30] for c in CASES])
def test_bad_config_fails_early_with_one_clear_message(tmp_path, capsys, sections, overrides, expected):
    out = tmp_path / "out"
    cfg = small_run_config(out)
    for name, values in sections.items():
        cfg[name] = {**cfg[name], **values}
    path = write_config(tmp_path / "run.yaml", cfg)
    code, err = run_main(["run", str(path), *overrides], capsys)
    assert code == 2, err
    assert expected in err
    assert err.startswith("dist-unlearn: invalid config")
    assert not out.exists(), "a rejected config must not start any work"


def test_missing_config_file(tmp_path, capsys):
    code, err = run_main(["run", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2
    assert "config file not found" in err


def test_malformed_override(tmp_path, capsys):
    path = write_config(tmp_path / "run.yaml", small_run_config(tmp_path / "out"))
    code, err = run_main(["run", str(path), "train.steps"], capsys)
    assert code == 2
    assert "section.key=value" in err


def test_tofu_source_that_does_not_exist_is_one_line_not_a_traceback(tmp_path):
    """The installed console script, as a user runs it: exit 2 before any work, one line naming
    data.source and the fix, no Python traceback."""
    out = tmp_path / "out"
    path = write_config(tmp_path / "run.yaml", small_run_config(out))
    result = run_cli(["run", str(path), "data.source=tofu:/nonexistent/tofu"], check=False, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    problem = [line for line in lines if line.startswith("data.source:")]
    assert problem == [
        "data.source: directory not found: /nonexistent/tofu (in tofu:/nonexistent/tofu). Fix: give a directory of "
        "TOFU subset files such as forget10_perturbed.json and retain90.json (.json/.jsonl/.parquet), or a hub "
        "dataset name such as locuslab/TOFU"
    ], lines
    assert not out.exists()


def test_tofu_directory_without_the_needed_subsets(tmp_path, capsys):
    data = tmp_path / "tofu"
    data.mkdir()
    (data / "forget05_perturbed.json").write_text(json.dumps([{"question": "q?", "answer": "a."}]))
    (data / "retain_perturbed.json").write_text(json.dumps([{"question": "q?", "answer": "a."}]))
    out = tmp_path / "out"
    path = write_config(tmp_path / "run.yaml", small_run_config(out))
    code, err = run_main(["run", str(path), f"data.source=tofu:{data}@forget05"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"data.source: {data} lacks the retain95 subset. Fix: add retain95.json" in err
    code, err = run_main(["run", str(path), f"data.source=tofu:{data}@forget07"], capsys)
    assert code == 2 and "Fix: use @forget01, @forget05 or @forget10" in err
    assert not out.exists()


def test_output_dir_that_is_an_existing_file(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    for out in (blocker, blocker / "run"):
        path = write_config(tmp_path / "run.yaml", small_run_config(out))
        code, err = run_main(["run", str(path)], capsys)
        assert code == 2 and "Traceback" not in err
        assert f"output.dir: {blocker} is a file, so {out} cannot be a directory. Fix: choose another output.dir" in err
    assert blocker.read_text() == "not a directory"


def test_misspelt_parameter_of_a_method_that_is_not_run(tmp_path, capsys):
    cfg = small_run_config(tmp_path / "out", method={"names": ["grad_diff"], "params": {"npo": {"betta": 0.1}}})
    code, err = run_main(["run", str(write_config(tmp_path / "run.yaml", cfg))], capsys)
    assert code == 2
    assert "method.params.npo: method 'npo' does not take" in err and "betta" in err
    assert "(this method is not in method.names)" in err
    assert not (tmp_path / "out").exists()


def test_empty_config_file_is_refused_with_the_way_to_run_on_defaults(tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here yet\n")
    code, err = run_main(["run", str(path)], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"{path} holds no settings. Fix: write the settings to use (`dist-unlearn init` writes examples), "
        "or write {} to run on every default"
    )
