"""The config service against hostile input and a hostile file system.

- A checkpoint swapped for a symlink to one outside the root while requests read it (``renameat2``
  with ``RENAME_EXCHANGE`` in a tight loop, in another process): no answer may carry the outside
  checkpoint's settings, none may be a 500. The check-by-path-then-read-by-path code this replaced
  let between 1 answer in 70 and 1 in 5 through with the outside settings, and 3-24% were 500s,
  under this test; the service now reads through the file descriptors it checked.
- The lookup itself, with and without ``openat2`` (in this process, where the switch applies):
  symlinks that stay in their root are followed, any that leads out is refused, no OSError escapes.
- The worker pool: a job past its time limit is stopped (its worker killed and replaced), a job
  given up before it began never runs, a full pool refuses at once with 503.
- Any request body and query, however odd: a problem document, never a 500 (hypothesis).

Requests go to the ASGI app in process (tests/service_client.py); the app's workers are processes.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import orjson
import pytest
from conftest import fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from service_client import asgi_client

from bioconf.checkpoint.context import parse_checkpoint_config, write_checkpoint_context
from bioconf.errors import BioconfError
from bioconf.schema import ModelConfig
from bioconf.service import ServiceSettings, checkpoints, create_app
from bioconf.service.app import Problem, WorkerError, WorkerPool
from bioconf.service.checkpoints import CheckpointRoot, read_checkpoint_bytes

BASE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128, "seq_length": 32}
PROBLEM = "application/problem+json"
INSIDE, OUTSIDE = 0.1, 0.9  # hidden_dropout of the checkpoint in the root, and of the one outside it


def _checkpoint(path: Path, **fields: object) -> Path:
    write_checkpoint_context(ModelConfig.model_validate({**BASE, **fields}), path)
    return path


def _resolve(client: httpx.Client, checkpoint: str, body: bytes = orjson.dumps(BASE)) -> httpx.Response:
    return client.post(
        "/v1/resolve",
        params={"checkpoint": checkpoint},
        content=body,
        headers={"Content-Type": "application/json"},
    )


def _assert_problem(response: httpx.Response) -> None:
    assert response.headers["content-type"] == PROBLEM, response.text
    problem = response.json()
    assert problem["status"] == response.status_code
    assert problem["type"].startswith(("https://bioconf.dev/problems/", "about:blank"))
    assert problem["title"] and problem["detail"]


# ---- the swap race ---------------------------------------------------------------------------------------


# Swaps its two paths with renameat2(RENAME_EXCHANGE) until SIGTERM, in its own process so that the
# swapping loop takes nothing from the requests' share of this process's GIL. libc's wrapper, else the
# raw system call; "refused: WHY" and exit 3 when the kernel or the file system does not do it.
SWAPPER = r"""
import ctypes, os, platform, signal, sys
a, b = map(os.fsencode, sys.argv[1:3])
libc = ctypes.CDLL(None, use_errno=True)
wrapper = getattr(libc, "renameat2", None)
if wrapper is not None:
    wrapper.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    exchange = lambda: wrapper(-100, a, -100, b, 2)
else:
    number = {"x86_64": 316, "aarch64": 276}.get(platform.machine())
    if number is None:
        print(f"refused: no renameat2 in libc, no known system call number on {platform.machine()}")
        sys.exit(3)
    libc.syscall.restype = ctypes.c_long
    args = (ctypes.c_int(-100), a, ctypes.c_int(-100), b, ctypes.c_uint(2))
    exchange = lambda: libc.syscall(ctypes.c_long(number), *args)
if exchange() != 0:
    print("refused:", os.strerror(ctypes.get_errno()), flush=True)
    sys.exit(3)
exchange()
swaps = 0
signal.signal(signal.SIGTERM, lambda *_: (print(swaps, flush=True), os._exit(0)))
print("ready", flush=True)
while True:
    if exchange() != 0:
        print("failed:", os.strerror(ctypes.get_errno()), flush=True)
        os._exit(4)
    swaps += 1
