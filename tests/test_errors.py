"""One error hierarchy: each class carries its exit code and its RFC 9457 problem, and the CLI and
the service read them from there."""

from __future__ import annotations

import inspect

import orjson
import pytest
from conftest import run_cli

import bioconf.errors as errors
from bioconf.cli import build_parser
from bioconf.service.app import Problem

CLASSES = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, errors.BioconfError) and cls is not errors.BioconfError
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_says_what_it_means(cls):
    assert cls.exit_code in (errors.EXIT_INVALID, errors.EXIT_USAGE, errors.EXIT_MISMATCH)
    assert 400 <= cls.status < 600 and cls.title and cls.kind
    error = cls.one("something is wrong", "kind_of_wrong", source="x.json", loc=("num_layers",), input=2**70)
    body = orjson.loads(Problem.of(error).response().body)
    assert body["status"] == cls.status and body["title"] == cls.title
    assert body["type"] == errors.PROBLEM_BASE + cls.kind
    assert body["errors"] == [
        {
            "source": "x.json",
            "line": None,
            "field": "num_layers",
            "loc": ["num_layers"],
            "message": "something is wrong",
            "type": "kind_of_wrong",
            "input": str(2**70),  # beyond what JSON numbers hold: as text, never a crash
        }
    ]


def test_one_kind_one_status():
    by_kind = {}
    for cls in CLASSES:
        assert by_kind.setdefault(cls.kind, cls.status) == cls.status, cls


def test_the_cli_help_names_every_command_that_exits_3():
    epilog = build_parser().epilog
    assert "3 a checkpoint whose weights do not fit the config (resolve, run)" in epilog


def test_a_cli_exit_code_is_the_error_class_s(tmp_path):
    missing = run_cli("validate", str(tmp_path / "missing.json"), "--format", "json")
    assert missing.returncode == errors.ConfigReadError.exit_code
    assert orjson.loads(missing.stdout)["exit_code"] == errors.ConfigReadError.exit_code
    config = tmp_path / "c.json"
    config.write_text('{"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}')
    no_checkpoint = run_cli("resolve", str(config), "--format", "json")
    assert no_checkpoint.returncode == errors.UsageError.exit_code
    assert orjson.loads(no_checkpoint.stdout)["errors"][0]["field"] == "initial_ckpt_path"
    nowhere = run_cli("resolve", str(config), "--checkpoint", str(tmp_path / "nowhere"))
    assert nowhere.returncode == errors.CheckpointNotFoundError.exit_code
