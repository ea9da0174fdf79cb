"""Config files: JSON and YAML in, errors with file and line, atomic canonical writes."""

from __future__ import annotations

import os

import orjson
import pytest
from conftest import EXAMPLES

from bioconf.schema import ConfigError, ConfigReadError, ModelConfig, load_config, save_config


@pytest.mark.parametrize(
    "name", sorted(p.name for p in EXAMPLES.glob("*.*") if p.suffix in {".json", ".yaml"})
)
def test_examples_are_valid(name):
    assert isinstance(load_config(EXAMPLES / name), ModelConfig)


def test_yaml_reads_exponent_floats_like_json(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nlayernorm_epsilon: 1e-6\n")
    assert load_config(path).layernorm_epsilon == 1e-6


def test_json_errors_name_file_line_field_and_value(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "num_layers": 2,\n  "hidden_size": 64,\n  "num_attention_heads": 4.5\n}\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    (issue,) = excinfo.value.issues
    assert (issue.source, issue.line, issue.field, issue.input) == (str(path), 4, "num_attention_heads", 4.5)
    assert str(issue) == f"{path}:4: num_attention_heads: Input should be a valid integer (got 4.5)"


def test_yaml_errors_carry_lines(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nparams_dtype: bf17\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert [(i.line, i.field) for i in excinfo.value.issues] == [(4, "params_dtype")]


@pytest.mark.parametrize(
    ("name", "text", "kind", "line"),
    [
        ("broken.json", '{"num_layers": 2,\n "hidden_size": }', "json_invalid", 2),
        ("broken.yaml", "num_layers: [1,\n", "yaml_invalid", 2),
        ("list.json", "[1, 2]", "not_a_mapping", 1),
        ("dup.yaml", "num_layers: 2\nnum_layers: 3\n", "duplicate_key", 2),
    ],
)
def test_unreadable_input(tmp_path, name, text, kind, line):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigReadError) as excinfo:
        load_config(path)
    (issue,) = excinfo.value.issues
    assert (issue.type, issue.line, issue.source) == (kind, line, str(path))


@pytest.mark.parametrize("value", ["123456789012345678901234567890", ".nan", ".inf", "[1, -.inf]"])
def test_yaml_numbers_json_cannot_hold_are_errors(tmp_path, value):
    path = tmp_path / "big.yaml"
    path.write_text(f"num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nwindow_size: {value}\n")
    with pytest.raises(ConfigReadError) as excinfo:
        load_config(path)
    (issue,) = excinfo.value.issues
    assert (issue.type, issue.field, issue.line) == ("number_out_of_range", "window_size", 4)


def test_non_finite_floats_are_rejected_in_python_too():
    with pytest.raises(ValueError, match="finite"):
        ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, hidden_dropout=float("nan"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigReadError, match="cannot read file: No such file"):
        load_config(tmp_path / "nope.json")


def test_overrides_apply_after_the_file():
    config = load_config(EXAMPLES / "gpt_tp2.yaml", ["num_layers=8"])
    assert config.num_layers == 8 and config.tensor_model_parallel_size == 2


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_save_round_trip(tmp_path, suffix):
    config = load_config(EXAMPLES / "gpt_tp2.yaml")
    path = tmp_path / f"out{suffix}"
    save_config(config, path)
    assert load_config(path) == config
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    config = load_config(EXAMPLES / "gpt_tp2.yaml")
    path = tmp_path / "out.json"
    path.write_bytes(b'{"old": true}')

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        save_config(config, path)
    assert orjson.loads(path.read_bytes()) == {"old": True}  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