"""


@contextmanager
def _swapping(real: Path, link: Path) -> Iterator[dict[str, int]]:
    """Keep exchanging the folder ``real`` and the symlink ``link`` until the block ends (the swap
    count is in the yielded dict then); leave them as found."""
    process = subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(real), str(link)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    first = process.stdout.readline().strip()
    if first != "ready":
        process.wait(timeout=10)
        pytest.skip(f"cannot swap folders atomically here: {first}")
    counts = {"swaps": 0}
    try:
        yield counts
    finally:
        process.terminate()
        last = process.stdout.read().strip()
        process.wait(timeout=10)
        if real.is_symlink():  # stopped in the swapped state: swap back
            os.rename(real, link.with_name("swapped-back"))
            os.rename(link, real)
            os.rename(link.with_name("swapped-back"), link)
        assert last.isdigit(), f"the swapping process failed: {last}"
        counts["swaps"] = int(last)


RACE_CAP_SECONDS = 120
"""A race stops after its reads, or after this long on a machine too loaded to make them (then
``_check_race`` says how many it made): a count, not a rate, so a busy CI machine does not fail it."""


def _race(tmp_path: Path, swapped: str, reads: int, one: Callable[[], str]) -> collections.Counter[str]:
    """Checkpoint A in the root ``tmp_path/root``, B outside it with other settings; while another
    process keeps exchanging A's ``context/`` (or A itself) with a symlink to B's, 8 threads call
    ``one()`` until ``reads`` calls are made, each reading A once and saying what it got. Returns the
    counts."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    _checkpoint(root / "A", hidden_dropout=INSIDE)
    _checkpoint(outside / "B", hidden_dropout=OUTSIDE)
    real, link = (
        (root / "A" / "context", outside / "B" / "context")
        if swapped == "context"
        else (root / "A", outside / "B")
    )
    swap = tmp_path / "swap"
    swap.symlink_to(link, target_is_directory=True)
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + RACE_CAP_SECONDS

    def reader() -> None:
        while sum(outcomes.values()) < reads and time.monotonic() < deadline:
            try:
                outcome = one()
            except Exception as error:  # what a server answers with a 500
                outcome = f"500 {type(error).__name__}: {error}"
            with lock:
                outcomes[outcome] += 1

    with _swapping(real, swap) as swaps:
        threads = [threading.Thread(target=reader) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    print(f"{swapped}: {sum(outcomes.values())} reads during {swaps['swaps']} swaps: {dict(outcomes)}")
    return outcomes


def _check_race(outcomes: collections.Counter[str], at_least: int) -> None:
    """None of B's settings, no 500; A's settings and refusals both seen (or the race was not run)."""
    total = sum(outcomes.values())
    assert total >= at_least, outcomes
    bad = {outcome: n for outcome, n in outcomes.items() if outcome.startswith(("200 LEAKED", "500"))}
    assert not bad, f"{bad} of {total} requests ({dict(outcomes)})"
    assert outcomes["200 inside"] and outcomes["403"], f"the race did not happen: {dict(outcomes)}"


def _settings(hidden_dropout: float) -> str:
    return "200 inside" if hidden_dropout == INSIDE else f"200 LEAKED {hidden_dropout}"


@pytest.mark.parametrize("swapped", ["context", "folder"])
def test_a_symlink_swapped_in_while_resolving_never_leaks_the_checkpoint_it_points_to(tmp_path, swapped):
    """Through /v1/resolve: every answer is A's settings (200) or a refusal (403; 404 when a lookup
    meets A half swapped), never B's settings, never a 500."""
    (tmp_path / "root").mkdir()
    app = create_app(ServiceSettings(checkpoint_roots=(str(tmp_path / "root"),)))

    def resolve_a() -> str:
        response = _resolve(http, "A")
        if response.status_code != 200:
            _assert_problem(response)
            return str(response.status_code)
        return _settings(response.json()["fields"]["hidden_dropout"]["value"])

    with asgi_client(app) as http:
        _check_race(_race(tmp_path, swapped, 800, resolve_a), at_least=800)


@pytest.mark.parametrize("swapped", ["context", "folder"])
def test_the_walk_alone_never_reads_through_a_swapped_in_symlink(tmp_path, monkeypatch, swapped):
    """The same race against the lookup without openat2 (the walk component by component, in this
    process), many more times a second."""
    monkeypatch.setattr(checkpoints._openat2_beneath, "enabled", False)
    (tmp_path / "root").mkdir()
    roots = (CheckpointRoot.of(tmp_path / "root"),)

    def read_a() -> str:
        try:
            raw, paths = read_checkpoint_bytes("A", roots, 1 << 20)
        except BioconfError as error:
            return str(error.status)
        return _settings(parse_checkpoint_config(raw, paths).config.hidden_dropout)

    _check_race(_race(tmp_path, swapped, 800, read_a), at_least=800)


# ---- the lookup, with and without openat2 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict[str, Path]:
    """A root (configured through a symlink to it, so that its given and real paths differ) and,
    outside it, checkpoint B; inside, symlinks of every kind and things that are not checkpoints."""
    base = tmp_path_factory.mktemp("tree")
    root, outside = base / "root", base / "outside"
    (base / "alias").symlink_to(root, target_is_directory=True)
    _checkpoint(root / "small", hidden_dropout=INSIDE)
    _checkpoint(outside / "B", hidden_dropout=OUTSIDE)
    links = {
        "relative": "small",
        "absolute-real": str(root / "small"),
        "absolute-given": str(base / "alias" / "small"),
        "climb-out": "../outside/B",
        "absolute-out": str(outside / "B"),
        "absolute-out-by-dots": f"{root}/../outside/B",
        "loop": "loop",
        "dangling": "nothing",
        "via-root": ".",  # the root itself: no checkpoint there
    }
    for name, target in links.items():
        (root / name).symlink_to(target)
    (root / "deep" / "er").mkdir(parents=True)
    (root / "deep" / "er" / "up").symlink_to("../../small")
    (root / "context-out" / "context").parent.mkdir()
    (root / "context-out" / "context").symlink_to(outside / "B" / "context")
    (root / "json-out" / "context").mkdir(parents=True)
    (root / "json-out" / "context" / "io.json").symlink_to(outside / "B" / "context" / "io.json")
    (root / "json-in" / "context").mkdir(parents=True)
    (root / "json-in" / "context" / "io.json").symlink_to("../../small/context/io.json")
    (root / "fifo" / "context").mkdir(parents=True)
    os.mkfifo(root / "fifo" / "context" / "io.json")
    (root / "folder-json" / "context" / "io.json").mkdir(parents=True)
    (root / "plain-file").write_text("{}")
    return {"base": base, "root": root, "alias": base / "alias", "outside": outside}


@pytest.fixture(params=["openat2", "walk"])
def lookup(request, monkeypatch) -> str:
    """Each lookup test twice: with the kernel's openat2 where it has one, and with the walk alone
    (switched in this process: the lookups below run here, not in the service's workers)."""
    if request.param == "walk":
        monkeypatch.setattr(checkpoints._openat2_beneath, "enabled", False)
    elif not checkpoints._openat2_beneath.enabled:
        pytest.skip("no openat2 on this kernel: the walk alone serves")
    return request.param


@pytest.fixture(scope="module")
def tree_roots(tree) -> tuple[CheckpointRoot, ...]:
    return (CheckpointRoot.of(tree["alias"]),)


def _status(call: Callable[[], object]) -> int:
    try:
        call()
    except BioconfError as error:
        return error.status
    return 200


@pytest.mark.parametrize(
    "name",
    [
        "small",
        "./small/",
        "relative",
        "absolute-real",
        "absolute-given",
        "deep/er/up",
        "json-in",
        "{real}/small",
    ],
)
def test_symlinks_that_stay_in_their_root_are_followed(tree, tree_roots, lookup, name):
    name = name.format(real=tree["root"])
    raw, paths = read_checkpoint_bytes(name, tree_roots, 1 << 20)
    assert parse_checkpoint_config(raw, paths).config.hidden_dropout == INSIDE
    if not name.startswith("/"):  # named as requested, under the root as configured
        assert paths.io_json == tree["alias"].joinpath(name, "context", "io.json")


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("climb-out", 403),
        ("absolute-out", 403),
        ("absolute-out-by-dots", 403),
        ("context-out", 403),
        ("json-out", 403),
        ("{outside}/B", 403),
        ("{base}/root/../outside/B", 403),
        ("small/../../outside/B", 403),
        ("/etc", 403),
        ("loop", 404),
        ("dangling", 404),
        ("via-root", 404),
        ("plain-file", 404),
        ("fifo", 404),
        ("folder-json", 404),
        ("missing", 404),
        ("{given}", 404),
        ("x" * 300, 400),
        ("small/" * 1000, 400),
    ],
)
def test_every_way_out_is_refused_and_no_lookup_is_an_oserror(tree, tree_roots, lookup, name, status):
    name = name.format(outside=tree["outside"], base=tree["base"], given=tree["alias"])
    assert _status(lambda: read_checkpoint_bytes(name, tree_roots, 1 << 20)) == status


