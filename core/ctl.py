"""``mqgate ctl``: the common operations through the HTTP API of a running mqgate (standard library only).

    mqgate ctl clients [--protocol mqttsn] [--state asleep]
    mqgate ctl client ID          mqgate ctl kick ID
    mqgate ctl listeners          mqgate ctl listeners restart ID
    mqgate ctl trace start NAME --clientid ID | --topic FILTER [--duration S]
    mqgate ctl trace list | download NAME | stop NAME

``--url`` (or ``$MQGATE_API_URL``, default ``http://127.0.0.1:18083``) and ``--key`` (or ``$MQGATE_API_KEY``:
a bearer token, or ``user:pass`` for basic authentication). Exit status: 0 done, 1 the API refused (its
message on stderr), 2 the API cannot be reached or bad usage.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TextIO

__all__ = ["ApiCallError", "main"]

DEFAULT_URL = "http://127.0.0.1:18083"
TIMEOUT = 10.0


class ApiCallError(Exception):
    """The API answered with an error (``status``) or could not be reached (``status`` 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def call(url: str, key: str | None, method: str, path: str, body: Any = None, *, raw: bool = False) -> Any:
    """One API request; the decoded JSON answer (the bytes with ``raw``), or None for 204."""
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if key:
        if ":" in key:
            headers["Authorization"] = "Basic " + base64.b64encode(key.encode()).decode()
        else:
            headers["Authorization"] = "Bearer " + key
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            answer = response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            error_body = exc.read()
        try:
            message = json.loads(error_body)["message"]
        except (ValueError, KeyError, TypeError):
            message = error_body.decode(errors="replace") or exc.reason
        raise ApiCallError(exc.code, f"{exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiCallError(0, f"cannot reach {url}: {reason}") from None
    if raw:
        return answer
    return json.loads(answer) if answer else None


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqgate ctl", description="Operate a running mqgate through its API."
    )
    parser.add_argument(
        "--url", default=os.environ.get("MQGATE_API_URL", DEFAULT_URL), help="the API base URL"
    )
    parser.add_argument("--key", default=os.environ.get("MQGATE_API_KEY"), help="bearer token or user:pass")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    commands = parser.add_subparsers(dest="command", required=True)
    clients = commands.add_parser("clients", help="list clients")
    clients.add_argument("--protocol", choices=("mqtt", "mqttsn", "coap", "lwm2m"))
    clients.add_argument("--state", choices=("connected", "asleep", "offline"))
    clients.add_argument("--limit", type=int, default=1000)
    client = commands.add_parser("client", help="one client's details")
    client.add_argument("clientid")
    kick = commands.add_parser("kick", help="disconnect a client and end its session")
    kick.add_argument("clientid")
    listeners = commands.add_parser("listeners", help="list listeners, or restart one")
    listeners.add_argument("action", nargs="?", choices=("restart",))
    listeners.add_argument("id", nargs="?")
    trace = commands.add_parser("trace", help="start, list, download or stop traces")
    trace.add_argument("action", choices=("start", "list", "download", "stop"))
    trace.add_argument("name", nargs="?")
    target = trace.add_mutually_exclusive_group()
    target.add_argument("--clientid")
    target.add_argument("--topic")
    trace.add_argument("--duration", type=float, default=600.0, help="seconds (start)")
    return parser


def _trace(args: argparse.Namespace, out: TextIO) -> None:
    url, key = args.url, args.key
    if args.action == "list":
        for item in call(url, key, "GET", "/api/v5/trace"):
            target = item.get("clientid", item.get("topic"))
            out.write(f"{item['name']}\t{item['type']}\t{target}\t{item['status']}\t{item['events']}\n")
        return
    if not args.name:
        raise ApiCallError(0, f"usage: mqgate ctl trace {args.action} NAME")
    name = _quote(args.name)
    if args.action == "start":
        if args.clientid is None and args.topic is None:
            raise ApiCallError(0, "usage: mqgate ctl trace start NAME (--clientid ID | --topic FILTER)")
        kind = "clientid" if args.clientid is not None else "topic"
        body = {"name": args.name, "type": kind, kind: args.clientid or args.topic, "duration": args.duration}
        answer = call(url, key, "POST", "/api/v5/trace", body)
        out.write(f"trace {answer['name']} running until {answer['end_at']}\n")
    elif args.action == "download":
        out.write(call(url, key, "GET", f"/api/v5/trace/{name}/download", raw=True).decode())
    else:
        call(url, key, "DELETE", f"/api/v5/trace/{name}")
        out.write(f"trace {args.name} stopped and deleted\n")


def run(args: argparse.Namespace, out: TextIO) -> None:
    url, key = args.url, args.key
    if args.command == "clients":
        query = {"limit": str(args.limit)}
        if args.protocol:
            query["protocol"] = args.protocol
        if args.state:
            query["state"] = args.state
        answer = call(url, key, "GET", "/api/v5/clients?" + urllib.parse.urlencode(query))
        if args.json:
            json.dump(answer, out, indent=2)
            out.write("\n")
            return
        for item in answer["data"]:
            out.write(f"{item['clientid']}\t{item['protocol']}\t{item['state']}\t{item['peer']}\n")
    elif args.command == "client":
        json.dump(call(url, key, "GET", "/api/v5/clients/" + _quote(args.clientid)), out, indent=2)
        out.write("\n")
    elif args.command == "kick":
        call(url, key, "DELETE", "/api/v5/clients/" + _quote(args.clientid))
        out.write(f"kicked {args.clientid}\n")
    elif args.command == "trace":
        _trace(args, out)
    elif args.command == "listeners":
        if args.action == "restart":
            if not args.id:
                raise ApiCallError(0, "usage: mqgate ctl listeners restart ID")
            answer = call(url, key, "POST", f"/api/v5/listeners/{_quote(args.id)}/restart")
            out.write(f"restarted {answer['id']} on {answer['address']}\n")
            return
        answer = call(url, key, "GET", "/api/v5/listeners")
        if args.json:
            json.dump(answer, out, indent=2)
            out.write("\n")
            return
        for item in answer:
            out.write(f"{item['id']}\t{item['address']}\n")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args, sys.stdout)
    except ApiCallError as exc:
        print(f"mqgate ctl: {exc}", file=sys.stderr)
        return 1 if exc.status else 2
    return 0
