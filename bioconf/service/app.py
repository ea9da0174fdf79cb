"""The config service as an ASGI app: validate and resolve configs over HTTP, serve the schema and
the editor page.

The hot path reads the raw body (enforcing the size limit while reading), parses it with orjson and
validates it with bioconf's own code, so a 422 lists exactly the errors ``bioconf validate`` prints;
FastAPI never parses or re-validates the 240-field body as a pydantic parameter, and responses are
orjson bytes. Every error is an RFC 9457 problem (``application/problem+json``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import Any

import anyio
import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from bioconf import __version__
from bioconf.errors import PROBLEM_BASE, BioconfError, ConfigIssue, ConfigReadError, UsageError
from bioconf.resolve import POLICIES, Policy, ResolvedConfig, resolve
from bioconf.schema.files import ConfigDocument, parse_json_document, parse_yaml_document, validate_document
from bioconf.schema.json_schema import json_schema
from bioconf.schema.model import ModelConfig
from bioconf.service import openapi
from bioconf.service.checkpoints import CheckpointRoot, locate_checkpoint

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
    request_timeout: float = 10.0
    allow_origins: tuple[str, ...] = ()


class Problem(Exception):
    """An error response: RFC 9457 problem details of ``kind``."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        errors: list[dict[str, Any]] | None = None,
        title: str | None = None,
    ):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.errors = status, kind, detail, errors
        self.title = title or TITLES[kind]

    @classmethod
    def of(cls, error: BioconfError) -> Problem:
        """The problem a bioconf error is (its class says which)."""
        count = len(error.issues)
        first = str(error.issues[0]) if error.issues else ""
        detail = first if count == 1 else f"{count} errors; the first: {first}"
        return cls(error.status, error.kind, detail, error.to_list(), error.title)

    def response(self) -> Response:
        return problem_response(self.status, PROBLEM_BASE + self.kind, self.title, self.detail, self.errors)


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


def _json(document: Any) -> Response:
    return Response(orjson.dumps(document), media_type="application/json")


def _etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match uses the weak comparison (RFC 9110 13.1.2): ``W/`` prefixes do not matter."""
    if header is None:
        return False
    tags = (tag.strip() for tag in header.split(","))
    return any(tag == "*" or tag.removeprefix("W/") == etag for tag in tags)


def _too_large(limit: int) -> Problem:
    return Problem(413, "body-too-large", f"the body is larger than {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as more than ``limit`` bytes arrive: Content-Length is
    checked first but not trusted (chunked bodies have none)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def check_size(data: dict[str, Any], settings: ServiceSettings) -> None:
    """Refuse (400) a document whose top level has more keys than a config can hold, nested deeper
    than ``max_depth`` or with more than ``max_values`` values inside lists and mappings. Counting
    follows YAML aliases, so a small document that expands into a huge one is refused too."""
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


def _size_problem(message: str, kind: str, loc: tuple[str, ...]) -> Problem:
    return Problem.of(ConfigReadError([ConfigIssue(message, kind, loc, source=SOURCE)]))


def _remaining(deadline: float) -> float:
    return max(deadline - anyio.current_time(), 0.0)


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The service. Checkpoint roots must exist (UsageError otherwise)."""
    settings = settings or ServiceSettings()
    roots = tuple(CheckpointRoot.of(root) for root in settings.checkpoint_roots)
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
            with anyio.fail_after(_remaining(deadline)):
                body = await read_body(
                    request, settings.max_yaml_bytes if is_yaml else settings.max_body_bytes
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
            document: ConfigDocument
            if is_yaml:  # pure-Python parsing: off the event loop, within the time limit
                with anyio.fail_after(_remaining(deadline)):
                    document = await anyio.to_thread.run_sync(
                        parse_yaml_document, body, SOURCE, abandon_on_cancel=True
                    )
            else:
                document = parse_json_document(body, SOURCE)
        except TimeoutError:
            raise Problem(503, "timeout", f"parsing took longer than {settings.request_timeout} s") from None
        except BioconfError as error:
            raise Problem.of(error) from None
        check_size(document.data, settings)
        try:
            return validate_document(document, overrides)
        except BioconfError as error:
            raise Problem.of(error) from None

    @app.post("/v1/validate", response_class=Response, **openapi.VALIDATE)
    async def validate(request: Request) -> Response:
        overrides = request.query_params.getlist("set")
        config = await read_config(request, overrides, anyio.current_time() + settings.request_timeout)
        return _json(
            {
                "valid": True,
                "fingerprint": config.fingerprint(),
                "config": config.to_dict(exclude_unset=True),
                "warnings": config.advice(),
            }
        )

    def resolve_under_roots(config: ModelConfig, requested: str, policy: Policy) -> ResolvedConfig:
        """Runs in a worker thread: file system calls never block the event loop."""
        return resolve(config, locate_checkpoint(requested, roots), policy)

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
            with anyio.fail_after(_remaining(deadline)):
                resolved = await anyio.to_thread.run_sync(
                    resolve_under_roots, config, requested, policy, abandon_on_cancel=True
                )
        except TimeoutError:
            raise Problem(
                503, "timeout", f"reading the checkpoint took longer than {settings.request_timeout} s"
            ) from None
        except BioconfError as error:
            raise Problem.of(error) from None
        return _json(resolved.to_dict())

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
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            document.setdefault("components", {}).setdefault("schemas", {}).update(openapi.components())
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi_document  # type: ignore[method-assign]
    return app


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
