"""The ``tallow`` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _print_info(as_json: bool) -> int:
    from . import info

    report = info()
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"tallow {report['version']} (torch {report['torch']})")
    nat = report["native"]
    if nat["available"]:
        print(f"native module : {nat['module']}")
        print(f"compiler      : {nat['compiler']}")
        print(f"cpu features  : {nat['cpu_features']}")
        print(f"isa           : {nat['isa']} (best on this CPU: {nat['best_isa']})")
        print(f"threads       : {nat['threads']}")
    else:
        print(f"native module : NOT AVAILABLE ({nat['error']})")
    cm = report.get("cuda_module", {})
    if cm.get("built"):
        print(f"cuda module   : {cm['module']} ({cm['devices']} device(s)"
              + (f"; {cm['error']}" if cm.get("error") else "") + ")")
    else:
        print(f"cuda module   : not built ({cm.get('error')})")
    backends = ", ".join(name for name, ok in report["backends"].items() if ok)
    print(f"backends      : {backends}")
    if report.get("backend_override"):
        print(f"TALLOW_BACKEND: {report['backend_override']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tallow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="version, native build, ISA, threads, backends")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _print_info(args.json)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
