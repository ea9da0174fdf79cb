"""Foreign documents and overrides: no input makes bioconf's work grow with a value's size, and every
failure is a bioconf error (one line naming the file, the field and the value), never a traceback.

What could hang (an alias bomb, 10**12 layers) runs in a subprocess whose timeout is the bound.
"""

from __future__ import annotations

import io
import json
import string
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import ROOT, fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from bioconf.checkpoint.context import write_checkpoint_context
from bioconf.checkpoint.shapes import LayerPrefixes, shaped_weights
from bioconf.cli import main
from bioconf.errors import BioconfError, ConfigError, ConfigIssue, ConfigReadError, OverrideError
from bioconf.schema import ModelConfig
from bioconf.schema import model as schema_model
from bioconf.schema.files import parse_json_document, parse_yaml_document, validate_document
from bioconf.schema.overrides import MAX_DEPTH, MAX_VALUES

BASE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}

# 342 bytes: 9 levels of 9 aliases each, 9**9 (387 million) strings once expanded.
ALIAS_BOMB = b"""a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""

# The same with merge keys: each level's mapping copies the one before nine times when constructed.
MERGE_BOMB = b"a0: &a0 {k: v}\n" + b"".join(
    f"a{n}: &a{n} {{<<: [{', '.join([f'*a{n - 1}'] * 9)}], k{n}: v}}\n".encode() for n in range(1, 10)
)


def cli(*args: str, stdin: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """``python -m bioconf ARGS`` in a fresh process; a hang fails the test at ``timeout``."""
    return subprocess.run(
        [sys.executable, "-m", "bioconf", *args], input=stdin, capture_output=True, cwd=ROOT, timeout=timeout
    )


def one_json_document(stdout: bytes) -> Any:
    """stdout holds exactly one JSON document (orjson refuses trailing data)."""
    return orjson.loads(stdout)


def only_issue(error: BioconfError) -> ConfigIssue:
    (issue,) = error.issues
    assert "\n" not in str(issue)
    return issue


def nested_json(levels: int) -> bytes:
    return b'{"num_layers": ' + b"[" * levels + b"]" * levels + b"}"


# ---- YAML: aliases, recursion, nesting -------------------------------------------------------------


@pytest.mark.parametrize("bomb", [ALIAS_BOMB, MERGE_BOMB], ids=["aliases", "merge-keys"])
def test_an_alias_bomb_is_refused_while_composing(tmp_path: Path, bomb: bytes):
    path = tmp_path / "bomb.yaml"
    path.write_bytes(bomb)
    result = cli("validate", str(path), "--format", "json", timeout=20)
    assert result.returncode == 2, result.stderr
    (issue,) = one_json_document(result.stdout)["files"][0]["errors"]
    assert issue["type"] == "too_many_values"
    assert str(MAX_VALUES) in issue["message"] and issue["source"] == str(path)
    assert issue["line"] is not None and issue["field"]


def test_aliases_within_the_budget_still_work():
    document = parse_yaml_document(
        b"num_layers: 2\nhidden_size: &h 64\nnum_attention_heads: 4\nffn_hidden_size: *h\n"
        b"override_parent_fields: &keep [bf16, seq_length]\n",
        "ok.yaml",
    )
    assert validate_document(document).ffn_hidden_size == 64


@pytest.mark.parametrize(
    "text",
    [b"a: &a [*a]\n", b"a: &a {x: *a}\n", b"num_layers: 2\nb: &b [1, [2, *b]]\n", b"&r {a: *r}\n"],
)
def test_a_recursive_yaml_structure_is_an_error(text: bytes):
    with pytest.raises(ConfigReadError) as caught:
        parse_yaml_document(text, "rec.yaml")
    issue = only_issue(caught.value)
    assert issue.type == "recursive_alias" and issue.source == "rec.yaml" and issue.line is not None


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (b"a: " + b"[" * 10_000 + b"]" * 10_000 + b"\n", "yaml_invalid"),  # libyaml's own limit
        (b"a: " + b"[" * 500 + b"]" * 500 + b"\n", "too_deep"),
        (b"a:\n" + b"".join(b"  " * i + b"b:\n" for i in range(1, 3000)), "too_deep"),
        (b"a: &x [" + b"[" * 20 + b"]" * 20 + b"]\nb: [[[[[[[[[[[[[[*x]]]]]]]]]]]]]]\n", "too_deep"),
    ],
    ids=["flow-10000", "flow-500", "block-3000", "alias-deepens"],
)
def test_deep_yaml_is_an_error_not_a_recursion_error(text: bytes, kind: str):
    with pytest.raises(ConfigReadError) as caught:
        parse_yaml_document(text, "deep.yaml")
    assert only_issue(caught.value).type == kind


def test_yaml_strings_and_values_beyond_reading_are_errors():
    huge_int = b"num_layers: 1" + b"0" * 5000 + b"\n"
    with pytest.raises(ConfigReadError) as caught:
        parse_yaml_document(huge_int, "big.yaml")
    issue = only_issue(caught.value)
    assert (issue.type, issue.field, issue.line) == ("number_out_of_range", "num_layers", 1)
    assert len(str(issue)) < 300
    with pytest.raises(ConfigReadError) as caught:
        parse_yaml_document(b"a: 2020-13-45\n", "date.yaml")
    assert "month must be in 1..12" in str(caught.value)
    with pytest.raises(ConfigReadError) as caught:
        parse_yaml_document(b"a: " + b"x" * 100_000 + b"\n", "long.yaml")
    assert only_issue(caught.value).type == "too_long"


def test_integers_beyond_64_bits_in_yaml_keys_are_errors_and_serialize(tmp_path: Path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"{2**70}: 1\nnum_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\n")
    result = cli("validate", str(path), "--format", "json")
    assert result.returncode == 2, result.stderr
    (issue,) = one_json_document(result.stdout)["files"][0]["errors"]
    assert (issue["type"], issue["field"], issue["line"]) == ("number_out_of_range", str(2**70), 1)
    with pytest.raises(ConfigReadError) as caught:
        parse_yaml_document(b"num_layers: 2\nx: {" + str(2**80).encode() + b": 1}\n", "nested.yaml")
    assert only_issue(caught.value).field == "x"


def test_issues_of_any_input_serialize_bounded():
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    deep: Any = 0
    for _ in range(10_000):
        deep = {"x": [deep]}
    issue = ConfigIssue(
        "m" * 100_000,
        "t",
        loc=(10**5000 * 7, "k" * 100_000, 1.5),
        input={10**5000 * 7: cyclic, "deep": deep, "wide": list(range(100_000)), "big": 2**100},
    )
    data = issue.to_dict()
    text = orjson.dumps(data)
    assert len(text) < 20_000
    assert data["input"]["big"] == str(2**100)
    assert data["loc"][0].startswith("<integer of")
    line = str(issue)
    assert "\n" not in line and len(line) < 3000


# ---- JSON and overrides: nesting, sizes ------------------------------------------------------------


@pytest.mark.parametrize(("levels", "kind"), [(10_000, "json_invalid"), (300, "too_deep"), (40, "too_deep")])
def test_deep_json_is_an_error(levels: int, kind: str):
    with pytest.raises(ConfigReadError) as caught:
        parse_json_document(nested_json(levels), "deep.json")
    issue = only_issue(caught.value)
    assert issue.type == kind and issue.source == "deep.json" and issue.line == 1


def test_deep_json_through_the_cli_is_one_json_document(tmp_path: Path):
    """300 levels made orjson.dumps of the error fail (its limit is 255): stdout was not JSON."""
    for levels in (300, 10_000):
        path = tmp_path / f"deep{levels}.json"
        path.write_bytes(nested_json(levels))
        result = cli("validate", str(path), "--format", "json")
        assert result.returncode == 2, result.stderr
        assert one_json_document(result.stdout)["exit_code"] == 2
    deep = "[" * 300 + "]" * 300
    stdin = json.dumps(BASE).encode()
    result = cli("validate", "-", "--format", "json", f"--set=window_size={deep}", stdin=stdin)
    assert result.returncode == 1, result.stderr
    (issue,) = one_json_document(result.stdout)["files"][0]["errors"]
    assert issue["type"] == "too_deep" and issue["source"].startswith("--set window_size=")


def test_json_value_counts_and_string_lengths_are_bounded():
    many = orjson.dumps({**BASE, "window_size": list(range(MAX_VALUES))})
    with pytest.raises(ConfigReadError) as caught:
        parse_json_document(many, "many.json")
    assert only_issue(caught.value).type == "too_many_values"
    long = orjson.dumps({**BASE, "model_cls": "x" * 1_000_000})
    with pytest.raises(ConfigReadError) as caught:
        parse_json_document(long, "long.json")
    issue = only_issue(caught.value)
    assert (issue.type, issue.field) == ("too_long", "model_cls")
    nested_ok = orjson.dumps({**BASE, "window_size": [[[]]] * 10})
    assert parse_json_document(nested_ok, "ok.json").data["window_size"] == [[[]]] * 10
    deepest_ok = orjson.dumps({"a": json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))})
    assert parse_json_document(deepest_ok, "ok.json").data


@pytest.mark.parametrize(
    ("override", "kind"),
    [
        ("window_size=" + "[" * 100 + "]" * 100, "too_deep"),
        ("note=" + "x" * 100_000, "too_long"),
        ({"window_size": list(range(MAX_VALUES + 1))}, "too_many_values"),
        ({"note": "x" * 100_000}, "too_long"),
        ({"window_size": json.loads("[" * 40 + "]" * 40)}, "too_deep"),
    ],
    ids=["deep", "long", "many-mapping", "long-mapping", "deep-mapping"],
)
def test_overrides_have_the_same_limits(override: str | dict[str, Any], kind: str):
    with pytest.raises(OverrideError) as caught:
        validate_document(parse_json_document(orjson.dumps(BASE), "c.json"), [override])
    issue = only_issue(caught.value)
    assert issue.type == kind
    assert len(issue.source or "") < 300 and len(str(issue)) < 1000


# ---- unknown keys: "did you mean" for a bounded number -----------------------------------------------


def test_ten_thousand_unknown_keys_cost_a_bounded_number_of_suggestions(monkeypatch: pytest.MonkeyPatch):
    import difflib

    calls = []
    real = difflib.get_close_matches

    def counting(*args: Any, **kwargs: Any) -> list[str]:
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(difflib, "get_close_matches", counting)
    document = {"hiden_size": 1, **{f"unknown_key_{i}": i for i in range(10_000)}, **BASE}
    with pytest.raises(ConfigError) as caught:
        validate_document(parse_json_document(orjson.dumps(document), "many.json"))
    issues = caught.value.issues
    assert len(issues) == 10_001
    assert issues[0].message == "unknown field 'hiden_size'; did you mean 'hidden_size'?"
    assert len(calls) == schema_model.MAX_SUGGESTIONS  # not one difflib search per key
    assert issues[-1].message == "unknown field 'unknown_key_9999'"
    assert {issue.line for issue in issues[:3]} == {1}


def test_a_long_unknown_key_is_not_searched(monkeypatch: pytest.MonkeyPatch):
    import difflib

    monkeypatch.setattr(difflib, "get_close_matches", lambda *a, **k: pytest.fail("searched"))
    with pytest.raises(ConfigError) as caught:
        validate_document(parse_json_document(orjson.dumps({**BASE, "h" * 10_000: 1}), "long.json"))
    issue = only_issue(caught.value)
    assert issue.type == "unknown_field" and len(str(issue)) < 1000


# ---- a field's value does not size the work: num_layers 10**12 -------------------------------------


def _resolve_config(tmp_path: Path, **fields: Any) -> Path:
    ckpt = tmp_path / "ckpt"
    if not ckpt.exists():
        write_checkpoint_context(ModelConfig(**BASE, vocab_size=128, seq_length=32), ckpt)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "num_layers": 10**12, "initial_ckpt_path": str(ckpt), **fields}))
    return path


def test_resolve_with_a_trillion_layers_answers_at_once(tmp_path: Path):
    config = _resolve_config(
        tmp_path,
        ffn_hidden_size=512,
        initial_ckpt_skip_keys_with_these_prefixes=["decoder.layers.0.", "decoder.layers.1"],
    )
    result = cli("resolve", str(config), "--format", "json", timeout=20)
    assert result.returncode == 3, result.stderr
    errors = {e["field"]: e for e in one_json_document(result.stdout)["errors"]}
    assert "(not skipped: decoder.layers.)" in errors["num_layers"]["message"]
    assert (
        "(not skipped: decoder.layers.{2..9,20..99,200..999,2000..9999,20000..99999,200000..999999,"
        in errors["ffn_hidden_size"]["message"]
    )
    skipped = _resolve_config(
        tmp_path, ffn_hidden_size=512, initial_ckpt_skip_keys_with_these_prefixes=["decoder.layers."]
    )
    result = cli("resolve", str(skipped), "--format", "json", timeout=20)
    assert result.returncode == 0, result.stderr
    notes = one_json_document(result.stdout)["notes"]
    fine = "ffn_hidden_size: 512 here (from this config) but 256 in the checkpoint: fine, every weight it "
    assert fine in "\n".join(notes)


def test_per_layer_prefixes_stay_a_pattern():
    config = ModelConfig(**{**BASE, "num_layers": 10**12})
    weights = shaped_weights(config, "ffn_hidden_size")
    assert weights is not None and weights.count == 10**12
    (part,) = weights.parts
    assert isinstance(part, LayerPrefixes) and part[0] == "decoder.layers.0.mlp."
    assert part[-1] == f"decoder.layers.{10**12 - 1}.mlp."
    assert not part.not_skipped(["decoder."]) and not part.not_skipped(["decoder.layers"])
    assert part.not_skipped(["decoder.layers.0.self_attention."]).layers == ((0, 10**12),)
    assert part.not_skipped(["decoder.layers.0.mlp.linear_fc1"]).layers == ((0, 10**12),)
    assert part.not_skipped(["decoder.layers.7."]).layers == ((0, 7), (8, 10**12))


@fuzz_settings(150)
@given(
    layers=st.integers(0, 130),
    skips=st.lists(
        st.one_of(
            st.integers(0, 140).map(lambda i: f"decoder.layers.{i}."),
            st.integers(0, 140).map(lambda i: f"decoder.layers.{i}"),
            st.integers(0, 20).map(lambda i: f"decoder.layers.{i}.mlp."),
            st.integers(0, 20).map(lambda i: f"decoder.layers.{i}.mlp.linear_fc1."),
            st.integers(0, 20).map(lambda i: f"decoder.layers.0{i}."),
            st.sampled_from(
                ["decoder.", "decoder.layers", "decoder.layers.", "encoder.", "decoder.layers.x", "d"]
            ),
        ),
        max_size=12,
    ),
)
def test_skip_coverage_matches_prefix_by_prefix_matching(layers: int, skips: list[str]):
    """The pattern answers exactly what matching every expanded prefix answered."""
    part = LayerPrefixes("decoder", "mlp.", ((0, layers),) if layers else ())
    expected = [i for i in range(layers) if not any(part.prefix(i).startswith(s) for s in skips)]
    assert list(part.not_skipped(skips)) == [part.prefix(i) for i in expected]


# ---- fuzz: parsers, validation and the CLI only ever raise bioconf errors ---------------------------

_FIELDS = sorted(ModelConfig.model_fields)
_TEXT = st.text(string.printable + "é\u2028\x00", max_size=12)
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=12,
)
_DOCUMENTS = st.dictionaries(st.sampled_from(_FIELDS) | _TEXT, _JSON_VALUES, max_size=6).map(
    lambda extra: {**BASE, **extra}
)
_OVERRIDES = st.lists(
    st.tuples(st.sampled_from(_FIELDS) | _TEXT, st.sampled_from(["=", "+="]), _JSON_VALUES | _TEXT).map(
        lambda t: f"{t[0]}{t[1]}{t[2] if isinstance(t[2], str) else json.dumps(t[2])}"
    ),
    max_size=3,
)
_YAML_SNIPPETS = st.lists(
    st.sampled_from(
        [
            "a: &a [1, 2]\n",
            "b: *a\n",
            "c: [*a, *a]\n",
            "d: &d {x: *a}\n",
            "e: {<<: *d, y: 1}\n",
            "num_layers: 2\n",
            "f: !!binary aGk=\n",
            "g: 2020-01-01\n",
            "h: 0x1F\n",
            "i: 1_000\n",
            "? [1]\n: 2\n",
            "j: !!set {a}\n",
            "k: [\n",
            "l: *missing\n",
            "m: .nan\n",
            f"n: {2**70}\n",
            "o: &o [*o]\n",
            "--- \n",
            "p: !!python/name:os.system\n",
            "2021-02-30: x\n",
            "q: 1:30:00\n",
        ]
    ),
    max_size=6,
).map(lambda parts: "".join(parts).encode())


def _run_main(args: list[str], stdin: bytes = b"") -> tuple[int, bytes]:
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    saved_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with redirect_stdout(out), redirect_stderr(io.StringIO()):
            code = main(args)
        out.flush()
    finally:
        sys.stdin = saved_stdin
    return code, out.buffer.getvalue()  # type: ignore[attr-defined]


def _parse_and_validate(raw: bytes, yaml: bool, overrides: list[str]) -> None:
    try:
        document = parse_yaml_document(raw, "f.yaml") if yaml else parse_json_document(raw, "f.json")
        validate_document(document, overrides)
    except BioconfError as error:
        assert error.issues
        orjson.dumps(error.to_list())
        assert all(len(str(issue).splitlines()) == 1 for issue in error.issues)


@fuzz_settings(60, suppress_health_check=[HealthCheck.too_slow])
@given(document=_DOCUMENTS, overrides=_OVERRIDES, as_yaml=st.booleans())
def test_fuzz_documents_and_overrides(document: dict[str, Any], overrides: list[str], as_yaml: bool):
    import yaml

    raw = yaml.safe_dump(document).encode() if as_yaml else json.dumps(document).encode()
    _parse_and_validate(raw, as_yaml, overrides)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("c.yaml" if as_yaml else "c.json")
        path.write_bytes(raw)
        args = ["validate", str(path), "--format", "json", *(f"--set={o}" for o in overrides)]
        code, stdout = _run_main(args)
    assert code in (0, 1, 2)
    assert one_json_document(stdout)["exit_code"] == code


@fuzz_settings(60)
@given(raw=_YAML_SNIPPETS | st.binary(max_size=64), overrides=_OVERRIDES)
def test_fuzz_raw_bytes(raw: bytes, overrides: list[str]):
    _parse_and_validate(raw, True, overrides)
    _parse_and_validate(raw, False, overrides)
    code, stdout = _run_main(["validate", "-", "--format", "json", *(f"--set={o}" for o in overrides)], raw)
    assert code in (0, 1, 2)
    assert one_json_document(stdout)["exit_code"] == code