def test_the_service_follows_and_refuses_the_same_links(tree):
    """Through the app, whose workers read on the root's descriptor the server opened."""
    app = create_app(ServiceSettings(checkpoint_roots=(str(tree["alias"]),)))
    with asgi_client(app) as http:
        for name, status in [("relative", 200), ("absolute-given", 200), ("context-out", 403), ("loop", 404)]:
            response = _resolve(http, name)
            assert response.status_code == status, response.text
            if status == 200:
                assert response.json()["fields"]["hidden_dropout"]["value"] == INSIDE
            else:
                _assert_problem(response)


# ---- the worker pool -----------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


async def _when_free(pool: WorkerPool, fn: Callable[..., object], *args: object) -> object:
    """``fn(*args)`` in ``pool`` as soon as a slot is free: a job stopped at its time limit holds its
    slot until its worker is killed, a few milliseconds after its request was answered."""
    for _ in range(100):
        try:
            return await pool.run(anyio.current_time() + 60, fn, *args)
        except Problem:
            await anyio.sleep(0.05)
    raise AssertionError("no slot came free")


def test_a_job_past_its_time_limit_is_stopped_and_its_worker_replaced():
    pool = WorkerPool(workers=1, waiting=0)

    async def scenario() -> None:
        first = await pool.run(anyio.current_time() + 60, os.getpid)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.run(anyio.current_time() + 0.5, time.sleep, 60)
        assert time.monotonic() - start < 5
        second = await _when_free(pool, os.getpid)
        assert second != first and not _alive(first)  # killed at the limit, and replaced

    try:
        anyio.run(scenario)
    finally:
        pool.close()


