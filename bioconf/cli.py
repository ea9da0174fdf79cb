"""The ``bioconf`` command line.

Exit codes (stable, for pipelines): 0 valid / done, 1 invalid config, 2 usage error or
unreadable input. ``--format json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import orjson

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _print_json(document: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def cmd_validate(args: argparse.Namespace) -> int:
    from bioconf.schema.errors import ConfigError, ConfigReadError
    from bioconf.schema.files import parse_json_document, read_document, validate_document

    results: list[dict[str, Any]] = []
    status = EXIT_OK
    for path in args.files:
        result: dict[str, Any] = {"file": path, "valid": False, "errors": [], "warnings": []}
        try:
            document = (
                parse_json_document(sys.stdin.buffer.read(), "<stdin>")
                if path == "-"
                else read_document(path)
            )
            config = validate_document(document, args.overrides)
        except ConfigError as error:
            result["errors"] = error.to_list()
            status = max(status, EXIT_USAGE if isinstance(error, ConfigReadError) else EXIT_INVALID)
            if args.format == "text":
                print(error, file=sys.stderr)
        else:
            result.update(valid=True, fingerprint=config.fingerprint(), warnings=config.advice())
            if args.format == "text":
                print(f"{path}: ok (sha256:{result['fingerprint'][:16]})")
                for warning in result["warnings"]:
                    print(f"{path}: warning: {warning}", file=sys.stderr)
        results.append(result)
    if args.format == "json":
        _print_json({"valid": status == EXIT_OK, "exit_code": status, "files": results})
    return status


def cmd_schema(args: argparse.Namespace) -> int:
    from bioconf.schema.files import write_atomic
    from bioconf.schema.json_schema import json_schema

    payload = orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    if args.output in (None, "-"):
        sys.stdout.buffer.write(payload)
    else:
        try:
            write_atomic(args.output, payload)
        except OSError as error:
            print(f"{args.output}: cannot write: {error.strerror}", file=sys.stderr)
            return EXIT_USAGE
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bioconf",
        description="Validate Megatron model configs and start models from NeMo 2 checkpoints.",
        epilog="Exit codes: 0 ok, 1 invalid config, 2 usage error or unreadable input.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser(
        "validate",
        help="validate config files (JSON or YAML)",
        description="Validate config files. Text errors read 'FILE:LINE: field: message (got VALUE)'.",
    )
    validate.add_argument(
        "files", nargs="+", metavar="FILE", help="config file (.json, .yaml); '-' reads JSON from stdin"
    )
    validate.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field (KEY+=VALUE appends to a list); repeatable; VALUE is JSON or a plain string",
    )
    validate.add_argument("--format", choices=("text", "json"), default="text")
    validate.set_defaults(run=cmd_validate)

    schema = commands.add_parser("schema", help="print the JSON Schema (draft 2020-12) of the config")
    schema.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    schema.set_defaults(run=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
