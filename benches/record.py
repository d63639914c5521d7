"""Run a benchmark and record its output as a dated page section of the docs' Results.

    python benches/record.py lrp_support --markdown -- python benches/lrp_support_table.py
    python benches/record.py bench_runtime -- python benches/bench_runtime.py --skip-aopc

writes ``docs/results/measured/<name>.md``: the date, the machine (CPU model, threads, torch build,
GPU if any) and the command, then what the command printed (as Markdown with ``--markdown``, else
as text). The Results pages include these files, so a rerun on another machine updates them; the
command's exit status is passed on and nothing is written when it fails.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "measured"


def machine() -> str:
    """One line: CPU model, logical CPUs, torch version and threads, GPU when one is used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu}")


def section(command: list[str], output: str, markdown: bool, when: datetime.datetime, where: str) -> str:
    head = (f"*Measured {when:%Y-%m-%d %H:%M} UTC on {where}, with* `{shlex.join(command)}` "
            f"*(written by `benches/record.py`).*\n\n")
    body = output.strip() + "\n" if markdown else "```text\n" + output.strip() + "\n```\n"
    return head + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the file: docs/results/measured/<name>.md")
    parser.add_argument("--markdown", action="store_true", help="the command prints Markdown (tables)")
    parser.add_argument("command", nargs="*", help="-- then the command")
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after the first "--" is the command: options before it (--markdown) are ours,
    # wherever they stand (argparse's REMAINDER would swallow an option given after the name).
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    command = args.command + argv[split + 1:]
    if not command:
        parser.error("give the command after --")
    when = datetime.datetime.now(datetime.timezone.utc)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        print(f"error: {shlex.join(command)} exited {done.returncode}; nothing recorded", file=sys.stderr)
        return done.returncode
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.name}.md"
    path.write_text(section(command, done.stdout, args.markdown, when, machine()))
    print(f"recorded: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
