"""The config service over real HTTP: `bioconf serve` in a subprocess on a free loopback port, httpx.

Covers each route and status code, that a 422 lists exactly the CLI's errors, the limits (body size
while reading, nesting, value counts, YAML aliases, a slow body), the checkpoint-root rules, and a
property-based run of schemathesis against /openapi.json (no 500s, every response as documented).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest
import schemathesis
from conftest import EXAMPLES, ROOT, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bioconf.checkpoint.context import write_checkpoint_context
from bioconf.errors import CheckpointForbiddenError, UsageError
from bioconf.schema import ModelConfig, json_schema, load_config
from bioconf.service.checkpoints import CheckpointRoot, locate_checkpoint

BASE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128, "seq_length": 32}
PROBLEM = "application/problem+json"
TIMEOUT_S = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(*args: str) -> Iterator[str]:
    """Run `bioconf serve ARGS` on a free loopback port until the block ends; yield its base URL."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bioconf", "serve", "--port", str(port), *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(f"{url}/healthz", timeout=1).raise_for_status()
                    break
                except httpx.TransportError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        pytest.fail(f"bioconf serve did not come up:\n{log.read().decode()}")
                    time.sleep(0.05)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


def _checkpoint(path: Path, **fields: object) -> Path:
    write_checkpoint_context(ModelConfig.model_validate({**BASE, **fields}), path)
    return path


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """Two checkpoint roots and, outside them, a real checkpoint that symlinks inside point to."""
    base = tmp_path_factory.mktemp("roots")
    first, second, outside = base / "first", base / "second", base / "outside"
    _checkpoint(first / "small")
    _checkpoint(second / "other")
    _checkpoint(outside / "secret")
    (first / "broken" / "context").mkdir(parents=True)
    (first / "broken" / "context" / "io.json").write_text("{not json")
    (first / "empty").mkdir()
    (first / "escape").symlink_to(outside / "secret", target_is_directory=True)
    (first / "sneaky" / "context").mkdir(parents=True)
    (first / "sneaky" / "context" / "io.json").symlink_to(outside / "secret" / "context" / "io.json")
    (first / "inside").symlink_to(first / "small", target_is_directory=True)
    return {"first": first, "second": second, "outside": outside}


@pytest.fixture(scope="module")
def url(roots) -> Iterator[str]:
    root_args = ["--checkpoint-root", str(roots["first"]), "--checkpoint-root", str(roots["second"])]
    with serve(*root_args, "--request-timeout", str(TIMEOUT_S)) as base:
        yield base


