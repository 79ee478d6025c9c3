#!/usr/bin/env python3
"""Summarise a py-spy raw profile (`py-spy record --format raw --threads`): where the time goes.

    python3 bench/profile_summary.py PROFILE.txt [--top 25] [--rate 250 --seconds 10]

py-spy leaves idle samples out, so a thread's samples are its busy time. For
the event-loop thread (MainThread) and the worker threads separately, prints
the functions with the most samples on top of the stack (self) and anywhere in
it (inclusive). With --rate and --seconds, also how busy each thread group was
(100% = always running, or waiting for the GIL). Line numbers are dropped so a
function's samples add up.
"""
import argparse
import collections
import re
import sys

FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
LOC = re.compile(r"\((?P<file>[^()]*?):(?P<line>\d+)\)$")
WAITING = re.compile(r"\.get\(|\.wait\(|\.acquire\(|\.select\(|\.poll\(|sleep\(")
THREAD = re.compile(r"^thread \((?P<tid>[^)]*)\)(?:: (?P<name>.*))?$")


def short(frame: str) -> tuple[str, str]:
    """('func (file)', 'file') with the line number and long folders dropped."""
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip(), frame.strip()
    path = m.group("file")
    if m.group("name").startswith("0x"):
        return f"[native] ({path})", path
    for marker in ("site-packages/", "lib/python3.", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    path = re.sub(r"^\d+/", "", path)
    return f"{m.group('name')} ({path})", path


_lines: dict[str, list[str]] = {}


def is_waiting(frame: str) -> bool:
    """py-spy (without --native) counts some blocked threads as busy: a worker
    blocked in queue.get(), aiosqlite's thread waiting for its next statement.
    Such a sample is idle when its top frame's source line is a blocking call."""
    m = LOC.search(frame.strip())
    if not m:
        return False
    path = m.group("file")
    if path not in _lines:
        _lines[path] = []
        # py-spy prints paths relative to sys.path unless --full-filenames
        for base in ([""] if path.startswith("/") else [p + "/" for p in sys.path if p]):
            try:
                with open(base + path, encoding="utf-8", errors="replace") as f:
                    _lines[path] = f.read().splitlines()
                break
            except OSError:
                continue
    src = _lines[path]
    line = int(m.group("line"))
    return 0 < line <= len(src) and bool(WAITING.search(src[line - 1]))


def group_of(thread_name: str) -> str:
    if thread_name in ("MainThread", ""):
        return "event loop (MainThread)"
    return "worker threads"


def summarise(path: str, top: int = 25, rate: float = 0, seconds: float = 0) -> str:
    groups: dict[str, dict[str, collections.Counter]] = collections.defaultdict(
        lambda: {"self": collections.Counter(), "incl": collections.Counter()})
    totals: collections.Counter = collections.Counter()
    threads: dict[str, set] = collections.defaultdict(set)
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            n = int(count)
            raw = [fr for fr in stack.split(";") if fr]
            tname = ""
            if raw and (m := THREAD.match(raw[0])):
                tname = m.group("name") or ""
                threads[group_of(tname)].add(m.group("tid"))
                raw = raw[1:]
                if raw and raw[0] == tname:
                    raw = raw[1:]
            g = group_of(tname)
            if raw and is_waiting(raw[-1]):
                continue
            totals[g] += n
            frames = [short(fr)[0] for fr in raw]
            if not frames:
                continue
            groups[g]["self"][frames[-1]] += n
            for name in set(frames):
                groups[g]["incl"][name] += n
    total = sum(totals.values())
    if not total:
        return f"{path}: no samples\n"
    out = [f"{path}: {total} busy samples"]
    for g, n in totals.most_common():
        busy = f", busy {100 * n / (rate * seconds):.0f}% of the time" if rate and seconds else ""
        out.append(f"  {g}: {n} samples ({100 * n / total:.0f}%), {len(threads[g]) or 1} thread(s){busy}")
    for g, _ in totals.most_common():
        gt = totals[g]
        out += ["", f"== {g}: self (top of stack), share of this group's samples"]
        out += [f"  {100 * n / gt:5.1f}%  {name}" for name, n in groups[g]["self"].most_common(top)]
        out += ["", f"== {g}: inclusive (anywhere in the stack)"]
        out += [f"  {100 * n / gt:5.1f}%  {name}" for name, n in groups[g]["incl"].most_common(top)]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rate", type=float, default=0, help="py-spy's --rate (samples/s)")
    parser.add_argument("--seconds", type=float, default=0, help="py-spy's --duration")
    args = parser.parse_args()
    sys.stdout.write(summarise(args.profile, args.top, args.rate, args.seconds))


if __name__ == "__main__":
    main()
