"""The OpenAPI description of what the service sends and accepts.

The routes read raw bytes and write orjson bytes (no pydantic body or response models on the hot
path), so their request bodies, responses and component schemas are written out here. The request
body of ``/v1/validate`` and ``/v1/resolve`` is bioconf's own JSON Schema of ``ModelConfig``.
"""

from __future__ import annotations

from typing import Any

from bioconf.errors import PROBLEM_BASE
from bioconf.resolve import POLICIES, SOURCES
from bioconf.schema.json_schema import json_schema

_REF = "#/components/schemas/"

_ERROR = {
    "type": "object",
    "description": "One problem, as `bioconf validate --format json` reports it.",
    "required": ["source", "line", "field", "loc", "message", "type", "input"],
    "properties": {
        "source": {
            "type": ["string", "null"],
            "description": "Where the value came from: `<body>`, the override (`--set KEY=VALUE`), "
            "or a checkpoint file.",
        },
        "line": {"type": ["integer", "null"], "description": "Line of the field in the body."},
        "field": {"type": "string", "description": "Dotted field path, `override_parent_fields.2`."},
        "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
        "message": {"type": "string"},
        "type": {"type": "string", "description": "Machine-readable kind: `int_type`, `megatron_rule`, ..."},
        "input": {"description": "The offending value (a rule's values by field)."},
    },
}

_PROBLEM = {
    "type": "object",
    "description": "RFC 9457 problem details; `errors` lists each problem with a config or a checkpoint.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": f"`{PROBLEM_BASE}<kind>`, or `about:blank`."},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {"type": "array", "items": {"$ref": _REF + "ConfigErrorItem"}},
    },
}

_VALIDATED = {
    "type": "object",
    "required": ["valid", "fingerprint", "config", "warnings"],
    "properties": {
        "valid": {"const": True},
        "fingerprint": {
            "type": "string",
            "pattern": "^[0-9a-f]{64}$",
            "description": "sha256 of the full canonical JSON (every field).",
        },
        "config": {
            "$ref": _REF + "ModelConfig",
            "description": "The canonical config: canonical spellings, exactly the fields the body "
            "and its overrides set (what `save_config` writes).",
        },
        "warnings": {"type": "array", "items": {"type": "string"}, "description": "megatron's advice."},
    },
}

_RESOLVED = {
    "type": "object",
    "required": [
        "checkpoint",
        "policy",
        "keep",
        "fields",
        "unknown_checkpoint_fields",
        "notes",
        "fingerprint",
    ],
    "properties": {
        "checkpoint": {
            "type": "object",
            "required": ["path", "class", "class_is_bioconf"],
            "properties": {
                "path": {"type": "string", "description": "The io.json read."},
                "class": {"type": "string"},
                "class_is_bioconf": {"type": "boolean"},
                "bionemo_family": {
                    "type": ["string", "null"],
                    "description": "The family a checkpoint of BioNeMo's own config class is read as.",
                },
            },
        },
        "policy": {"enum": list(POLICIES)},
        "keep": {"type": "array", "items": {"type": "string"}},
        "fields": {
            "type": "object",
            "description": "Every value not left to its default, and where it came from.",
            "additionalProperties": {
                "type": "object",
                "required": ["value", "source"],
                "properties": {"value": {}, "source": {"enum": [s for s in SOURCES if s != "default"]}},
            },
        },
        "unknown_checkpoint_fields": {"type": "object"},
        "dropped_checkpoint_entries": {
            "type": "object",
            "description": "Entries of the checkpoint's own keep and skip lists that bioconf cannot use.",
        },
        "notes": {"type": "array", "items": {"type": "string"}},
        "fingerprint": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    },
}

_HEALTH = {
    "type": "object",
    "required": ["status", "version"],
    "properties": {"status": {"const": "ok"}, "version": {"type": "string"}},
}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": _REF + "Problem"}}},
    }


def _busy(description: str) -> dict[str, Any]:
    retry = {"description": "Seconds to wait before retrying (on `busy`).", "schema": {"type": "string"}}
    return {**_problem(description), "headers": {"Retry-After": retry}}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": _REF + schema}}}}


_CONFIG_BODY = {
    "required": True,
    "description": "A config, as a file holds it: JSON, or YAML with a YAML content type.",
    "content": {
        media: {"schema": {"$ref": _REF + "ModelConfig"}}
        for media in ("application/json", "application/yaml", "text/yaml")
    },
}