def test_a_full_pool_refuses_at_once_and_a_job_given_up_before_it_began_never_runs(tmp_path):
    pool = WorkerPool(workers=1, waiting=1)
    marker = tmp_path / "ran"

    async def scenario() -> None:
        await pool.run(anyio.current_time() + 60, os.getpid)  # the worker is up
        now = anyio.current_time

        async def expect_timeout(limit: float, fn: Callable[..., object], *args: object) -> None:
            with pytest.raises(TimeoutError):
                await pool.run(now() + limit, fn, *args)

        async with anyio.create_task_group() as group:
            group.start_soon(expect_timeout, 1.5, time.sleep, 60)  # takes the worker
            await anyio.sleep(0.2)
            group.start_soon(expect_timeout, 0.5, os.mkdir, str(marker))  # waits, then gives up
            await anyio.sleep(0.2)
            start = time.monotonic()
            with pytest.raises(Problem) as refused:
                await pool.run(now() + 60, os.getpid)
            assert time.monotonic() - start < 0.1  # at once, not at the limit
            assert (refused.value.status, refused.value.kind) == (503, "busy")
            assert refused.value.headers == {"Retry-After": "1"}
        assert isinstance(await _when_free(pool, os.getpid), int)

    try:
        anyio.run(scenario)
    finally:
        pool.close()
    assert not marker.exists()  # dropped: its request stopped waiting before a worker was free


