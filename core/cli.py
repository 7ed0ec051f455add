"""The ``mqgate`` command: start the suite, or print its effective configuration."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from core import __version__
from core.app import App
from core.config import ENV_CONFIG_FILE, Config, dump_toml, load_config
from core.errors import ConfigError
from core.logging import setup_logging

__all__ = ["main"]

log = logging.getLogger("mqgate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqgate",
        description="MQTT broker with MQTT-SN, CoAP and LwM2M gateways. With no options it runs the broker "
        "and every gateway on their standard ports. `mqgate passwd -h` and `mqgate users -h` manage users.",
    )
    parser.add_argument("--config", metavar="FILE", help=f"TOML configuration file (or ${ENV_CONFIG_FILE})")
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective configuration as TOML"
    )
    parser.add_argument("--version", action="version", version=f"mqgate {__version__}")
    return parser


async def _run(config: Config) -> int:
    app = App(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except ConfigError as exc:
        log.error("%s", exc)
        if config.log.to == "file":  # the operator starting mqgate sees why it did not start
            print(f"mqgate: {exc}", file=sys.stderr)
        return 2
    log.info("mqgate %s started", __version__)
    try:
        await stop.wait()
    finally:
        log.info("mqgate stopping")
        await app.stop()
        log.info("mqgate stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("passwd", "users"):  # user management commands (core.auth.cli)
        from core.auth.cli import main as auth_main

        return auth_main(argv)
    if argv and argv[0] == "ctl":  # operations through the HTTP API of a running mqgate (core.ctl)
        from core.ctl import main as ctl_main

        return ctl_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config or os.environ.get(ENV_CONFIG_FILE))
    except ConfigError as exc:
        print(f"mqgate: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(dump_toml(config))
        return 0
    try:
        setup_logging(config.log)
    except ConfigError as exc:
        print(f"mqgate: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # uvloop is optional off Linux
        return asyncio.run(_run(config))
    return uvloop.run(_run(config))


if __name__ == "__main__":
    sys.exit(main())
