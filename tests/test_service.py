"""The config service: each route and status code, that a 422 lists exactly the CLI's errors, the
limits (body size while reading, nesting, value counts, YAML aliases, a slow body), the
checkpoint-root rules, and a property-based run of schemathesis against /openapi.json (no 500s,
every response as documented).

Most tests run in process, with no socket: the ASGI app `bioconf serve` runs, built with the options
the live server below is given (`create_app(ServiceSettings(...))`), reached through httpx's ASGI
transport (tests/service_client.py). What they check is the app's own work (statuses, problem types,
bodies, headers), which is the same without a server; they skip its start-up and the loopback round
trips, and none waits for a server to come up. The body limits are among them: the transport
hands a chunked body (no Content-Length) to the app chunk by chunk, only as it asks for more, so the
413 test also shows, deterministically, that the app stopped reading at the limit. schemathesis runs
against the app directly (`schemathesis.openapi.from_asgi`).

A real socket is kept only where the connection or the command is the subject:

- test_a_body_that_stops_arriving_is_408_after_the_time_limit: a raw socket to `bioconf serve` sends
  the headers and the start of a body, then nothing; the 408 comes from the time limit on a body
  that stops arriving over a connection, measured as the client sees it.
- test_bioconf_serve_gives_the_app_its_options: the same server over HTTP answers as the in-process
  app does, at the body limit and for checkpoints under each root or outside them: the command
  starts, serves, and passes on the options the in-process tests assume.

That server is `bioconf serve` in a subprocess on a port the system picks (``--port 0``: no port to
race for); it is started with the module's first test and waited for only by these two. Without a
socket but in a fresh process: test_serve_refuses_a_missing_checkpoint_root,
test_serve_without_the_service_extra_says_what_to_install and
test_the_schema_layer_never_imports_the_web_stack (the command, or the package, as a user starts
it); the 422 and resolve tests also run the CLI, to compare with its output. `serve` stays here for
tests/test_service_browser.py, whose browser needs a real server.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest
import schemathesis
from conftest import EXAMPLES, ROOT, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_client import asgi_client

from bioconf.checkpoint.context import write_checkpoint_context
from bioconf.errors import CheckpointForbiddenError, UsageError
from bioconf.schema import ModelConfig, json_schema, load_config
from bioconf.service import ServiceSettings, create_app
from bioconf.service.app import validated
from bioconf.service.checkpoints import CheckpointRoot, read_checkpoint_bytes

BASE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128, "seq_length": 32}
PROBLEM = "application/problem+json"
TIMEOUT_S = 3


LISTENING = re.compile(rb"Uvicorn running on (http://127\.0\.0\.1:\d+)")


@contextmanager
def starting(*args: str) -> Iterator[Callable[[], str]]:
    """Start `bioconf serve ARGS` on a loopback port the system picks (``--port 0``: no port to race
    for), stopped when the block ends; yield a function that waits until it answers /healthz and
    returns its base URL, so that other work can go on while it starts."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bioconf", "serve", "--port", "0", *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def wait() -> str:
            deadline = time.monotonic() + 60
            while True:
                # pread: the server writes at the file offset it shares with `log`, left alone here
                output = os.pread(log.fileno(), os.fstat(log.fileno()).st_size, 0)
                listening = LISTENING.search(output)
                if listening:
                    url = listening[1].decode()
                    try:
                        httpx.get(f"{url}/healthz", timeout=1).raise_for_status()
                        return url
                    except httpx.TransportError:
                        pass
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"bioconf serve did not come up:\n{output.decode()}")
                time.sleep(0.05)

        try:
            yield wait
        finally:
            process.terminate()
            process.wait(timeout=10)


@contextmanager
def serve(*args: str) -> Iterator[str]:
    """Run `bioconf serve ARGS` on a loopback port until the block ends; yield its base URL."""
    with starting(*args) as wait:
        yield wait()


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
def app(roots):
    """The app `bioconf serve --checkpoint-root FIRST --checkpoint-root SECOND --request-timeout 3`
    runs (the command's other options at their defaults, which are ServiceSettings' own)."""
    settings = ServiceSettings(
        checkpoint_roots=(str(roots["first"]), str(roots["second"])), request_timeout=TIMEOUT_S
    )
    return create_app(settings)


