"""`prompt-server serve | adapters list|push|rm | bench`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic_settings import BaseSettings

from prompt_server.config import Settings

DEFAULT_URL = "http://127.0.0.1:8000"


def add_settings_flags(parser: argparse.ArgumentParser, settings: type[BaseSettings] = Settings) -> None:
    """One flag per field of `settings`, derived from the field alone, so a new setting gets its flag for free.

    max_new_tokens -> --max-new-tokens (dest max_new_tokens); Optional[X] is X; a Literal is its choices; int and float
    convert, bool is --x/--no-x, anything else (str, Path) stays text for the model to validate; help is the field's
    description plus its env var and default. An unset flag adds nothing, so PROMPT_SERVER_* and the defaults apply.
    """
    prefix = settings.model_config.get("env_prefix", "")
    for name, field in settings.model_fields.items():
        annotation, choices = field.annotation, None
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) is not Literal and len(members) == 1:  # X | None
            annotation = members[0]
        kind: Any
        if typing.get_origin(annotation) is Literal:
            kind, choices = str, [str(a) for a in typing.get_args(annotation)]
        else:
            kind = annotation if annotation in (int, float) else str
        default = field.get_default(call_default_factory=True)
        extra: dict[str, Any] = {"action": argparse.BooleanOptionalAction} if annotation is bool else {
            "type": kind, "choices": choices}
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                            help=f"{field.description or name.replace('_', ' ')} "
                                 f"(env {prefix}{name.upper()}; default {default})".replace("%", "%%"), **extra)


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


def _bench(argv: list[str]) -> int:
    """The benchmarks are tooling, not runtime: a package of their own, loaded only here, only when asked for."""
    try:
        from prompt_server_bench.bench import main as bench_main
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("prompt_server_bench"):
            raise
        print("error: the benchmarks (package prompt_server_bench) are not installed here; from a checkout of the "
              "repository: pip install -e \".[bench]\" (or run `make bench`)", file=sys.stderr)
        return 1
    return int(bench_main(argv) or 0)


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

    commands.add_parser("bench", help="benchmark the engine (arguments go to the prompt_server_bench package, "
                        "installed with the bench extra)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
