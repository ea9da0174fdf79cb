"""The config service as an ASGI app: validate and resolve configs over HTTP, serve the schema and
the editor page.

The hot path reads the raw body (enforcing the size limit while reading), parses it with orjson and
validates it with bioconf's own code, so a 422 lists exactly the errors ``bioconf validate`` prints;
FastAPI never parses or re-validates the 240-field body as a pydantic parameter, and responses are
orjson bytes. Every error is an RFC 9457 problem (``application/problem+json``).

What may cost more than a fraction of a millisecond (YAML; JSON whose validation takes a slow path;
a checkpoint's io.json, read, parsed and merged) runs in a ``WorkerPool`` of processes, not threads:
a thread shares the event loop's GIL (four clients sending 64 KiB YAML bodies or resolving a 15 MiB
io.json raised the p99 of valid validations from 7 ms to 0.7 s and 1.9 s; one orjson parse of that
io.json holds the GIL ~1.3 s), and a thread cannot be stopped. A worker runs at a lower CPU
priority, is killed when its request's time is up (and replaced), and a full pool answers 503 at
once instead of queueing (``benchmarks/service_load.py`` measures all this).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from http import HTTPStatus
from importlib import resources
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import anyio
import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from bioconf import __version__
from bioconf.checkpoint.context import parse_checkpoint_config
from bioconf.errors import PROBLEM_BASE, BioconfError, ConfigIssue, ConfigReadError, UsageError, jsonable
from bioconf.resolve import POLICIES, Policy, resolve
from bioconf.schema.files import parse_json_document, parse_yaml_document, validate_document
from bioconf.schema.json_schema import json_schema
from bioconf.schema.model import ModelConfig, fingerprint_of
from bioconf.service import openapi
from bioconf.service.checkpoints import CheckpointRoot, read_checkpoint_bytes

SOURCE = "<body>"
"""The ``source`` of an error in a request body (the CLI names the file there)."""
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})
PROBLEM = "application/problem+json"

# The problems only HTTP has (a body, a media type, a clock); every other problem is a BioconfError,
# whose class carries its kind, status and title.
TITLES = {
    "body-too-large": "Request body too large",
    "unsupported-media-type": "Unsupported media type",
    "invalid-request": "Invalid request",
    "request-timeout": "The request body did not arrive in time",
    "timeout": "The request took too long",
    "busy": "The service is busy",
}

# The editor page's files, served from the package: (file name, media type).
ASSETS = {
    "editor.js": "text/javascript; charset=utf-8",
    "editor.css": "text/css; charset=utf-8",
}
# The page loads only its own script and style and talks only to this service.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class ServiceSettings:
    """What ``bioconf serve`` configures. The value limits bound the CPU time of one request: the
    validation of a config is linear in its size but some of its error paths are not (suggestions
    for unknown keys, duplicate checks of lists), so size alone is not enough."""

    checkpoint_roots: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_yaml_bytes: int = 64 << 10  # PyYAML's pure-Python parser reads ~70 KiB/s of worst-case input
    max_depth: int = 32
    max_values: int = 4096  # list items and mapping entries below the top level, in all
    max_keys: int = len(ModelConfig.model_fields) + 32  # top-level keys
    max_checkpoint_bytes: int = 16 << 20  # a checkpoint's context/io.json (NeMo's are well under 1 MiB)
    request_timeout: float = 10.0
    allow_origins: tuple[str, ...] = ()
    workers: int = 2  # processes for YAML parsing and checkpoints (~50 MB each)
    max_waiting: int = 16  # work accepted beyond what the workers run, waiting for one; more is a 503


class Problem(Exception):
    """An error response: RFC 9457 problem details of ``kind``."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        errors: list[dict[str, Any]] | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.errors = status, kind, detail, errors
        self.title = title or TITLES[kind]
        self.headers = headers

    @classmethod
    def of(cls, error: BioconfError) -> Problem:
        """The problem a bioconf error is (its class says which)."""
        count = len(error.issues)
        first = str(error.issues[0]) if error.issues else ""
        detail = first if count == 1 else f"{count} errors; the first: {first}"
        return cls(error.status, error.kind, detail, error.to_list(), error.title)

    def response(self) -> Response:
        return problem_response(
            self.status, PROBLEM_BASE + self.kind, self.title, self.detail, self.errors, self.headers
        )


