#!/usr/bin/env python3
"""Copy the upload page assets into imgproxy.py.

imgproxy.py stays a single-file deploy, so the page it serves at ``GET /``
lives inside it as three string constants. The editable source is this folder
(index.html, app.css, app.js); this script rewrites only the lines between the
two marker lines in imgproxy.py and leaves every other byte alone.

    python3 page/embed.py            # rewrite the region
    python3 page/embed.py --check    # exit 1 if imgproxy.py is out of date
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
from pathlib import Path

PAGE_DIR = Path(__file__).resolve().parent
TARGET = PAGE_DIR.parent / "imgproxy.py"
BEGIN = "# ==== upload page: begin (generated region, edit the assets) ===="
END = "# ==== upload page: end ===="
ASSETS = (("PAGE_HTML", "index.html"), ("PAGE_CSS", "app.css"), ("PAGE_JS", "app.js"))


def python_literal(text: str) -> str:
    """A literal that evaluates to exactly ``text``, readable when possible."""
    # A raw triple-quoted string keeps the assets legible in imgproxy.py; it
    # cannot hold a triple quote, a trailing backslash or a lone CR, so such
    # text falls back to repr().
    if '"""' not in text and not text.endswith("\\") and "\r" not in text:
        literal = 'r"""' + text + '"""'
        try:
            if ast.literal_eval(literal) == text:
                return literal
        except (SyntaxError, ValueError):
            pass
    return repr(text)


def render_region() -> str:
    lines = [BEGIN,
             "# Made by page/embed.py from page/index.html, page/app.css and page/app.js;",
             "# edit those files and run `python3 page/embed.py`, never this block."]
    for name, filename in ASSETS:
        text = (PAGE_DIR / filename).read_text(encoding="utf-8")
        lines.append(f"{name} = {python_literal(text)}")
    lines.append(END)
    return "\n".join(lines)


def embedded(source: str) -> str:
    """The source with the marker region replaced; raises if markers are missing."""
    begin = source.find(BEGIN)
    if begin < 0 or source.count(BEGIN) != 1:
        raise SystemExit(f"embed.py: need exactly one line {BEGIN!r} in {TARGET}")
    end = source.find(END, begin)
    if end < 0 or source.count(END) != 1:
        raise SystemExit(f"embed.py: need exactly one line {END!r} after the begin marker in {TARGET}")
    return source[:begin] + render_region() + source[end + len(END):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if imgproxy.py differs from the assets")
    args = parser.parse_args(argv)

    with open(TARGET, encoding="utf-8", newline="") as f:
        source = f.read()
    updated = embedded(source)
    if args.check:
        if updated != source:
            print("imgproxy.py is out of date: run python3 page/embed.py", file=sys.stderr)
            return 1
        return 0
    if updated == source:
        print("imgproxy.py already up to date")
        return 0
    compile(updated, str(TARGET), "exec")   # never write a file that cannot import
    # Write beside the target and rename over it: readers (and an editor with
    # the file open) see the old or the new file, never half of one.
    fd, tmp_path = tempfile.mkstemp(prefix=".imgproxy.", suffix=".py.tmp", dir=TARGET.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(updated)
        os.chmod(tmp_path, os.stat(TARGET).st_mode & 0o7777)
        os.replace(tmp_path, TARGET)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    print(f"updated the upload page in {TARGET.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
