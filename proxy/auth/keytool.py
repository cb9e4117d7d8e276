"""``model-proxy keygen`` and ``model-proxy sign``: Function Network keys by hand.

``keygen`` writes a new key file (mode 0600, never over an existing file) and prints its
address, which the receiving side puts on its allow-list. ``sign`` prints the signature
headers for a body, to test a node or this proxy with curl. Keys are read from a file or the
``FXN_PRIVATE_KEY`` environment variable, never from the command line (where ``ps`` and shell
history would keep them).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import orjson

KEY_ENV = "FXN_PRIVATE_KEY"
DEFAULT_KEY_FILE = "fxn.key"
DEFAULT_URL = "http://127.0.0.1:8080/v1/chat/completions"
#: As every command: 2 when what was given (an argument, a file named) cannot be used.
EXIT_USAGE = 2


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keygen = commands.add_parser(
        "keygen", help="write a new Function Network signing key and print its address"
    )
    keygen.add_argument(
        "-o",
        "--out",
        metavar="PATH",
        default=DEFAULT_KEY_FILE,
        help=f"key file to create, mode 0600; never overwritten (default: {DEFAULT_KEY_FILE})",
    )

    sign = commands.add_parser(
        "sign", help="print Function Network signature headers for a request body"
    )
    sign.add_argument(
        "-k",
        "--key-file",
        metavar="PATH",
        help=f"key file (hex or key JSON); default: the {KEY_ENV} environment variable",
    )
    body = sign.add_mutually_exclusive_group()
    body.add_argument("-d", "--data", metavar="TEXT", help="the body, as UTF-8 text")
    body.add_argument(
        "-f", "--data-file", metavar="PATH", help="the body, read from a file (default: stdin)"
    )
    sign.add_argument("--timestamp", help="Unix seconds to sign (default: now)")
    sign.add_argument("--nonce", help="nonce to sign (default: random)")
    sign.add_argument(
        "--format",
        choices=("headers", "json", "curl"),
        default="headers",
        help="headers (one per line), a JSON object, or a complete curl command",
    )
    sign.add_argument(
        "--url", default=DEFAULT_URL, help=f"for --format curl (default: {DEFAULT_URL})"
    )


def run(args: argparse.Namespace) -> int:
    return keygen(args) if args.command == "keygen" else sign(args)


def keygen(args: argparse.Namespace) -> int:
    from proxy.auth.signing import generate_key_file

    try:
        address = generate_key_file(args.out)
    except FileExistsError:
        print(
            f"model-proxy keygen: {args.out} already exists; refusing to overwrite it",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except OSError as exc:
        print(
            f"model-proxy keygen: cannot create {args.out}: {exc.strerror or exc}", file=sys.stderr
        )
        return EXIT_USAGE
    print(address)
    print(
        f"wrote a new key to {args.out} (mode 0600); keep it secret. Put the address above "
        "on the allow-list of whoever verifies this node's requests.",
        file=sys.stderr,
    )
    return 0


def sign(args: argparse.Namespace) -> int:
    from proxy.auth.signing import Signer

    try:
        if args.key_file:
            signer = Signer.from_file(args.key_file)
        elif os.environ.get(KEY_ENV):
            signer = Signer.from_text(os.environ[KEY_ENV])
        else:
            print(f"model-proxy sign: give --key-file or set {KEY_ENV}", file=sys.stderr)
            return EXIT_USAGE
        body = _body(args)
        headers = signer.headers(body, timestamp=args.timestamp, nonce=args.nonce)
    except (ValueError, OSError) as exc:  # messages name files, never key material
        print(f"model-proxy sign: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.format == "json":
        print(orjson.dumps(headers, option=orjson.OPT_INDENT_2).decode())
    elif args.format == "curl":
        if not args.data_file and not _is_utf8(body):
            print(
                "model-proxy sign: the body is not UTF-8 text; use --data-file for curl",
                file=sys.stderr,
            )
            return EXIT_USAGE
        print(_curl(args, headers, body))
    else:
        for name, value in headers.items():
            print(f"{name}: {value}")
    print(
        "the signature covers these exact body bytes and is accepted for about 5 minutes",
        file=sys.stderr,
    )
    return 0


def _body(args: argparse.Namespace) -> bytes:
    if args.data is not None:
        return str(args.data).encode()
    if args.data_file is not None:
        return Path(args.data_file).read_bytes()
    return sys.stdin.buffer.read()


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _curl(args: argparse.Namespace, headers: dict[str, str], body: bytes) -> str:
    # --data-binary sends the bytes unchanged; plain -d would strip newlines and break the hash.
    data = "@" + args.data_file if args.data_file else body.decode("utf-8")
    parts = ["curl", "-sS", args.url, "-H", "Content-Type: application/json"]
    for name, value in headers.items():
        parts += ["-H", f"{name}: {value}"]
    parts += ["--data-binary", data]
    return shlex.join(parts)