def problem_response(
    status: int,
    type_: str,
    title: str,
    detail: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    if errors is not None:
        body["errors"] = errors
    return Response(orjson.dumps(body), status, headers, media_type=PROBLEM)


def _etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match uses the weak comparison (RFC 9110 13.1.2): ``W/`` prefixes do not matter."""
    if header is None:
        return False
    tags = (tag.strip() for tag in header.split(","))
    return any(tag == "*" or tag.removeprefix("W/") == etag for tag in tags)


def _too_large(limit: int) -> Problem:
    return Problem(413, "body-too-large", f"the body is larger than {limit} bytes")


async def read_body(request: Request, limit: int, deadline: float) -> bytes:
    """The body, as the service reads every body (and ``benchmarks/service_load.py``'s no-op): refused
    with 413 as soon as more than ``limit`` bytes arrive (Content-Length is checked first but not
    trusted: chunked bodies have none); TimeoutError if it has not all arrived by ``deadline`` (the
    event loop's clock), ClientDisconnect if the client leaves. Straight from ``receive``: Starlette's
    ``request.stream()`` is an async generator, and a cancel scope costs less than ``fail_after``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks = []
    size = 0
    with anyio.CancelScope(deadline=deadline):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    raise TimeoutError  # the deadline cancelled the scope


def check_size(data: dict[str, Any], settings: ServiceSettings) -> int:
    """Refuse (ConfigReadError: 400) a document whose top level has more keys than a config can
    hold, nested deeper than ``max_depth`` or with more than ``max_values`` values inside lists and
    mappings; else return how many values it holds there. Counting follows YAML aliases, so a small
    document that expands into a huge one is refused too."""
    if len(data) > settings.max_keys:
        raise _size_problem(
            f"{len(data)} top-level keys: a config has {len(ModelConfig.model_fields)} fields "
            f"(the limit is {settings.max_keys} keys)",
            "too_many_keys",
            (),
        )
    budget = settings.max_values
    stack = [(value, 2, key) for key, value in data.items() if isinstance(value, (list, dict))]
    while stack:
        value, depth, key = stack.pop()
        if depth > settings.max_depth:
            raise _size_problem(f"nested deeper than {settings.max_depth} levels", "too_deep", (key,))
        items: Iterable[Any] = value.values() if isinstance(value, dict) else value
        budget -= len(value)
        if budget < 0:
            raise _size_problem(
                f"more than {settings.max_values} values in lists and mappings", "too_many_values", (key,)
            )
        stack.extend((item, depth + 1, key) for item in items if isinstance(item, (list, dict)))
    return settings.max_values - budget


def _size_problem(message: str, kind: str, loc: tuple[str, ...]) -> ConfigReadError:
    return ConfigReadError([ConfigIssue(message, kind, loc, source=SOURCE)])


FIELDS = frozenset(ModelConfig.model_fields)
CHEAP_VALUES = 64
"""Values in lists and mappings below which, with only known keys and short overrides, a JSON body
is validated on the event loop (~0.1 ms); any other goes to a worker. The slow paths of validation
("did you mean" for unknown keys, checks across long lists) cost tens of milliseconds each, and
four clients sending such bodies all the time took 85% of the loop's throughput."""


def is_costly(data: dict[str, Any], values: int, overrides: list[str]) -> bool:
    """Whether validating ``data`` with ``overrides`` may take more than a fraction of a millisecond."""
    if values > CHEAP_VALUES or not data.keys() <= FIELDS:
        return True
    return sum(map(len, overrides)) > 1024 or any(
        override.partition("=")[0].removesuffix("+") not in FIELDS for override in overrides
    )


def _validate_job(body: bytes, is_yaml: bool, overrides: list[str], settings: ServiceSettings) -> ModelConfig:
    """In a worker: what ``read_config`` does after reading the body, for YAML and costly JSON."""
    document = (parse_yaml_document if is_yaml else parse_json_document)(body, SOURCE)
    check_size(document.data, settings)
    return validate_document(document, overrides)


def validated(config: ModelConfig) -> bytes:
    """The answer for a valid config: its ``fingerprint()`` and the fields it sets (``to_dict(
    exclude_unset=True)``, in sorted order as ``save_config`` writes them), both from one dump of the
    config, where those methods make one each (35 µs instead of 46; a dump of the 259 fields is ~14)."""
    full = config.to_dict()
    return orjson.dumps(
        {
            "valid": True,
            "fingerprint": fingerprint_of(full),
            "config": {name: full[name] for name in sorted(config.model_fields_set)},
            "warnings": config.advice(),
        }
    )


def _remaining(deadline: float) -> float:
    return max(deadline - anyio.current_time(), 0.0)


T = TypeVar("T")

WORKER_NICE = 10
"""How much lower a worker process's CPU priority is than the server's: its work (hostile or not)
gets the CPU the event loop leaves (on Linux, a tenth of the share of nice 0 when both want it)."""

WORKER_COMMAND = """
import sys
if sys.path[:1] == [""]:  # -c puts the working folder first: a bioconf there is not the server's
    del sys.path[0]
if sys.argv[2] not in sys.path:  # the folder that holds the server's bioconf, if not on the path
    sys.path.insert(0, sys.argv[2])
from bioconf.service.app import _worker_main
_worker_main()
"""

_worker_roots: tuple[CheckpointRoot, ...] = ()
"""In a worker process: the checkpoint roots, on the descriptors the server opened (inherited), so
that a worker started later reads under the very folders the service started with."""


def _worker_main() -> None:
    """A worker process (``python -c``, see _Worker): take the pipe and the roots' descriptors from the
    command line, then run the jobs sent, one at a time, until the pipe closes. Answers
    ``("ok", value)``, ``("error", class, issues)`` for a BioconfError (its inputs made plain JSON
    data if they do not pickle) or ``("bug", traceback)``."""
    global _worker_roots
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)
    pipe, roots = orjson.loads(sys.argv[1])
    conn = Connection(pipe)
    _worker_roots = tuple(CheckpointRoot(Path(given), Path(real), fd) for given, real, fd in roots)
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            outcome: tuple[Any, ...] = ("ok", fn(*args))
        except BioconfError as error:
            outcome = ("error", type(error), error.issues)
        except Exception:
            outcome = ("bug", traceback.format_exc())
        try:
            conn.send(outcome)  # pickling fails, if it does, before anything is sent
        except Exception:
            if outcome[0] == "error":  # an input that does not pickle: as the problem will show it
                issues = [replace(issue, input=jsonable(issue.input)) for issue in outcome[2]]
                conn.send(("error", outcome[1], issues))
            else:
                conn.send(("bug", traceback.format_exc()))


def _resolve_job(config: ModelConfig, requested: str, policy: Policy, limit: int) -> bytes:
    """In a worker: the answer of /v1/resolve, from the io.json bytes read through the descriptors
    that were checked (``read_checkpoint_bytes``)."""
    raw, paths = read_checkpoint_bytes(requested, _worker_roots, limit)
    return orjson.dumps(resolve(config, parse_checkpoint_config(raw, paths), policy).to_dict())


class WorkerError(RuntimeError):
    """A worker process died, or its job could not be sent or answered (a bug: a 500)."""


class _Worker:
    """One worker process and the server's end of its pipe.

    A fresh interpreter (``python -c``), not ``multiprocessing``: nothing of the server's main module
    is re-run in it (an app built at the top of a script would be built again there), and the roots'
    descriptors are inherited as they are. It imports the bioconf the server runs (~0.5 s)."""

    def __init__(self, roots: tuple[CheckpointRoot, ...]):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            spec = [theirs.fileno(), [(str(root.given), str(root.real), root.fd) for root in roots]]
            source = str(Path(__file__).resolve().parents[2])
            self.process = subprocess.Popen(
                [sys.executable, "-c", WORKER_COMMAND, orjson.dumps(spec).decode(), source],
                pass_fds=(theirs.fileno(), *(root.fd for root in roots)),
                stdin=subprocess.DEVNULL,
            )
            self.conn = Connection(os.dup(ours.fileno()))

    def stop(self, kill: bool = False) -> None:
        """End the process: killed at once, or asked to stop by closing its pipe."""
        if kill:
            self.process.kill()
        self.conn.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class WorkerPool:
    """Jobs in ``workers`` worker processes, with at most ``workers + waiting`` jobs accepted at once.

    A job runs in the next free worker, fed by a thread of this process that waits for its answer
    until the job's deadline; past it, the worker is killed (its work stops there) and replaced. A job
    whose request stops waiting before a worker takes it is dropped. Each job holds a slot until it
    ends or is dropped, and ``run`` refuses at once (``busy``, 503) when all are taken.

    A job is a function (picklable by name) and picklable arguments."""

    def __init__(self, workers: int, waiting: int, roots: tuple[CheckpointRoot, ...] = ()):
        self.workers, self.slots, self.roots = workers, workers + waiting, roots
        self._free = threading.BoundedSemaphore(self.slots)
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...], float] | None]
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._feeders: list[threading.Thread] = []
        self._pid = os.getpid()

    def start(self) -> None:
        """Start the workers, in the background (``run`` starts them if this was not called)."""
        with self._lock:
            if self._feeders and self._pid == os.getpid():
                return
            self._pid = os.getpid()  # a forked process has none of its parent's threads: start its own
            self._feeders = [
                threading.Thread(target=self._feed, name="bioconf-worker-feeder", daemon=True)
                for _ in range(self.workers)
            ]
            for feeder in self._feeders:
                feeder.start()

    async def run(self, deadline: float, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker, awaited until ``deadline`` (the event loop's clock): then
        TimeoutError, and the job is dropped or its worker killed. A BioconfError the job raised is
        raised here; WorkerError for a worker that died."""
        if not self._free.acquire(blocking=False):
            raise Problem(
                503,
                "busy",
                f"all {self.slots} worker slots (parsing, validation, checkpoints) are taken; retry shortly",
                headers={"Retry-After": "1"},
            )
        future: Future[Any] = Future()
        future.add_done_callback(lambda _: self._free.release())  # answered, stopped or dropped
        self.start()
        remaining = _remaining(deadline)
        self._jobs.put((future, fn, args, time.monotonic() + remaining))
        with anyio.fail_after(remaining):
            outcome = await asyncio.wrap_future(future)  # a cancelled wait drops a job not yet begun
        if outcome[0] == "ok":
            return outcome[1]  # type: ignore[no-any-return]
        if outcome[0] == "error":
            raise outcome[1](outcome[2])
        raise WorkerError(f"a worker failed:\n{outcome[1]}")

    def _feed(self) -> None:
        """Feed one worker the jobs it takes from the queue, one at a time; replace it when killed."""
        worker = self._replacement()
        try:
            while (job := self._jobs.get()) is not None:
                future, fn, args, deadline = job
                if not future.set_running_or_notify_cancel():
                    continue  # its request stopped waiting before the job began
                try:
                    worker = worker or _Worker(self.roots)
                    worker.conn.send((fn, args))
                    if not worker.conn.poll(max(deadline - time.monotonic(), 0.0)):
                        worker.stop(kill=True)  # the time is up: the work stops here
                        future.set_exception(TimeoutError("stopped at the time limit"))
                        worker = self._replacement()
                        continue
                    future.set_result(worker.conn.recv())
                except Exception as error:
                    if worker is not None:
                        worker.stop(kill=True)
                    future.set_exception(WorkerError(f"a worker failed: {error!r}"))
                    worker = self._replacement()
        finally:
            if worker is not None:
                worker.stop()

    def _replacement(self) -> _Worker | None:
        """A new worker, started now so that it has imported bioconf when the next job comes; None
        if it cannot be started (the next job tries again, and says why)."""
        try:
            return _Worker(self.roots)
        except Exception:
            return None

    def close(self) -> None:
        """Stop the workers once the jobs queued before this end (``start`` starts new ones)."""
        with self._lock:
            for _ in self._feeders:
                self._jobs.put(None)
            self._feeders = []


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The service. Checkpoint roots must exist (UsageError otherwise)."""
    settings = settings or ServiceSettings()
    roots = tuple(CheckpointRoot.of(root) for root in settings.checkpoint_roots)
    pool = WorkerPool(settings.workers, settings.max_waiting, roots)
    pool.start()  # in the background: the first YAML body or resolve need not wait for an import
    app = FastAPI(
        title="bioconf config service",
        version=__version__,
        description="Validate Megatron model configs and resolve them against NeMo 2 checkpoints. "
        "Errors are RFC 9457 problems (application/problem+json).",
        docs_url=None,  # Swagger UI and ReDoc load their assets from a CDN: nothing is fetched at run time
        redoc_url=None,
    )
    if settings.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "If-None-Match"],
            expose_headers=["ETag"],
        )

    schema_bytes = orjson.dumps(json_schema(), option=orjson.OPT_SORT_KEYS)
    schema_etag = f'"{hashlib.sha256(schema_bytes).hexdigest()[:32]}"'
    health_bytes = orjson.dumps({"status": "ok", "version": __version__})
    static = resources.files("bioconf.service") / "static"
    page = (static / "index.html").read_bytes()
    assets = {name: ((static / name).read_bytes(), media) for name, media in ASSETS.items()}

    async def read_config(request: Request, overrides: list[str], deadline: float) -> ModelConfig:
        """Read, parse, bound and validate the body; every failure is a Problem."""
        media = request.headers.get("content-type", "application/json").partition(";")[0].strip().lower()
        is_yaml = media in YAML_TYPES
        if not is_yaml and media != "application/json" and not media.endswith("+json"):
            raise Problem(
                415, "unsupported-media-type", f"send JSON (application/json) or YAML, not {media!r}"
            )
        try:
            body = await read_body(
                request, settings.max_yaml_bytes if is_yaml else settings.max_body_bytes, deadline
            )
        except TimeoutError:
            raise Problem(
                408, "request-timeout", f"the body took longer than {settings.request_timeout} s"
            ) from None
        except ClientDisconnect:
            raise Problem(
                400, "invalid-request", "the client closed the connection during the body"
            ) from None
        try:
            if not is_yaml:  # JSON parses fast (orjson): the loop validates what is cheap to validate
                document = parse_json_document(body, SOURCE)
                if not is_costly(document.data, check_size(document.data, settings), overrides):
                    return validate_document(document, overrides)
            return await pool.run(deadline, _validate_job, body, is_yaml, overrides, settings)
        except TimeoutError:
            raise Problem(
                503, "timeout", f"reading the body took longer than {settings.request_timeout} s"
            ) from None
        except BioconfError as error:
            raise Problem.of(error) from None

    async def validate(request: Request) -> Response:
        overrides = request.query_params.getlist("set")
        config = await read_config(request, overrides, anyio.current_time() + settings.request_timeout)
        return Response(validated(config), media_type="application/json")

    # A Starlette route, not a FastAPI one: the route takes nothing for FastAPI to parse, and its
    # per-request machinery (dependencies, exit stacks) cost ~15 µs a validation. FastAPI describes
    # only its own routes, so /openapi.json describes this one from an APIRoute that serves nothing.
    app.add_route("/v1/validate", validate, methods=["POST"])
    validate_description = APIRoute(
        "/v1/validate", validate, methods=["POST"], response_class=Response, **openapi.VALIDATE
    )

    @app.post("/v1/resolve", response_class=Response, **openapi.RESOLVE)
    async def resolve_config(request: Request) -> Response:
        deadline = anyio.current_time() + settings.request_timeout
        query = request.query_params
        policy = query.get("policy", "explicit")
        if policy not in POLICIES:
            raise Problem.of(
                UsageError.one(f"policy must be one of {', '.join(POLICIES)}", "invalid_policy", input=policy)
            )
        config = await read_config(request, query.getlist("set"), deadline)
        checkpoint = query.get("checkpoint")
        requested = checkpoint if checkpoint is not None else config.initial_ckpt_path
        if requested is None:
            raise Problem.of(
                UsageError.one(
                    "no checkpoint: pass ?checkpoint=PATH or set initial_ckpt_path", "missing_checkpoint"
                )
            )
        try:
            answer = await pool.run(
                deadline, _resolve_job, config, requested, policy, settings.max_checkpoint_bytes
            )
        except TimeoutError:
            raise Problem(
                503, "timeout", f"reading the checkpoint took longer than {settings.request_timeout} s"
            ) from None
        except BioconfError as error:
            raise Problem.of(error) from None
        return Response(answer, media_type="application/json")

    @app.get("/v1/schema", response_class=Response, **openapi.SCHEMA)
    async def schema(request: Request) -> Response:
        headers = {"ETag": schema_etag, "Cache-Control": "no-cache"}
        if _etag_matches(request.headers.get("if-none-match"), schema_etag):
            return Response(status_code=304, headers=headers)
        return Response(schema_bytes, headers=headers, media_type="application/schema+json")

    @app.get("/healthz", response_class=Response, **openapi.HEALTH)
    async def healthz() -> Response:
        return Response(health_bytes, media_type="application/json")

    @app.get("/", response_class=Response, include_in_schema=False)
    async def editor() -> Response:
        return Response(page, headers=PAGE_HEADERS, media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", response_class=Response, include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, f"no asset {name!r}")
        content, media = assets[name]
        return Response(content, headers=PAGE_HEADERS, media_type=media)

    @app.exception_handler(Problem)
    async def on_problem(request: Request, problem: Problem) -> Response:
        return problem.response()

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException) -> Response:
        title = _reason(error.status_code)
        return problem_response(
            error.status_code, "about:blank", title, str(error.detail), headers=error.headers
        )

    @app.exception_handler(Exception)
    async def on_bug(request: Request, error: Exception) -> Response:
        # Starlette re-raises after this response, so the server still logs the traceback.
        return problem_response(
            500, "about:blank", "Internal Server Error", "an unexpected error; see the server log"
        )

    def openapi_document() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=[validate_description, *app.routes],
            )
            document.setdefault("components", {}).setdefault("schemas", {}).update(openapi.components())
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi_document  # type: ignore[method-assign]
    weakref.finalize(app, pool.close)  # an app dropped (tests build many) takes its workers along
    return app


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
