"""Bad input fails before any work starts: exit code 2, one message naming the field and the fix,
and nothing written to the output directory."""

from __future__ import annotations

import pytest
from conftest import small_run_config, write_config

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