@pytest.fixture
def client(app) -> Iterator[httpx.Client]:
    """An httpx client of the app in this process (no socket)."""
    with asgi_client(app, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def live_server(roots) -> Iterator[Callable[[], str]]:
    """`bioconf serve` with the same options, for what needs a real connection: started, not waited for."""
    root_args = ["--checkpoint-root", str(roots["first"]), "--checkpoint-root", str(roots["second"])]
    with starting(*root_args, "--request-timeout", str(TIMEOUT_S)) as wait:
        yield wait


@pytest.fixture(scope="module", autouse=True)
def _start_the_live_server_early(request) -> None:
    """When a selected test needs the live server, start it with the module's first test, so that it
    starts while the in-process tests run (not under xdist, which may run that test elsewhere)."""
    if hasattr(request.config, "workerinput"):
        return
    if any("live_url" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("live_server")


@pytest.fixture
def live_url(live_server) -> str:
    """The live server's base URL, once it answers."""
    return live_server()


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


@pytest.mark.parametrize(
    ("example", "overrides"),
    [
        ("pretrain_esm2_small.json", []),
        ("finetune.json", ['override_parent_fields+=["seq_length"]', "hidden_dropout=1e-5"]),
        ("gpt_tp2.yaml", ["model_cls=esm2", "layernorm_epsilon=1e-12"]),  # a family's defaults, not set
    ],
)
def test_the_answer_is_built_from_one_dump_with_what_the_config_methods_give(example, overrides):
    """The answer takes the fingerprint and the config from one dump of the config (the methods
    dump it once each): they must be ``fingerprint()`` and ``to_dict(exclude_unset=True)``, the
    config in sorted order, as ``save_config`` writes it."""
    config = load_config(EXAMPLES / example, overrides)
    answer = orjson.loads(validated(config))
    assert answer == {
        "valid": True,
        "fingerprint": config.fingerprint(),
        "config": config.to_dict(exclude_unset=True),
        "warnings": config.advice(),
    }
    assert list(answer["config"]) == sorted(config.model_fields_set)


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

    head, pad, sent = b'{"pad": "', b" " * 65536, []

    def chunks() -> Iterator[bytes]:  # a chunked body: no Content-Length to trust
        yield head
        for _ in range(20):
            sent.append(pad)
            yield pad

    response = client.post("/v1/validate", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    _problem(response, 413, "body-too-large")
    # In process the app pulls each chunk as it reads: refused with the one that passed the limit.
    assert len(sent) == (ServiceSettings().max_body_bytes - len(head)) // len(pad) + 1 < 20
    yaml = b"num_layers: 2\n" + b"# pad\n" * 12000  # YAML is parsed in pure Python: a lower limit
    _problem(
        client.post("/v1/validate", content=yaml, headers={"Content-Type": "application/yaml"}),
        413,
        "body-too-large",
    )


def test_a_client_that_leaves_during_the_body_is_a_400_problem(app):
    """The body is read from the ASGI messages themselves: a disconnect before it is complete is the
    same 400 problem as when Starlette's request stream read it."""
    messages = [
        {"type": "http.request", "body": b'{"num_layers": ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/validate",
        "raw_path": b"/v1/validate",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 400
    assert orjson.loads(sent[1]["body"])["type"] == "https://bioconf.dev/problems/invalid-request"


def test_a_body_that_stops_arriving_is_408_after_the_time_limit(live_url):
    port = int(live_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"num_layers"'
        )
        start = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:  # closed before a whole head: the assertion below shows what came
                break
            reply += chunk
        elapsed = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert TIMEOUT_S - 0.5 < elapsed < TIMEOUT_S + 10


def test_bioconf_serve_gives_the_app_its_options(live_url, client):
    """`bioconf serve` runs the app the in-process tests build: the same checkpoint roots and body limit
    (its request timeout: the 408 test), and over HTTP it answers as in process."""
    fits = orjson.dumps(BASE).ljust(ServiceSettings().max_body_bytes)  # trailing spaces: still JSON
    requests = [
        ("/v1/validate", {}, fits),
        ("/v1/validate", {}, fits + b" "),
        *(
            ("/v1/resolve", {"checkpoint": name}, orjson.dumps(BASE))
            for name in ("small", "other", "escape", "missing")
        ),
    ]
    statuses = []
    with httpx.Client(base_url=live_url, timeout=30) as live:
        for path, params, body in requests:
            over_http, in_process = (
                http.post(path, params=params, content=body, headers={"Content-Type": "application/json"})
                for http in (live, client)
            )
            assert over_http.status_code == in_process.status_code
            assert over_http.headers["content-type"] == in_process.headers["content-type"]
            assert over_http.json() == in_process.json()
            statuses.append(over_http.status_code)
    assert statuses == [200, 413, 200, 200, 403, 404]


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


def test_reading_a_checkpoint_without_roots_refuses_everything(tmp_path):
    with pytest.raises(CheckpointForbiddenError) as refused:
        read_checkpoint_bytes("small", (), 1 << 20)
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


@pytest.fixture(scope="module")
def api(app) -> schemathesis.BaseSchema:
    """The app's /openapi.json, its requests sent to the app in this process."""
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize(("method", "path", "mode"), FUZZ, ids=lambda v: str(v).lstrip("/"))
def test_api_fuzz(api, method, path, mode):
    """Requests generated from /openapi.json, conforming (positive) or not (negative): no 500s; every status,
    content type, header and body as documented; negative data refused. Half the positive configs get
    a valid core (BASE) and a known checkpoint name so that 200s and the checkpoint errors come up too:
    random configs satisfy the JSON Schema yet nearly always break a megatron cross-field rule (422),
    which is also why positive data is not required to be accepted."""
    operation = api[path][method]
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
