"""`prompt-server serve | adapters list|push|rm | bench`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from prompt_server.config import Settings

DEFAULT_URL = "http://127.0.0.1:8000"


def _flag_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """argparse type and choices for a Settings annotation (Optional[...] unwrapped, Literal as choices)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    if args and typing.get_origin(annotation) is not Literal:
        return _flag_type(args[0])
    if annotation in (int, float):
        return annotation, None
    return str, None


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field (--max-new-tokens ...); unset flags fall back to PROMPT_SERVER_* and defaults."""
    for name, field in Settings.model_fields.items():
        kind, choices = _flag_type(field.annotation)
        env = f"PROMPT_SERVER_{name.upper()}"
        default = field.default if field.default_factory is None else "computed"
        help_text = f"{field.description or name.replace('_', ' ')} (env {env}; default {default})"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, choices=choices,
                            default=argparse.SUPPRESS, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**given)


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from prompt_server.main import build_service, create_app
    from prompt_server.model.loader import ModelLoadError

    settings = settings_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Load before the server starts, so a model that cannot be served exactly stops it with one line, not a trace.
    try:
        service = build_service(settings)
    except ModelLoadError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    uvicorn.run(create_app(settings, service), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def _adapters(args: argparse.Namespace) -> int:
    import httpx

    from prompt_server.client import AdminClient, ClientError

    try:
        with AdminClient(args.url, args.key) as client:
            if args.action == "list":
                for record in client.list():
                    print(f"{record['id']}\t{record['peft_type']}\tv{record['version']}\t"
                          f"{record['num_virtual_tokens']} virtual tokens\t{record['sha256'][:12]}")
            elif args.action == "push":
                labels = json.loads(args.labels) if args.labels else None
                record, created = client.push(args.id, Path(args.path), labels)
                print(f"{'created' if created else 'replaced'} {record['id']} version {record['version']}")
            else:
                client.remove(args.id)
                print(f"removed {args.id}")
    except (ClientError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:  # connection refused, timeouts: say what and where
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prompt-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the model and its adapters over HTTP")
    add_settings_flags(serve)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(run=_serve)

    adapters = commands.add_parser("adapters", help="manage the adapters of a running server")
    actions = adapters.add_subparsers(dest="action", required=True)
    for action, help_text in (("list", "list adapters"), ("push", "upload a PEFT directory or archive"),
                              ("rm", "delete an adapter")):
        sub = actions.add_parser(action, help=help_text)
        if action != "list":
            sub.add_argument("id", help="adapter id")
        if action == "push":
            sub.add_argument("path", help="PEFT adapter directory, or a .zip/.tar/.tar.gz holding one")
            sub.add_argument("--labels", help='class labels as a JSON list, e.g. \'["neg", "pos"]\'')
        sub.add_argument("--url", default=os.environ.get("PROMPT_SERVER_URL", DEFAULT_URL),
                         help=f"server URL (env PROMPT_SERVER_URL; default {DEFAULT_URL})")
        sub.add_argument("--key", default=os.environ.get("PROMPT_SERVER_ADMIN_KEY") or os.environ.get(
            "PROMPT_SERVER_API_KEY"), help="bearer key (env PROMPT_SERVER_ADMIN_KEY or PROMPT_SERVER_API_KEY)")
        sub.set_defaults(run=_adapters)

    commands.add_parser("bench", help="benchmark the engine (arguments go to prompt_server.bench)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from prompt_server.bench import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
