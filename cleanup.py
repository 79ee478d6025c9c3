#!/usr/bin/env python3
"""Run one imgproxy cleanup pass now, or reset everything.

    python3 cleanup.py [--config PATH] [--dry-run]
    python3 cleanup.py [--config PATH] --reset [--yes]

The pass is imgproxy.py's own `run_cleanup_pass` (the one the server schedules
daily): expired images, files without rows, rows without files, and temp
files no live process holds. It is safe while the server runs. Exit codes: 0
done, 1 failure, 2 bad config or usage.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import imgproxy


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cleanup.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).with_name("config.json")),
                        help="path of config.json (default: beside this file)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    parser.add_argument("--reset", action="store_true",
                        help="delete every image and empty the database of this config")
    parser.add_argument("--yes", action="store_true", help="with --reset: do not ask for confirmation")
    parser.add_argument("-v", "--verbose", action="store_true", help="list each item removed")
    args = parser.parse_args(argv)
    try:
        config = imgproxy.load_config(args.config)
    except imgproxy.ConfigError as exc:
        print(f"cleanup.py: {exc}", file=sys.stderr)
        return 2

    if args.reset:
        return reset(config, args.yes)

    try:
        report = asyncio.run(imgproxy.cleanup_once(config, dry_run=args.dry_run,
                                                   itemize=args.verbose or args.dry_run))
    except Exception as exc:  # noqa: BLE001 - reported as one line, exit 1
        print(f"cleanup.py: cleanup failed: {exc}", file=sys.stderr)
        return 1
    if args.verbose or args.dry_run:
        for item in report.removed:
            print(("would remove " if args.dry_run else "removed ") + item)
    print(report.summary())
    return 0


def reset(config: "imgproxy.Config", yes: bool) -> int:
    where = str(config.server.data_dir)
    if config.storage.backend == "s3":
        where = f"bucket {config.storage.bucket} ({config.storage.prefix or 'no prefix'})"
    if config.database.url is not None:
        where = f"{where} and its PostgreSQL database"
    if not yes:
        if not sys.stdin.isatty():
            print("cleanup.py: --reset deletes every image; add --yes to confirm when not at a terminal",
                  file=sys.stderr)
            return 2
        answer = input(f"Delete every image and empty the database in {where}? Type 'yes': ")
        if answer.strip().lower() != "yes":
            print("nothing changed")
            return 1
    try:
        asyncio.run(imgproxy.reset_store(config))
    except Exception as exc:  # noqa: BLE001
        print(f"cleanup.py: reset failed: {exc}", file=sys.stderr)
        return 1
    print(f"reset done: {where} holds no images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
