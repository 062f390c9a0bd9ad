"""`python -m sandboxes.optisoft connector ...` runs one Optisoft Connector;
`python -m sandboxes.optisoft demo` runs a relay with one practice and its connector."""

from __future__ import annotations

import argparse
import sys
import time


def demo(argv: list[str]) -> int:
    from sandboxes.optisoft.sandbox import DEFAULT_PRACTICE, OptisoftSandbox

    parser = argparse.ArgumentParser(prog="optisoft demo")
    parser.add_argument("--port", type=int, default=8702)
    parser.add_argument("--practice-code", default=DEFAULT_PRACTICE)
    parser.add_argument("--patients", type=int, default=50)
    args = parser.parse_args(argv)
    with OptisoftSandbox(port=args.port, practices={args.practice_code: args.patients}) as optisoft:
        print(f"Optisoft relay at {optisoft.url} (server_address)")
        print(f"practice_code {args.practice_code}; connector pid {optisoft.connector(args.practice_code).pid}")
        for name, (password, can_write) in optisoft.db_users.items():
            print(f"db_username {name} / db_password {password} ({'read-write' if can_write else 'read-only'})")
        try:
            while True:
                time.sleep(0.5)  # short: Ctrl-C may reach a server thread, and only a waking main thread handles it
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else ""
    if command == "connector":
        from sandboxes.optisoft.connector import main as connector_main

        return connector_main(argv)
    if command == "demo":
        return demo(argv)
    print("usage: python -m sandboxes.optisoft {connector|demo} [options]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