_SET = {
    "name": "set",
    "in": "query",
    "description": "Override a field: `KEY=VALUE` (VALUE is JSON if it parses, else a string) or "
    "`KEY+=VALUE` (append to a list), as `bioconf validate --set`; repeatable, applied in order.",
    "schema": {"type": "array", "items": {"type": "string"}},
    "style": "form",
    "explode": True,
}
_CHECKPOINT = {
    "name": "checkpoint",
    "in": "query",
    "description": "The checkpoint folder: relative to a checkpoint root (the first root that has it), or "
    "absolute under one. Default: the config's initial_ckpt_path.",
    "schema": {"type": "string"},
}
_POLICY = {
    "name": "policy",
    "in": "query",
    "description": "seed: keep only override_parent_fields (BioNeMo's rule); explicit: also keep every field "
    "the config sets.",
    "schema": {"enum": list(POLICIES), "default": "explicit"},
}

_BODY_PROBLEMS = {
    "400": _problem(
        "The body is not JSON/YAML, not a mapping, nested too deep or too large in values; "
        "or a query parameter is malformed."
    ),
    "408": _problem("The body did not arrive within the request time limit."),
    "413": _problem("The body is larger than the limit (1 MiB for JSON, 64 KiB for YAML by default)."),
    "415": _problem("The content type is neither JSON nor YAML."),
    "422": _problem("The config is invalid: `errors` lists the same errors as `bioconf validate`."),
    "503": _busy(
        "Parsing and validating the body (YAML, or JSON that is costly to validate) took longer than "
        "the request time limit (`timeout`), or every worker slot is taken (`busy`, at once, with "
        "Retry-After)."
    ),
}

VALIDATE = {
    "summary": "Validate a config",
    "openapi_extra": {"parameters": [_SET], "requestBody": _CONFIG_BODY},
    "responses": {"200": _json("Validated", "The config is valid."), **_BODY_PROBLEMS},
}

RESOLVE = {
    "summary": "Merge a config with the settings of the checkpoint it starts from",
    "openapi_extra": {"parameters": [_CHECKPOINT, _POLICY, _SET], "requestBody": _CONFIG_BODY},
    "responses": {
        "200": _json("Resolved", "The merged config: every value not left to its default, with its source."),
        **_BODY_PROBLEMS,
        "400": _problem(
            "As for /v1/validate; also: no checkpoint given and the config sets no initial_ckpt_path."
        ),
        "403": _problem("The checkpoint path is not under a checkpoint root of this service."),
        "404": _problem("No checkpoint (a folder with context/io.json) at that path under a root."),
        "409": _problem(
            "The config conflicts with the checkpoint: its weights would not fit "
            "(checkpoint-mismatch) or the merge breaks a megatron rule (invalid-merge)."
        ),
        "422": _problem("The config is invalid, or the checkpoint's context is (invalid-checkpoint)."),
        "503": _busy(
            "Validating the body or reading the checkpoint took longer than the request time limit "
            "(`timeout`), or every worker slot is taken (`busy`, at once, with Retry-After)."
        ),
    },
}

_ETAG = {"ETag": {"description": "Strong validator of the schema.", "schema": {"type": "string"}}}

SCHEMA = {
    "summary": "The JSON Schema (draft 2020-12) of a config",
    "responses": {
        "200": {
            "description": "The schema, with `x-groups`, `x-group` and `x-level` for forms.",
            "headers": _ETAG,
            "content": {"application/schema+json": {"schema": {"type": "object"}}},
        },
        "304": {"description": "If-None-Match matched the current ETag.", "headers": _ETAG},
    },
}

HEALTH = {"summary": "Liveness", "responses": {"200": _json("Health", "The service is up.")}}


def components() -> dict[str, Any]:
    """The component schemas the routes' descriptions refer to."""
    model = json_schema()
    for key in ("$schema", "$id"):  # an OpenAPI 3.1 document sets the dialect; no base change wanted
        model.pop(key)
    return {
        "ModelConfig": model,
        "ConfigErrorItem": _ERROR,
        "Problem": _PROBLEM,
        "Validated": _VALIDATED,
        "Resolved": _RESOLVED,
        "Health": _HEALTH,
    }