def test_a_worker_that_fails_or_dies_is_a_worker_error_and_is_replaced():
    pool = WorkerPool(workers=1, waiting=0)

    async def scenario() -> None:
        first = await _when_free(pool, os.getpid)
        with pytest.raises(WorkerError, match="ValueError"):  # a bug in a job: its traceback
            await pool.run(anyio.current_time() + 60, int, "not a number")
        assert await _when_free(pool, os.getpid) == first  # the worker lives on
        with pytest.raises(WorkerError, match="EOFError"):
            await pool.run(anyio.current_time() + 60, os._exit, 3)
        assert await _when_free(pool, os.getpid) != first  # a new one

    try:
        anyio.run(scenario)
    finally:
        pool.close()


def test_a_bioconf_error_in_a_worker_is_the_same_problem(tmp_path):
    (tmp_path / "broken" / "context").mkdir(parents=True)
    (tmp_path / "broken" / "context" / "io.json").write_text("{not json")
    with asgi_client(create_app(ServiceSettings(checkpoint_roots=(str(tmp_path),)))) as http:
        problem = _resolve(http, "broken")
        assert problem.status_code == 422
        _assert_problem(problem)
        assert problem.json()["errors"][0]["source"] == str(tmp_path / "broken" / "context" / "io.json")
        yaml = http.post(
            "/v1/validate", content=b"num_layers: [1, 2\n", headers={"Content-Type": "text/yaml"}
        )
        assert yaml.status_code == 400 and yaml.json()["errors"][0]["type"] == "yaml_invalid"
        yaml_body = b"".join(f"{k}: {v}\n".encode() for k, v in BASE.items())
        assert (
            http.post("/v1/validate", content=yaml_body, headers={"Content-Type": "text/yaml"}).status_code
            == 200
        )


# ---- any request: a problem, never a 500 ----------------------------------------------------------------

FIELDS = sorted(ModelConfig.model_fields)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**63 + 2),
    st.integers(min_value=10**30, max_value=10**4000).map(lambda n: n * 7),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["\u202e\u0000", "\U0001f9ec" * 50, "e\u0301", "\ufeff", "\u2028", "a" * 5000]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=40,
)
ABSOLUTE = st.sampled_from(["/", "/etc/passwd", "/proc/self/root/etc", "//", "/tmp", "/dev/zero"])
PATHS = st.one_of(
    st.sampled_from(
        ["small", "./small/", "..", "small/../small", "\x00", "small\x00/x", "~", "%2e%2e/x", "..\\x"]
    ),
    st.sampled_from(["relative", "absolute-given", "deep/er/up", "json-in"]),  # the tree's links, in
    st.sampled_from(["climb-out", "absolute-out", "context-out", "json-out", "loop", "fifo", "folder-json"]),
    ABSOLUTE,
    st.text(max_size=30),
    st.integers(min_value=200, max_value=6000).map(lambda n: "a" * n),
    st.lists(
        st.sampled_from(["..", ".", "", "small", "context", "io.json", "x" * 300, "\u00e9", "\u202e"]),
        max_size=8,
    ).map("/".join),
)


def _deep(depth: int, opener: str, closer: str) -> str:
    return opener * depth + closer * depth


