"""Helpers shared by the benchmark scripts."""
import subprocess
import sys


def timed(cmd, env):
    """Run `cmd` under /usr/bin/time; return (completed process, peak RSS in MB). Exits on failure."""
    full = ["/usr/bin/time", "-f", "__RSS_KB__=%M"] + [str(c) for c in cmd]
    p = subprocess.run(full, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(str(c) for c in cmd)}\n{p.stderr[-3000:]}")
    rss = next(int(l.split("=")[1]) for l in p.stderr.splitlines() if l.startswith("__RSS_KB__="))
    return p, rss / 1024


def timing_line(stderr):
    """The JSON that `ferroformers run --timing` prints last on stderr."""
    import json
    return json.loads([l for l in stderr.splitlines() if l.startswith("{")][-1])


def cpu_model():
    """lscpu's model name (from /proc/cpuinfo), recorded beside every figure."""
    from pathlib import Path
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# Our engines' extra CLI flags: f32, int8 (`--quantize int8`), bf16 (`--dtype bf16`).
OURS = {"ours": [], "ours-int8": ["--quantize", "int8"], "ours-bf16": ["--dtype", "bf16"]}
