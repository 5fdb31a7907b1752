"""Helpers shared by the benchmark scripts."""
import json
import subprocess
import sys
import time
import urllib.request


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
    return json.loads([l for l in stderr.splitlines() if l.startswith("{")][-1])


def cpu_model():
    """lscpu's model name (from /proc/cpuinfo), recorded beside every figure."""
    from pathlib import Path
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def wait_ready(url, proc, timeout=180):
    """Wait until `url` answers 2xx (a server's health or readiness probe); exit if the server
    process `proc` ends first or `timeout` seconds pass."""
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode} ({url})")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.3)
    sys.exit(f"{url} not ready after {timeout} s")


def sse_load(client, url, body, conc, n):
    """One run of `examples/sse_load` (the binary `client`): `conc` clients send `n` streamed
    requests of JSON text `body` to `url`; its JSON answer (`wall_s`, `tokens`, `ttft_s`,
    `start_s`). Exits with its error if it fails."""
    out = subprocess.run([str(client), url, body, str(conc), str(n)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        sys.exit(f"sse_load against {url} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


# Our engines' extra CLI flags: f32, int8 (`--quantize int8`), bf16 (`--dtype bf16`).
OURS = {"ours": [], "ours-int8": ["--quantize", "int8"], "ours-bf16": ["--dtype", "bf16"]}
