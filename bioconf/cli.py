"""The ``bioconf`` command line.

Exit codes (stable, for pipelines): 0 valid / done, 1 invalid config, 2 usage error or
unreadable input, 3 a checkpoint whose weights do not fit the config (``resolve``, ``run``).
``--format json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

# pydantic looks for plugins by scanning every installed distribution the first time a model is
# built: ~15 ms of a ~170 ms start in a full environment. The CLI uses none; a caller who does can
# set PYDANTIC_DISABLE_PLUGINS themselves (this only fills in a default).
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

# Exit codes and error classes come from bioconf.errors (pure: no pydantic model is built).
from bioconf.errors import EXIT_OK, BioconfError, OutputError, UsageError, jsonable

_PLUGINS_OFF = ("__all__", "1", "true")  # the values pydantic reads as "no plugins"
_PLUGIN_LOADER = "pydantic.plugin._loader"


def _skip_plugin_discovery() -> None:
    """Even with plugins off, pydantic's plugin loader imports importlib.metadata (~11 ms, a tenth of
    ``bioconf validate``'s start) before it reads PYDANTIC_DISABLE_PLUGINS. Stand in for the loader
    while plugins are off; the real one takes over if they are turned on."""
    if _PLUGIN_LOADER in sys.modules or os.environ.get("PYDANTIC_DISABLE_PLUGINS") not in _PLUGINS_OFF:
        return
    loader = types.ModuleType(_PLUGIN_LOADER)

    def get_plugins() -> Any:
        if os.environ.get("PYDANTIC_DISABLE_PLUGINS") in _PLUGINS_OFF:
            return ()
        if sys.modules.get(_PLUGIN_LOADER) is loader:
            del sys.modules[_PLUGIN_LOADER]
        return importlib.import_module(_PLUGIN_LOADER).get_plugins()

    loader.get_plugins = get_plugins  # type: ignore[attr-defined]
    sys.modules[_PLUGIN_LOADER] = loader


_skip_plugin_discovery()


def _print_json(document: Any) -> None:
    """Print one JSON document, always: what orjson cannot write as it is (an integer beyond 64 bits
    or nesting past its 255 levels, from a checkpoint's unknown fields say) is written bounded, as
    error inputs are, rather than leaving stdout empty or half-written."""
    try:
        payload = orjson.dumps(document, option=orjson.OPT_INDENT_2)
    except TypeError:  # orjson.JSONEncodeError
        payload = orjson.dumps(jsonable(document), option=orjson.OPT_INDENT_2)
    sys.stdout.buffer.write(payload + b"\n")
    sys.stdout.flush()


def cmd_validate(args: argparse.Namespace) -> int:
    # Building ModelConfig's validator allocates many short-lived cycles: collecting them while the
    # schema is built costs ~5 ms of the start, and frees nothing that matters.
    gc.disable()
    try:
        from bioconf.schema.files import parse_json_document, read_document, validate_document
    finally:
        gc.enable()

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
        except BioconfError as error:
            result["errors"] = error.to_list()
            status = max(status, error.exit_code)
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
    from bioconf.fs import write_atomic
    from bioconf.schema.json_schema import json_schema

    payload = orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    if args.output in (None, "-"):
        sys.stdout.buffer.write(payload)
    else:
        try:
            write_atomic(args.output, payload)
        except OSError as error:
            return _report_error(_cannot_write(args.output, error), "text")
    return EXIT_OK


def cmd_resolve(args: argparse.Namespace) -> int:
    from bioconf.resolve import resolve
    from bioconf.schema.files import read_document, validate_document

    try:
        config = validate_document(read_document(args.config), args.overrides)
        resolved = resolve(config, args.checkpoint, args.policy)
    except BioconfError as error:
        return _report_error(error, args.format)
    report = resolved.to_dict()
    if args.format == "json":
        _print_json(report)
    else:
        _print_resolved(report)
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from bioconf.checkpoint.inspection import format_inspection, inspect_checkpoint

    try:
        result = inspect_checkpoint(args.checkpoint)
    except BioconfError as error:
        return _report_error(error, args.format)
    sys.stdout.write(format_inspection(result, args.format))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from bioconf.schema.files import read_document, validate_document

    try:
        config = validate_document(read_document(args.config), args.overrides)
    except BioconfError as error:
        return _report_error(error, args.format)
    _silence_library_notices()
    from bioconf.runtime.run import run

    try:
        report = run(
            config,
            args.checkpoint,
            policy=args.policy,
            device=args.device,
            save=args.save,
            quiet=args.quiet or args.format == "json",
            check_forward=args.check_forward,
        )
    except BioconfError as error:
        return _report_error(error, args.format)
    except OSError as error:
        return _report_error(_cannot_write(args.save, error), args.format)
    if report.rank == 0:
        if args.format == "json":
            _print_json(report.to_dict())
        else:
            print(report)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from bioconf.demo import run_demo

    _silence_library_notices()
    return run_demo(Path(args.cache))


def _silence_library_notices() -> None:
    """megatron's notices about optional packages (Apex, Transformer Engine) and torch's deprecation
    of the ShardedTensor that megatron's checkpoints still use are not the user's business."""
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def _report_error(error: BioconfError, fmt: str) -> int:
    """Print an error as text on stderr or as one JSON document on stdout; return its exit code."""
    if fmt == "json":
        _print_json({"ok": False, "exit_code": error.exit_code, "errors": error.to_list()})
    else:
        print(error, file=sys.stderr)
    return error.exit_code


def _cannot_write(path: Any, error: OSError) -> OutputError:
    return OutputError.one(f"cannot write: {error.strerror or error}", "write_error", source=path)


def cmd_init_checkpoint(args: argparse.Namespace) -> int:
    from bioconf.fs import refuse_existing
    from bioconf.schema.files import read_document, validate_document

    try:
        config = validate_document(read_document(args.config), args.overrides)
        refuse_existing(args.out, args.overwrite)  # before seconds of imports
    except BioconfError as error:
        return _report_error(error, "text")
    _silence_library_notices()
    from bioconf.runtime.initialize import init_checkpoint

    try:
        out = init_checkpoint(config, args.out, seed=args.seed, overwrite=args.overwrite)
    except BioconfError as error:  # megatron's environment-dependent checks, at build time
        return _report_error(error, "text")
    except OSError as error:
        return _report_error(_cannot_write(args.out, error), "text")
    size = sum(f.stat().st_size for f in (out / "weights").iterdir())
    print(f"{out}: initialized from seed {args.seed} ({size / 1e6:,.1f} MB of weights)")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from bioconf.fs import refuse_existing

    try:
        refuse_existing(args.out, args.overwrite)  # before seconds of imports
    except BioconfError as error:
        return _report_error(error, "text")
    _silence_library_notices()
    from bioconf.convert import esm2

    try:
        if args.direction == "hf-to-nemo":
            out = esm2.hf_to_nemo(args.source, args.out, overwrite=args.overwrite)
        else:
            out = esm2.nemo_to_hf(args.source, args.out, overwrite=args.overwrite, vocab_size=args.vocab_size)
    except BioconfError as error:
        return _report_error(error, "text")
    except OSError as error:
        return _report_error(_cannot_write(args.out, error), "text")
    print(f"{out}: written ({esm2.describe(out)['bytes'] / 1e6:,.1f} MB)")
    return EXIT_OK


def _print_resolved(report: dict[str, Any]) -> None:
    """The fields not left to their default as an aligned table, by source, then the notes."""
    from bioconf.resolve import SOURCES

    checkpoint = report["checkpoint"]
    print(f"checkpoint: {checkpoint['directory']} ({checkpoint['class']})")
    print(f"policy: {report['policy']} ({len(report['keep'])} fields kept)")
    print(f"fingerprint: sha256:{report['fingerprint']}")
    rows = [("field", "value", "source")]
    fields = report["fields"]
    for name in sorted(fields, key=lambda n: (SOURCES.index(fields[n]["source"]), n)):
        value = fields[name]["value"]
        shown = value if isinstance(value, str) else orjson.dumps(value).decode()
        rows.append((name, shown, fields[name]["source"]))
    # A long value (a list) overflows its column rather than widening every row.
    name_width = max(len(row[0]) for row in rows)
    value_width = max(len(row[1]) for row in rows if len(row[1]) <= 40)
    print()
    for name, value, source in rows:
        print(f"{name:<{name_width}}  {value:<{value_width}}  {source}")
    unknown = report["unknown_checkpoint_fields"]
    if unknown:
        print(f"\ncheckpoint fields bioconf does not model: {', '.join(sorted(unknown))}")
    for note in report["notes"]:
        print(f"note: {note}")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from bioconf.service import ServiceSettings, create_app
        from bioconf.service.server import serve
    except ImportError as error:
        message = f"bioconf serve needs the service extra: pip install 'bioconf[service]' ({error})"
        return _report_error(UsageError.one(message, "missing_extra"), "text")
    settings = ServiceSettings(
        checkpoint_roots=tuple(args.checkpoint_roots),
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout,
        allow_origins=tuple(args.allow_origins),
    )
    try:
        app = create_app(settings)
    except BioconfError as error:  # a checkpoint root that is not a folder
        return _report_error(error, "text")
    serve(app, args.host, args.port, access_log=args.access_log)
    return EXIT_OK


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field (KEY+=VALUE appends to a list); repeatable; VALUE is JSON or a plain string",
    )


def _add_policy(parser: argparse.ArgumentParser) -> None:
    from bioconf.schema.model import POLICIES

    parser.add_argument(
        "--policy",
        choices=POLICIES,
        default="explicit",
        help="which config values win over the checkpoint's: explicit (default) keeps "
        "override_parent_fields and every field the config sets; seed keeps only override_parent_fields "
        "(BioNeMo's rule)",
    )


def _add_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="text for people, json for pipelines"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bioconf",
        description="Validate Megatron model configs and start models from NeMo 2 checkpoints.",
        epilog="Exit codes: 0 ok, 1 invalid config, 2 usage error or unreadable input, "
        "3 a checkpoint whose weights do not fit the config (resolve, run).",
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
    _add_overrides(validate)
    _add_format(validate)
    validate.set_defaults(run=cmd_validate)

    resolve = commands.add_parser(
        "resolve",
        help="merge a config with the settings of the checkpoint it starts from",
        description="Merge a config with the settings of the NeMo 2 checkpoint it starts from and print "
        "every value not left to its default with its source (user, checkpoint, derived). Exit 3 when "
        "the checkpoint's weights do not fit the config.",
    )
    resolve.add_argument("config", metavar="CONFIG", help="config file (.json, .yaml)")
    resolve.add_argument(
        "--checkpoint", metavar="DIR", help="checkpoint directory (default: the config's initial_ckpt_path)"
    )
    _add_policy(resolve)
    _add_overrides(resolve)
    _add_format(resolve)
    resolve.set_defaults(run=cmd_resolve)

    init = commands.add_parser(
        "init-checkpoint",
        help="write a NeMo 2 checkpoint of a freshly initialized model",
        description="Build the model CONFIG describes on CPU, initialized from --seed, and write it to OUT "
        "as a NeMo 2 checkpoint (context/ and torch_dist weights/). Exit 1 for an invalid config, 2 for "
        "an unreadable config or an OUT that exists or cannot be written.",
    )
    init.add_argument("config", metavar="CONFIG", help="config file (.json, .yaml)")
    init.add_argument("out", metavar="OUT", help="checkpoint directory to create")
    init.add_argument("--seed", type=int, default=1234, help="seed of the initialization (default 1234)")
    _add_overrides(init)
    init.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    init.set_defaults(run=cmd_init_checkpoint)

    run = commands.add_parser(
        "run",
        help="resolve a config against its checkpoint, build the model, load the weights, report",
        description="validate -> resolve against the starting checkpoint -> materialize -> build the model "
        "-> load the sharded weights -> report (and --save). Runs the same under torchrun (rank 0 prints). "
        "Exit codes: 0 ok, 1 invalid config, 2 usage/IO error, 3 checkpoint does not fit the config.",
    )
    run.add_argument("config", metavar="CONFIG", help="config file (.json, .yaml)")
    _add_overrides(run)
    run.add_argument("--checkpoint", metavar="DIR", help="starting checkpoint (default: initial_ckpt_path)")
    _add_policy(run)
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument("--save", metavar="DIR", help="save the resulting checkpoint to DIR")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--check-forward",
        action="store_true",
        help="run the loaded model on one small synthetic batch and report its logits checksum",
    )
    _add_format(run)
    run.set_defaults(run=cmd_run)

    convert = commands.add_parser(
        "convert",
        help="convert Hugging Face ESM-2 (EsmForMaskedLM) to a NeMo 2 esm2 checkpoint, or back",
        description="hf-to-nemo: an HF EsmForMaskedLM folder (config.json + model.safetensors) to a NeMo 2 "
        "checkpoint of the esm2 family; nemo-to-hf: back to such a folder. Exit 2 for input that is not "
        "ESM-2 or an OUT that exists.",
    )
    convert.add_argument("direction", choices=("hf-to-nemo", "nemo-to-hf"))
    convert.add_argument("source", metavar="SRC", help="HF model folder (hf-to-nemo) or NeMo 2 checkpoint")
    convert.add_argument("out", metavar="OUT", help="folder to create")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    convert.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help="nemo-to-hf: vocabulary rows to keep (default: the config's)",
    )
    convert.set_defaults(run=cmd_convert)

    demo = commands.add_parser(
        "demo", help="fine-tune a small ESM-2-like checkpoint (made once, locally) and print the report"
    )
    demo.add_argument("--cache", default="checkpoints", metavar="DIR", help="where the demo checkpoint lives")
    demo.set_defaults(run=cmd_demo)

    inspect = commands.add_parser(
        "inspect",
        help="show a checkpoint's model config and tensors (read as data: nothing it names is imported)",
    )
    inspect.add_argument("checkpoint", metavar="CKPT", help="NeMo 2 checkpoint directory")
    _add_format(inspect)
    inspect.set_defaults(run=cmd_inspect)

    schema = commands.add_parser("schema", help="print the JSON Schema (draft 2020-12) of the config")
    schema.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    schema.set_defaults(run=cmd_schema)

    serve = commands.add_parser(
        "serve",
        help="serve the config HTTP API and the editor page (needs bioconf[service])",
        description="Serve POST /v1/validate, POST /v1/resolve, GET /v1/schema, /healthz, /openapi.json and "
        "the editor page at /. Errors are RFC 9457 problems (application/problem+json).",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument(
        "--checkpoint-root",
        dest="checkpoint_roots",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder whose checkpoints /v1/resolve may read; repeatable; without one, resolve answers 403",
    )
    serve.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, metavar="N", help="request body limit (default 1 MiB)"
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="time limit of a request (default 10)",
    )
    serve.add_argument(
        "--allow-origin",
        dest="allow_origins",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let pages from ORIGIN call the API (CORS); repeatable",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(run=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    if argv is None and args.run is cmd_validate:  # the process's own command line: it is done
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown (~15 ms of freeing modules and pydantic's validators,
    a tenth of ``bioconf validate``'s start): everything is written once stdout and stderr are
    flushed. A flush that fails (a closed pipe) leaves the exit to the interpreter, as before."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