@st.composite
def bodies(draw) -> tuple[str, bytes]:
    """A content type and a body: JSON (stdlib-written, so huge integers and NaN pass through), YAML,
    deep nesting, raw bytes, or another media type."""
    kind = draw(st.sampled_from(["json", "yaml", "deep", "raw", "other"]))
    document = {
        **BASE,
        **draw(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=20), VALUES, max_size=8)),
    }
    if draw(st.booleans()):
        document["initial_ckpt_path"] = draw(PATHS)
    if kind == "json":
        return "application/json", json.dumps(document, ensure_ascii=draw(st.booleans())).encode(
            "utf-8", "surrogatepass"
        )
    if kind == "yaml":
        text = json.dumps(document, ensure_ascii=True)  # JSON is YAML, with escapes YAML reads too
        return draw(st.sampled_from(["application/yaml", "text/yaml"])), text.encode()
    if kind == "deep":
        depth = draw(st.integers(min_value=30, max_value=100_000))
        nested = (
            _deep(depth, "[", "]")
            if draw(st.booleans())
            else _deep(depth, '{"a":', "}").replace("}", "0}", 1)
        )
        media = draw(st.sampled_from(["application/json", "application/yaml"]))
        return media, f'{{"num_layers": {nested}}}'.encode()
    if kind == "raw":
        return draw(st.sampled_from(["application/json", "application/yaml"])), draw(st.binary(max_size=300))
    return draw(st.sampled_from(["text/plain", "", "application/problem+json", "multipart/form-data"])), b"{}"


QUERY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
OVERRIDES = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(FIELDS), QUERY_TEXT),
        st.builds(lambda k: f"{k}={10**400}", st.sampled_from(FIELDS)),
        st.builds(lambda k, d: f"{k}={_deep(d, '[', ']')}", st.sampled_from(FIELDS), st.integers(30, 2_000)),
        st.sampled_from(["=", "a" * 5000 + "=1", "override_parent_fields+=x", "num_layers+=1", "x.y.z=1"]),
        QUERY_TEXT,
    ),
    max_size=4,
)


@pytest.fixture(scope="module")
def hostile_client(tree) -> Iterator[httpx.Client]:
    app = create_app(ServiceSettings(checkpoint_roots=(str(tree["alias"]), str(tree["outside"] / "B"))))
    with asgi_client(app) as http:
        yield http


def test_any_request_is_answered_with_a_problem_never_a_500(hostile_client):
    """Hostile bodies (deep nesting, integers of thousands of digits, NaN, odd Unicode, raw bytes, other
    media types) and queries (long, '..', NUL and absolute checkpoint paths, odd overrides and
    policies) to both routes: never a 500; every error a problem document. Each example makes one or
    more parts hostile and leaves the others plain, so that a hostile checkpoint path is looked up,
    not refused earlier for a hostile body."""
    in_query = PATHS.filter(lambda p: not any(0xD800 <= ord(c) <= 0xDFFF for c in p))  # URLs hold UTF-8

    @given(
        route=st.sampled_from(["/v1/validate", "/v1/resolve", "/v1/resolve"]),
        hostile=st.sampled_from([{"body"}, {"overrides"}, {"checkpoint"}, {"checkpoint"}])
        | st.sets(st.sampled_from(["body", "overrides", "checkpoint", "policy"]), min_size=1),
        body=bodies(),
        overrides=OVERRIDES,
        checkpoint=in_query,
        by_query=st.booleans(),
        policy=QUERY_TEXT,
    )
    @fuzz_settings(250, database=None, suppress_health_check=list(HealthCheck))
    def check(route, hostile, body, overrides, checkpoint, by_query, policy):
        media, content = body if "body" in hostile else ("application/json", orjson.dumps(BASE))
        params: list[tuple[str, str]] = [("set", o) for o in overrides] if "overrides" in hostile else []
        if "policy" in hostile:
            params.append(("policy", policy))
        if "checkpoint" not in hostile:
            params.append(("checkpoint", "small"))
        elif by_query or "body" in hostile:
            params.append(("checkpoint", checkpoint))
        else:
            content = json.dumps({**BASE, "initial_ckpt_path": checkpoint}).encode()
        headers = {"Content-Type": media} if media else {}
        response = hostile_client.post(route, params=params, content=content, headers=headers)
        assert response.status_code != 500, response.text
        if response.status_code >= 400:
            _assert_problem(response)
        else:
            assert response.status_code == 200 and response.headers["content-type"] == "application/json"
            assert "fingerprint" in response.json()

    check()