@pytest.fixture
def client(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as http:
        yield http


def _problem(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status
    assert problem["type"] == f"https://bioconf.dev/problems/{kind}"
    assert problem["title"] and problem["detail"]
    return problem


# ---- validate ------------------------------------------------------------------------------------------


def test_validate_returns_the_canonical_config_and_its_fingerprint(client):
    response = client.post(
        "/v1/validate",
        content=(EXAMPLES / "pretrain_esm2_small.json").read_bytes(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    expected = load_config(EXAMPLES / "pretrain_esm2_small.json")
    body = response.json()
    assert body == {
        "valid": True,
        "fingerprint": expected.fingerprint(),
        "config": expected.to_dict(exclude_unset=True),
        "warnings": expected.advice(),
    }


def test_validate_reads_yaml_by_content_type_and_applies_overrides(client):
    response = client.post(
        "/v1/validate",
        params=[("set", "num_layers=8"), ("set", "hidden_dropout=0.2")],
        content=(EXAMPLES / "gpt_tp2.yaml").read_bytes(),
        headers={"Content-Type": "application/yaml"},
    )
    assert response.status_code == 200, response.text
    expected = load_config(EXAMPLES / "gpt_tp2.yaml", ["num_layers=8", "hidden_dropout=0.2"])
    assert response.json()["fingerprint"] == expected.fingerprint()


def test_an_invalid_config_is_a_422_problem_with_exactly_the_cli_errors(client):
    body = orjson.dumps({**BASE, "num_layers": 3.7, "hiden_dropout": 0.1, "params_dtype": "fp13"})
    overrides = ["seq_length=0"]
    response = client.post(
        "/v1/validate", params={"set": overrides}, content=body, headers={"Content-Type": "application/json"}
    )
    problem = _problem(response, 422, "invalid-config")
    cli = run_cli("validate", "-", "--format", "json", *(f"--set={o}" for o in overrides), stdin=body)
    assert cli.returncode == 1
    cli_errors = orjson.loads(cli.stdout)["files"][0]["errors"]
    for error in cli_errors:
        if error["source"] == "<stdin>":
            error["source"] = "<body>"
    assert problem["errors"] == cli_errors
    assert {e["field"] for e in problem["errors"]} >= {"num_layers", "hiden_dropout", "params_dtype"}
    assert any(e["source"] == "--set seq_length=0" for e in problem["errors"])


@pytest.mark.parametrize(
    ("content_type", "body", "error_type"),
    [
        ("application/json", b'{"num_layers": ', "json_invalid"),
        ("application/json", b"[1, 2]", "not_a_mapping"),
        ("application/json", b"\xff\xfe", "json_invalid"),
        ("application/json", b"", "json_invalid"),
        ("application/json", b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "too_deep"),
        ("application/json", orjson.dumps({f"k{i}": 1 for i in range(400)}), "too_many_keys"),
        ("application/json", orjson.dumps({"skip": ["a."] * 5000}), "too_many_values"),
        ("application/yaml", b"num_layers: [1, 2\n", "yaml_invalid"),
        ("application/yaml", b"num_layers: 2\nnum_layers: 3\n", "duplicate_key"),
        ("application/yaml", b"num_layers: !!python/object/apply:os.system ['true']\n", "yaml_invalid"),
        ("application/yaml", b"seq_length: 100000000000000000000000000000\n", "number_out_of_range"),
        ("application/yaml", b"init_method_std: [.nan]\n", "number_out_of_range"),
        # a "billion laughs": a few hundred bytes whose aliases expand into 10^5 values
        (
            "text/yaml",
            b"a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
            + b"".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n".encode() for p, n in zip("abcd", "bcde")),
            "too_many_values",
        ),
    ],
    ids=[
        "truncated",
        "list",
        "not-utf8",
        "empty",
        "deep",
        "keys",
        "values",
        "yaml",
        "yaml-dup",
        "yaml-tag",
        "yaml-bigint",
        "yaml-nan",
        "laughs",
    ],
)
def test_an_unreadable_body_is_a_400_problem(client, content_type, body, error_type):
    response = client.post("/v1/validate", content=body, headers={"Content-Type": content_type})
    problem = _problem(response, 400, "unreadable-config")
    assert [e["type"] for e in problem["errors"]] == [error_type]


def test_other_content_types_are_415(client):
    response = client.post("/v1/validate", content=b"num_layers=2", headers={"Content-Type": "text/plain"})
    _problem(response, 415, "unsupported-media-type")


def test_a_body_over_the_limit_is_413_even_without_content_length(client):
    big = b'{"num_layers": 2, "pad": "' + b" " * (1 << 20) + b'"}'
    _problem(
        client.post("/v1/validate", content=big, headers={"Content-Type": "application/json"}),
        413,
        "body-too-large",
    )

    def chunks() -> Iterator[bytes]:  # a chunked body: no Content-Length to trust
        yield b'{"pad": "'
        for _ in range(20):
            yield b" " * 65536

    response = client.post("/v1/validate", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    _problem(response, 413, "body-too-large")
    yaml = b"num_layers: 2\n" + b"# pad\n" * 12000  # YAML is parsed in pure Python: a lower limit
    _problem(
        client.post("/v1/validate", content=yaml, headers={"Content-Type": "application/yaml"}),
        413,
        "body-too-large",
    )


def test_a_body_that_stops_arriving_is_408_after_the_time_limit(url):
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"num_layers"'
        )
        start = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(65536)
        elapsed = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert TIMEOUT_S - 0.5 < elapsed < TIMEOUT_S + 10


# ---- schema, health, documents -------------------------------------------------------------------------


def test_schema_has_an_etag_and_answers_304_when_it_matches(client):
    response = client.get("/v1/schema")
    assert response.status_code == 200
    assert response.json() == json_schema()
    etag = response.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = client.get("/v1/schema", headers={"If-None-Match": header})
        assert again.status_code == 304, header
        assert again.headers["etag"] == etag and again.content == b""
    assert client.get("/v1/schema", headers={"If-None-Match": '"other"'}).status_code == 200


def test_health_openapi_and_unknown_routes(client):
    assert client.get("/healthz").json()["status"] == "ok"
    document = client.get("/openapi.json").json()
    assert set(document["paths"]) == {"/v1/validate", "/v1/resolve", "/v1/schema", "/healthz"}
    model = json_schema()
    del model["$schema"], model["$id"]
    assert document["components"]["schemas"]["ModelConfig"] == model
    missing = client.get("/nothing")
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM
    wrong_method = client.put("/v1/validate")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"


def test_the_editor_page_and_its_assets_come_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'src="static/editor.js"' in page.text
    for name, media in (("editor.js", "text/javascript"), ("editor.css", "text/css")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media)
        assert "http://" not in asset.text and "https://" not in asset.text  # nothing from the internet
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/app.py").status_code == 404


# ---- resolve -------------------------------------------------------------------------------------------


def _resolve(client: httpx.Client, config: dict, **params: object) -> httpx.Response:
    return client.post(
        "/v1/resolve",
        params=params,
        content=orjson.dumps(config),
        headers={"Content-Type": "application/json"},
    )


def test_resolve_gives_each_value_with_its_source_as_the_cli_does(client, roots, tmp_path):
    response = _resolve(client, BASE, checkpoint="small", set="hidden_dropout=0.2", policy="seed")
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["policy"] == "seed"
    assert report["fields"]["num_layers"] == {"value": 2, "source": "checkpoint"}
    assert "hidden_dropout" not in report["fields"]  # the seed policy drops it, and says so
    assert any(note.startswith("hidden_dropout:") for note in report["notes"])
    config = tmp_path / "config.json"
    config.write_bytes(orjson.dumps(BASE))
    cli = run_cli(
        "resolve", str(config), "--checkpoint", str(roots["first"] / "small"), "--policy", "seed",
        "--set", "hidden_dropout=0.2", "--format", "json",
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert report == orjson.loads(cli.stdout)
    explicit = _resolve(client, BASE, checkpoint="small", set="hidden_dropout=0.2").json()
    assert explicit["fields"]["hidden_dropout"] == {"value": 0.2, "source": "user"}


def test_resolve_finds_checkpoints_under_every_root(client, roots):
    assert _resolve(client, BASE, checkpoint="other").status_code == 200  # the second root
    absolute = _resolve(client, BASE, checkpoint=str(roots["second"] / "other"))
    assert absolute.status_code == 200
    assert absolute.json()["checkpoint"]["path"] == str(roots["second"] / "other" / "context" / "io.json")
    from_config = _resolve(client, {**BASE, "initial_ckpt_path": "small"})
    assert from_config.status_code == 200
    assert _resolve(client, BASE, checkpoint="inside").status_code == 200  # a symlink within its root


@pytest.mark.parametrize(
    "path",
    [
        "../outside/secret",
        "small/../../outside/secret",
        "escape",  # a symlink to a checkpoint outside the root
        "sneaky",  # a folder whose context/io.json is such a symlink
        "/etc",
        "\x00",
    ],
)
def test_resolve_refuses_paths_outside_the_roots_with_403(client, roots, path):
    _problem(_resolve(client, BASE, checkpoint=path), 403, "forbidden-checkpoint")


def test_resolve_refuses_an_absolute_path_outside_the_roots(client, roots):
    _problem(_resolve(client, BASE, checkpoint=str(roots["outside"] / "secret")), 403, "forbidden-checkpoint")
    via_config = _resolve(client, {**BASE, "initial_ckpt_path": str(roots["outside"] / "secret")})
    _problem(via_config, 403, "forbidden-checkpoint")


def test_resolve_status_codes(client):
    _problem(_resolve(client, BASE, checkpoint="missing"), 404, "checkpoint-not-found")
    _problem(_resolve(client, BASE, checkpoint="empty"), 404, "checkpoint-not-found")
    mismatch = _problem(
        _resolve(client, {**BASE, "num_layers": 4}, checkpoint="small"), 409, "checkpoint-mismatch"
    )
    assert [e["field"] for e in mismatch["errors"]] == ["num_layers"]
    # Valid alone, but the seed policy takes 4 heads from the checkpoint, which TP=8 does not divide.
    merge = {**BASE, "num_attention_heads": 8, "tensor_model_parallel_size": 8}
    _problem(_resolve(client, merge, checkpoint="small", policy="seed"), 409, "invalid-merge")
    _problem(_resolve(client, BASE, checkpoint="broken"), 422, "invalid-checkpoint")
    _problem(_resolve(client, {**BASE, "num_layers": 0}, checkpoint="small"), 422, "invalid-config")
    _problem(_resolve(client, BASE, checkpoint="small", policy="newest"), 400, "invalid-request")
    _problem(_resolve(client, BASE), 400, "invalid-request")


def test_locate_checkpoint_without_roots_refuses_everything(tmp_path):
    with pytest.raises(CheckpointForbiddenError) as refused:
        locate_checkpoint("small", ())
    assert refused.value.status == 403
    with pytest.raises(UsageError, match="must be a folder"):
        CheckpointRoot.of(tmp_path / "missing")


# ---- the command and the layers -------------------------------------------------------------------------


def test_serve_refuses_a_missing_checkpoint_root(tmp_path):
    result = run_cli("serve", "--checkpoint-root", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert b"a checkpoint root must be a folder" in result.stderr


def test_serve_without_the_service_extra_says_what_to_install():
    program = (
        "import sys; sys.modules['fastapi'] = None; from bioconf.cli import main; sys.exit(main(['serve']))"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2
    assert b"pip install 'bioconf[service]'" in result.stderr


def test_the_schema_layer_never_imports_the_web_stack():
    program = (
        "import sys, bioconf.schema, bioconf.cli; bioconf.cli.build_parser(); bioconf.schema.json_schema(); "
        "web = {'fastapi', 'starlette', 'uvicorn', 'httpx'}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in web))"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---- property-based: schemathesis against /openapi.json ------------------------------------------------


POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
FUZZ = [
    ("POST", "/v1/validate", POSITIVE),
    ("POST", "/v1/validate", NEGATIVE),
    ("POST", "/v1/resolve", POSITIVE),
    ("POST", "/v1/resolve", NEGATIVE),
    ("GET", "/v1/schema", POSITIVE),  # no parameters or body to make negative
    ("GET", "/healthz", POSITIVE),
]


@pytest.mark.parametrize(("method", "path", "mode"), FUZZ, ids=lambda v: str(v).lstrip("/"))
def test_api_fuzz(url, method, path, mode):
    """Requests generated from /openapi.json, conforming (positive) or not (negative): no 500s; every status,
    content type, header and body as documented; negative data refused. Half the positive configs get
    a valid core (BASE) and a known checkpoint name so that 200s and the checkpoint errors come up too:
    random configs satisfy the JSON Schema yet nearly always break a megatron cross-field rule (422),
    which is also why positive data is not required to be accepted."""
    operation = schemathesis.openapi.from_url(f"{url}/openapi.json")[path][method]
    names = st.sampled_from(
        ["small", "other", "missing", "empty", "broken", "escape", "../first/small", "/etc"]
    )

    @given(case=operation.as_strategy(mode), core=st.booleans(), checkpoint=names)
    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case, core, checkpoint):
        if mode is POSITIVE and core and isinstance(case.body, dict):
            case.body = {**case.body, **BASE}
            if path == "/v1/resolve":
                case.query = {**(case.query or {}), "checkpoint": checkpoint}
        case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance], timeout=30)

    check()
