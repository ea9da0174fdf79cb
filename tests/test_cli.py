"""The CLI as a pipeline uses it: fresh processes, exit codes, text and JSON output."""

from __future__ import annotations

import jsonschema
import orjson
from conftest import EXAMPLES, run_cli


def test_validate_ok():
    result = run_cli("validate", str(EXAMPLES / "finetune.json"), str(EXAMPLES / "gpt_tp2.yaml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().count(": ok (sha256:") == 2


def test_validate_invalid_text(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"num_layers": 2, "hidden_size": 64,\n "num_attention_heads": 4, "hiden_dropout": 0.1}')
    result = run_cli("validate", str(path))
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        f"{path}:2: hiden_dropout: unknown field 'hiden_dropout'; did you mean 'hidden_dropout'? (got 0.1)"
    )


def test_validate_json_format_is_machine_readable(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"num_layers": 2.5, "hidden_size": 64, "num_attention_heads": 4}')
    result = run_cli("validate", "--format", "json", str(path), str(EXAMPLES / "finetune.json"))
    assert result.returncode == 1
    report = orjson.loads(result.stdout)
    assert report["valid"] is False and report["exit_code"] == 1
    bad, good = report["files"]
    assert bad["errors"] == [
        {
            "source": str(path),
            "line": 1,
            "field": "num_layers",
            "loc": ["num_layers"],
            "message": "Input should be a valid integer",
            "type": "int_type",
            "input": 2.5,
        }
    ]
    assert good["valid"] is True and len(good["fingerprint"]) == 64


def test_set_overrides_and_stdin():
    result = run_cli("validate", "-", "--set", "num_layers=3.5", stdin=b'{"num_layers": 2}')
    assert result.returncode == 1
    assert (
        "--set num_layers=3.5: num_layers: Input should be a valid integer (got 3.5)"
        in result.stderr.decode()
    )


def test_unreadable_input_exits_2(tmp_path):
    assert run_cli("validate", str(tmp_path / "missing.json")).returncode == 2
    (tmp_path / "broken.json").write_text("{")
    assert run_cli("validate", str(tmp_path / "broken.json")).returncode == 2


def test_usage_error_exits_2():
    assert run_cli("validate").returncode == 2
    assert run_cli("frobnicate").returncode == 2


def test_schema_to_file(tmp_path):
    out = tmp_path / "schema.json"
    result = run_cli("schema", "-o", str(out))
    assert result.returncode == 0, result.stderr
    schema = orjson.loads(out.read_bytes())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert orjson.loads(run_cli("schema").stdout) == schema
