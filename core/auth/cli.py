"""``mqgate passwd`` (the password file, like mosquitto_passwd) and ``mqgate users`` (the sqlite user db)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from core.auth.passwd import remove_user, set_password
from core.auth.userdb import KINDS, UserDb
from core.config import ENV_CONFIG_FILE, load_config
from core.errors import ConfigError

__all__ = ["COMMANDS", "main"]

COMMANDS = ("passwd", "users")


def _passwd_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqgate passwd",
        description="Add or update a user of a password file (auth.password_file), like mosquitto_passwd.",
    )
    parser.add_argument("-b", action="store_true", help="batch mode: the password is the last argument")
    parser.add_argument("-D", action="store_true", help="delete the user")
    parser.add_argument("--scheme", choices=("pbkdf2-sha256", "bcrypt"), default="pbkdf2-sha256")
    parser.add_argument("file")
    parser.add_argument("username")
    parser.add_argument("password", nargs="?")
    return parser


def _prompt() -> str | None:
    first = getpass.getpass("Password: ")
    second = getpass.getpass("Reenter password: ")
    if first != second:
        print("mqgate passwd: passwords do not match", file=sys.stderr)
        return None
    return first


def _passwd(argv: list[str]) -> int:
    args = _passwd_parser().parse_args(argv)
    if args.D:
        if not remove_user(args.file, args.username):
            print(f"mqgate passwd: no user {args.username!r} in {args.file}", file=sys.stderr)
            return 1
        return 0
    if args.b:
        if args.password is None:
            print("mqgate passwd: -b needs FILE USER PASSWORD", file=sys.stderr)
            return 2
        password: str | None = args.password
    else:
        if args.password is not None:
            print("mqgate passwd: a password argument needs -b", file=sys.stderr)
            return 2
        password = _prompt()
    if password is None:
        return 1
    try:
        set_password(args.file, args.username, password, scheme=args.scheme)
    except (OSError, ValueError) as exc:
        print(f"mqgate passwd: {exc}", file=sys.stderr)
        return 1
    return 0


def _users_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqgate users",
        description="Manage the built-in user database (auth.database): username and client-id rules.",
    )
    parser.add_argument("--database", metavar="PATH", help="sqlite file (default: auth.database of --config)")
    parser.add_argument("--config", metavar="FILE", help=f"TOML configuration file (or ${ENV_CONFIG_FILE})")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add or replace a rule")
    add.add_argument("name")
    add.add_argument("password", nargs="?", help="prompted for when left out")
    add.add_argument("--kind", choices=KINDS, default="username")
    add.add_argument("--superuser", action="store_true", help="bypasses the ACL")
    add.add_argument("--scheme", choices=("pbkdf2-sha256", "bcrypt"), default="pbkdf2-sha256")
    remove = commands.add_parser("remove", help="remove a rule")
    remove.add_argument("name")
    remove.add_argument("--kind", choices=KINDS, default="username")
    listing = commands.add_parser("list", help="list the rules")
    listing.add_argument("--kind", choices=KINDS)
    for name in ("import", "export"):
        sub = commands.add_parser(name, help=f"{name} rules as JSON or CSV")
        sub.add_argument("file", help="- for stdin/stdout")
        sub.add_argument("--format", choices=("json", "csv"), help="default: by file extension, else json")
    return parser


def _format_of(path: str, given: str | None) -> str:
    if given:
        return given
    return "csv" if path.lower().endswith(".csv") else "json"


def _users(argv: list[str]) -> int:
    args = _users_parser().parse_args(argv)
    path = args.database
    if not path:
        try:
            path = load_config(args.config or os.environ.get(ENV_CONFIG_FILE)).auth.database
        except ConfigError as exc:
            print(f"mqgate users: {exc}", file=sys.stderr)
            return 2
    if not path:
        print("mqgate users: no database: give --database PATH or set auth.database", file=sys.stderr)
        return 2
    db = UserDb(path)
    try:
        return _users_command(db, args)
    except (OSError, ValueError) as exc:
        print(f"mqgate users: {exc}", file=sys.stderr)
        return 1
    finally:
        db.close()


def _users_command(db: UserDb, args: argparse.Namespace) -> int:
    if args.command == "add":
        password = args.password if args.password is not None else _prompt()
        if password is None:
            return 1
        db.add(args.kind, args.name, password, superuser=args.superuser, scheme=args.scheme)
    elif args.command == "remove":
        if not db.remove(args.kind, args.name):
            print(f"mqgate users: no {args.kind} {args.name!r}", file=sys.stderr)
            return 1
    elif args.command == "list":
        for record in db.list(args.kind):
            print(f"{record.kind}\t{record.name}" + ("\tsuperuser" if record.is_superuser else ""))
    elif args.command == "export":
        fmt = _format_of(args.file, args.format)
        text = db.export_json() if fmt == "json" else db.export_csv()
        if args.file == "-":
            sys.stdout.write(text)
        else:
            with open(args.file, "w", encoding="utf-8", newline="") as file:
                file.write(text)
    else:
        fmt = _format_of(args.file, args.format)
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8", newline="") as file:
                text = file.read()
        count = db.import_records(text, fmt)
        print(f"imported {count} rules")
    return 0


def main(argv: list[str]) -> int:
    """``argv`` starts with the command name (``passwd`` or ``users``)."""
    command, rest = argv[0], argv[1:]
    return _passwd(rest) if command == "passwd" else _users(rest)
