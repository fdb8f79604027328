#!/usr/bin/env python3
"""Benchmark harness for attache: attache, HAProxy and nginx in front of one fast upstream.

Follows /work/shared/BENCH-METHOD.md; bench/README.md explains every figure. Called by
bench/run, which installs the tools first. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import fcntl
import http.client
import json
import os
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TEMPLATES = BENCH / "templates"
SCENARIOS = BENCH / "scenarios"
OUT = BENCH / "out"

# CPU layout (BENCH-METHOD "Layouts"): load generator and upstream share CPU 0, the proxy
# under test is alone on CPU 1, except for the one-connection latency test where it joins
# CPU 0 (a wake-up across vCPUs on these VMs measures the hypervisor, not the proxy).
LOAD_CPU = 0
PROXY_CPU = 1

RATE = 2000          # fixed-rate test: requests per second ...
RATE_CONNS = 8       # ... over this many connections
SAT_CONNS = 32       # saturation test, HTTP/1 (wrk -c32 -t1)
H2_CONNS, H2_STREAMS = 8, 16   # saturation test, h2c (h2load -c8 -m16)

NOISE_LIMIT = 0.10   # CPU used by processes we did not start, as a fraction of one core
MAX_REDO = 2         # a noisy test is run again at most this many times
AUTOGROUP_NICE = -15

# Per mode: seconds per test (whole seconds: wrk takes no fractions), warm-up seconds,
# idle connections for the RSS test, rounds.
FULL = dict(sat=4, rate=5, ping=4, warm=1, idle_conns=10000, rounds=5)
QUICK = dict(sat=2, rate=2, ping=1, warm=1, idle_conns=500, rounds=1)

# Values for template placeholders that a scenario may override in its [vars] table.
DEFAULT_VARS = {"HAPROXY_BIND_OPTS": "", "NGINX_LISTEN_OPTS": ""}

CARGO_LOCK = "/tmp/attache-cargo.lock"   # the project's "one cargo at a time" lock
LOCK_WAIT = 30 * 60                       # --lock-cargo waits this long at most

# --syscalls: the system calls counted per request (perf tracepoints). raw_syscalls counts
# every call; the named ones are those a proxy's request path makes.
SYSCALLS = ("read", "recvfrom", "readv", "recvmsg", "write", "sendto", "writev", "sendmsg",
            "epoll_wait", "epoll_pwait", "epoll_ctl", "futex", "accept4")

CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


class BenchError(Exception):
    """A failure that ends the run: a target that does not start or does not serve."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Processes: everything the benchmark starts is registered here and stopped on exit.
# --------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: be killed if bench.py dies without cleaning up (SIGKILL,
    OOM), so that no spinner or proxy outlives the run. Survives exec."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Procs:
    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []
        # bench/run reads this file if bench.py dies without cleaning up (SIGKILL) and
        # kills the process groups still listed (an nginx worker outlives its master).
        pgid_file = os.environ.get("BENCH_PGID_FILE")
        self.pgid_file = Path(pgid_file) if pgid_file else None

    def _sync(self) -> None:
        if self.pgid_file:
            self.pgid_file.write_text("".join(f"{p.pid}\n" for p in self.live))

    def spawn(self, argv: list[str], *, cpu: int, logfile: Path | None = None,
              priority: bool = True, stdin=subprocess.DEVNULL,
              pipe: bool = False) -> subprocess.Popen:
        """Start argv pinned to `cpu`, in its own session (so that its whole tree can be
        signalled, and so that it gets an autogroup of its own whose nice we can lower).
        Output goes to `logfile`; with pipe=True stdout is a pipe (stderr: logfile, or
        the same pipe when there is none)."""
        log_f = open(logfile, "ab") if logfile else None
        try:
            if pipe:
                out, err = subprocess.PIPE, log_f or subprocess.STDOUT
            else:
                out = err = log_f or subprocess.DEVNULL
            p = subprocess.Popen(["taskset", "-c", str(cpu), *argv], stdin=stdin, stdout=out,
                                 stderr=err, start_new_session=True, cwd=ROOT,
                                 preexec_fn=_die_with_parent)
        finally:
            if log_f:
                log_f.close()  # the child has its own copy
        self.live.append(p)
        self._sync()
        if priority:
            set_autogroup_nice(p.pid)
        return p

    def run(self, argv: list[str], *, cpu: int, timeout: float) -> str:
        """Run a load generator to completion and return its output (stdout+stderr)."""
        p = self.spawn(argv, cpu=cpu, pipe=True)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(p)
            raise BenchError(f"{argv[0]} did not finish within {timeout:.0f} s")
        finally:
            if p in self.live:
                self.live.remove(p)
                self._sync()
        text = out.decode(errors="replace")
        if p.returncode != 0:
            raise BenchError(f"{shlex.join(argv)} exited with {p.returncode}:\n{text[-2000:]}")
        return text

    def stop(self, p: subprocess.Popen) -> None:
        """TERM the process group, KILL it if still there after 3 s."""
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers left in the group after the leader died (nginx) get a final KILL.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if p in self.live:
            self.live.remove(p)
            self._sync()

    def stop_all(self) -> None:
        for p in list(reversed(self.live)):
            self.stop(p)


def set_autogroup_nice(pid: int, nice: int = AUTOGROUP_NICE) -> None:
    """Give the process's autogroup nice -15 (BENCH-METHOD "Priority"), so that a
    neighbour's build cannot halve the figures. Needs root; skipped with a warning if not."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError as e:
        if not getattr(set_autogroup_nice, "warned", False):
            log(f"warning: cannot set autogroup nice ({e}); running at normal priority")
            set_autogroup_nice.warned = True


# --------------------------------------------------------------------------------------
# /proc readings: process trees, CPU time, memory, whole-system busy time.
# --------------------------------------------------------------------------------------

def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(root: int, kids: dict[int, list[int]] | None = None) -> list[int]:
    """root and all its descendants (nginx master + worker, for instance)."""
    kids = kids if kids is not None else children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if Path(f"/proc/{pid}").exists():
            out.append(pid)
            todo.extend(kids.get(pid, []))
    return out


@dataclass
class CpuSample:
    """CPU time of a set of processes. Per thread from schedstat (nanoseconds: the
    10 ms ticks of utime/stime are too coarse for a 2,000 req/s test), and per process
    from utime+stime, which also holds threads that have exited."""
    threads: dict[tuple[int, int], int] = field(default_factory=dict)
    procs: dict[int, int] = field(default_factory=dict)
    user: dict[int, int] = field(default_factory=dict)   # utime alone, in ticks


def cpu_sample(pids: list[int]) -> CpuSample:
    s = CpuSample()
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            f = stat[stat.rindex(")") + 2:].split()
            s.procs[pid] = int(f[11]) + int(f[12])  # utime + stime, in ticks
            s.user[pid] = int(f[11])
            for tid in os.listdir(f"/proc/{pid}/task"):
                ns = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]
                s.threads[(pid, int(tid))] = int(ns)
        except (OSError, ValueError, IndexError):
            continue  # the process went away while being read
    return s


def cpu_delta(a: CpuSample, b: CpuSample) -> tuple[float, bool]:
    """Seconds of CPU used between a and b, and whether the precise (schedstat) figure
    could be used. A thread present in a but gone in b took its time with it; then fall
    back to utime+stime, which keeps exited threads' time, at 10 ms resolution."""
    if all(k in b.threads for k in a.threads):
        ns = sum(v - a.threads.get(k, 0) for k, v in b.threads.items())
        return ns / 1e9, True
    ticks = sum(v - a.procs.get(pid, 0) for pid, v in b.procs.items())
    return ticks / CLK_TCK, False


def rss_bytes(pids: list[int], field_name: str = "VmRSS") -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def system_busy() -> float:
    """Seconds of non-idle CPU on the whole machine (all CPUs) from /proc/stat:
    user + nice + system + irq + softirq. Idle, iowait and steal are not work done here."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq = map(int, f[1:8])
    return (user + nice + system + irq + softirq) / CLK_TCK


def self_cpu() -> float:
    """CPU of this process and of every child it has reaped (the load generators)."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def move_tree(root: int, cpu: int) -> None:
    """Pin every thread of every process of the tree to `cpu` (taskset -a -p)."""
    for pid in tree(root):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), {cpu})
        except OSError:
            pass


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1 (bound together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def render(template: Path, values: dict[str, str], dest: Path) -> Path:
    text = template.read_text()

    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise BenchError(f"{template}: unknown placeholder {{{{{m.group(1)}}}}}")
        return str(values[m.group(1)])

    dest.write_text(re.sub(r"\{\{([A-Z0-9_]+)\}\}", sub, text))
    return dest


def wait_until(check, deadline_s: float, proc: subprocess.Popen | None, what: str,
               logfile: Path | None = None) -> None:
    """Poll `check` every 20 ms until it is true; fail if the process exits or at the
    deadline. Readiness is always polled, never assumed after a sleep."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} during start-up"
                             + log_tail(logfile))
        if check():
            return
        time.sleep(0.02)
    raise BenchError(f"{what} not ready after {deadline_s:.0f} s" + log_tail(logfile))


def log_tail(logfile: Path | None) -> str:
    if logfile and logfile.exists():
        return "\n--- " + str(logfile) + " ---\n" + logfile.read_text(errors="replace")[-3000:]
    return ""


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(port: int, path: str, headers: dict[str, str] | None = None,
             timeout: float = 2.0) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def unit_us(value: str, unit: str) -> float:
    return float(value) * {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6, "m": 6e7}[unit]


# --------------------------------------------------------------------------------------
# Load generators: each returns a dict with ok (2xx count), errors, and its figures.
# --------------------------------------------------------------------------------------

def wrk(procs: Procs, url: str, conns: int, secs: float, headers: list[str]) -> dict:
    argv = ["wrk", f"-c{conns}", "-t1", f"-d{secs}s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    out = procs.run(argv + [url], cpu=LOAD_CPU, timeout=secs + 30)
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise BenchError(f"cannot parse wrk output:\n{out}")
    total = int(m.group(1))
    non2xx = int(re.search(r"Non-2xx or 3xx responses: (\d+)", out).group(1)) \
        if "Non-2xx" in out else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    sock_errors = sum(map(int, sock.groups())) if sock else 0
    p50 = re.search(r"\s50%\s+([\d.]+)(us|ms|s)", out)
    return {
        "ok": total - non2xx,
        "errors": non2xx + sock_errors,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_us": unit_us(*p50.groups()) if p50 else None,
        "tool": "wrk",
    }


def oha(procs: Procs, url: str, conns: int, secs: float, headers: list[str], *,
        rate: int | None, h2: bool) -> dict:
    argv = ["oha", "--no-tui", "--output-format", "json", "--worker-threads", "1",
            "-c", str(conns), "-z", f"{secs}s"]
    if rate:
        # Constant rate with coordinated-omission correction: latency is counted from
        # when a request was due, not from when a free connection sent it.
        argv += ["-q", str(rate), "--latency-correction"]
    if h2:
        argv += ["--http2", "-p", "1"]
    for h in headers:
        argv += ["-H", h]
    out = procs.run(argv + [url], cpu=LOAD_CPU, timeout=secs + 30)
    try:
        d = json.loads(out[out.index("{"):])
    except ValueError:
        raise BenchError(f"cannot parse oha output:\n{out[-2000:]}")
    codes = {int(k): v for k, v in d.get("statusCodeDistribution", {}).items()}
    ok = sum(v for k, v in codes.items() if 200 <= k < 300)
    # With -z on HTTP/1, requests in flight at the deadline are aborted: not an error.
    errs = sum(v for k, v in (d.get("errorDistribution") or {}).items() if "deadline" not in k)
    pct = d.get("latencyPercentiles") or {}

    def us(key):
        return pct[key] * 1e6 if pct.get(key) is not None else None

    return {
        "ok": ok,
        "errors": errs + sum(v for k, v in codes.items() if not 200 <= k < 300),
        "rps": d["summary"].get("requestsPerSec"),
        "p50_us": us("p50"), "p99_us": us("p99"), "p999_us": us("p99.9"),
        "tool": "oha",
    }


def h2load(procs: Procs, url: str, conns: int, streams: int, secs: float,
           headers: list[str], n: int | None = None) -> dict:
    argv = ["h2load", f"-c{conns}", f"-m{streams}", "-t1"]
    argv += [f"-n{n}"] if n else ["-D", f"{secs}s"]
    for h in headers:
        argv += ["-H", h]
    out = procs.run(argv + [url], cpu=LOAD_CPU, timeout=secs + 30)
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                    r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    fin = re.search(r"finished in [\d.]+[a-z]*, ([\d.]+) req/s", out)
    data = re.search(r"traffic: .*, [\d.]+\w*B \((\d+)\) data", out)
    if not (req and codes and fin):
        raise BenchError(f"cannot parse h2load output:\n{out[-2000:]}")
    # "failed" already counts the "errored" requests.
    failed, timeouts = int(req.group(5)), int(req.group(7))
    c2, c3, c4, c5 = map(int, codes.groups())
    return {
        "ok": c2, "errors": failed + timeouts + c3 + c4 + c5,
        "rps": float(fin.group(1)),
        "data_bytes": int(data.group(1)) if data else None,
        "tool": "h2load",
    }


# --------------------------------------------------------------------------------------
# Scenarios and targets
# --------------------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    dir: Path
    description: str
    proto: str                    # "http1" or "h2c"
    path: str
    headers: list[str]
    body_bytes: int | None
    idle_conns: bool
    default: bool
    quick: bool
    order: int                    # position in listings and runs
    targets: dict[str, str]       # target kind -> template file name
    vars: dict[str, str]

    @classmethod
    def load(cls, d: Path) -> "Scenario":
        t = tomllib.loads((d / "scenario.toml").read_text())
        proto = t.get("proto", "http1")
        if proto not in ("http1", "h2c"):
            raise BenchError(f"{d}/scenario.toml: proto must be http1 or h2c")
        unknown = set(t.get("targets", {})) - set(KINDS)
        if unknown:
            raise BenchError(f"{d}/scenario.toml: unknown targets {sorted(unknown)}")
        return cls(name=d.name, dir=d, description=t.get("description", d.name), proto=proto,
                   path=t.get("path", "/"), headers=list(t.get("headers", [])),
                   body_bytes=t.get("body_bytes"), idle_conns=bool(t.get("idle_conns", False)),
                   default=bool(t.get("default", False)), quick=bool(t.get("quick", False)),
                   order=int(t.get("order", 100)),
                   targets=dict(t.get("targets", {})), vars={**DEFAULT_VARS, **t.get("vars", {})})

    def template(self, name: str) -> Path:
        """A template is looked up in the scenario's folder first, then in templates/."""
        for p in (self.dir / name, TEMPLATES / name):
            if p.exists():
                return p
        raise BenchError(f"scenario {self.name}: template {name} not found")

    def target_names(self) -> list[str]:
        """direct is always measured: it is the baseline for added latency."""
        return ["direct"] + [k for k in KINDS
                             if KINDS[k].get("template_of", k) in self.targets]


# How each kind of proxy is started and when it is ready. {cfg} is the rendered config.
KINDS = {
    "attache": {"argv": ["{attache}", "run", "--config", "{cfg}", "--access-log", "off"],
                "ready": "admin"},
    "haproxy": {"argv": ["haproxy", "-db", "-f", "{cfg}"], "ready": "port"},
    "nginx": {"argv": ["nginx", "-e", "{dir}/nginx-stderr.log", "-p", "{dir}", "-c", "{cfg}"],
              "ready": "port"},
    # The floor: bench/relay.c, a byte relay that parses nothing (one upstream connection
    # per client connection, so it sits out the idle-connection test).
    "relay": {"argv": ["{relay}", "{cfg}"], "ready": "port", "idle_conns": False},
    # Another attache binary (--baseline-bin) with attache's config: an A/B of two builds
    # measured in the same interleaved rounds. Runs only when asked for.
    "attache-base": {"argv": ["{baseline}", "run", "--config", "{cfg}", "--access-log", "off"],
                     "ready": "admin", "template_of": "attache"},
}


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen | None = None   # None for direct: nothing between client and upstream
    logfile: Path | None = None
    started_at: float = 0.0

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc else []


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.mode = QUICK if args.quick else FULL
        self.procs = Procs()
        self.tmp = Path(tempfile.mkdtemp(prefix="attache-bench-"))
        self.attache = (Path(args.attache_bin).resolve() if args.attache_bin
                        else ROOT / "target" / "release" / "attache")
        if "attache" in args.targets and self.attache.exists():
            # Measure one binary for the whole run, even if a build replaces
            # target/release/attache meanwhile.
            self.attache = Path(shutil.copy2(self.attache, self.tmp / "attache"))
        self.baseline = None
        if args.baseline_bin:
            self.baseline = Path(shutil.copy2(Path(args.baseline_bin).resolve(),
                                              self.tmp / "attache-base"))
        self.upstream: subprocess.Popen | None = None
        self.spinners: list[subprocess.Popen] = []
        self.records: list[dict] = []
        self.failures: list[str] = []
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        # Template values that depend on the open-files limit every started process
        # inherits (see main()). HAProxy wants two descriptors per connection plus a few.
        self.limits = {"NOFILE": nofile, "HAPROXY_MAXCONN": (nofile - 20) // 2}
        # The idle-connection test opens as many connections as every target can hold
        # (10,000 asked; 9,950 under a 20,000 limit), the same number for all.
        self.idle_conns = min(self.mode["idle_conns"], (nofile - 100) // 2)

    # ---------------------------------------------------------------- setup
    def start_spinners(self) -> None:
        """A SCHED_IDLE busy loop per CPU keeps the vCPUs from halting: wake-up latency
        and steal drop, and the CPU cost of a request at a fixed rate stops depending on
        how deeply the vCPU slept (HAProxy @2000/s: ~50 µs with them, ~65 without).
        Each runs in a session of its own whose autogroup gets nice 19, so that at the
        top level of the scheduler it weighs next to nothing against the autogroups of
        the benchmark (-15) or of anyone else. Its CPU is never charged to a target."""
        if self.args.no_spinners:
            return
        for cpu in range(os.cpu_count() or 1):
            p = self.procs.spawn(
                ["chrt", "-i", "0", "nice", "-n", "19", "sh", "-c", "while :; do :; done"],
                cpu=cpu, priority=False)
            set_autogroup_nice(p.pid, 19)
            self.spinners.append(p)

    def start_upstream(self) -> None:
        ports = free_ports(6)
        self.up_port, self.up_h2_port = ports[0], ports[1]
        self.up_extra = ports[2:]
        (self.tmp / "www").mkdir()
        (self.tmp / "www" / "16k").write_bytes(b"y" * 16384)
        values = {**self.limits, "DIR": str(self.tmp), "UPSTREAM_PORT": self.up_port,
                  "UPSTREAM_H2_PORT": self.up_h2_port, "BODY_100": "x" * 99 + "\\n"}
        values.update({f"UPSTREAM_PORT_{i + 1}": p for i, p in enumerate(self.up_extra)})
        cfg = render(TEMPLATES / "upstream-nginx.conf", values, self.tmp / "upstream.conf")
        logfile = self.tmp / "upstream.log"
        self.upstream = self.procs.spawn(
            ["nginx", "-e", str(self.tmp / "upstream-stderr.log"), "-p", str(self.tmp),
             "-c", str(cfg)], cpu=LOAD_CPU, logfile=logfile)
        wait_until(lambda: port_open(self.up_port) and port_open(self.up_h2_port), 10,
                   self.upstream, "upstream nginx", logfile)
        status, body = http_get(self.up_port, "/100b")
        if status != 200 or len(body) != 100:
            raise BenchError(f"upstream answered {status} with {len(body)} bytes")

    def start_target(self, scen: Scenario, name: str) -> Target:
        if name == "direct":
            return Target("direct", self.up_h2_port if scen.proto == "h2c" else self.up_port)
        port, admin = free_ports(2)
        d = self.tmp / f"{scen.name}-{name}"
        d.mkdir(exist_ok=True)
        values = {**self.limits, "DIR": str(d), "PORT": port, "ADMIN_PORT": admin,
                  "UPSTREAM_PORT": self.up_port, "UPSTREAM_H2_PORT": self.up_h2_port,
                  **{f"UPSTREAM_PORT_{i + 1}": p for i, p in enumerate(self.up_extra)},
                  **scen.vars}
        kind = KINDS[name]
        tpl = scen.template(scen.targets[kind.get("template_of", name)])
        cfg = render(tpl, values, d / tpl.name)
        relay = self.relay() if name == "relay" else None
        argv = [a.format(attache=self.attache, cfg=cfg, dir=d, relay=relay,
                         baseline=self.baseline)
                for a in kind["argv"]]
        logfile = d / "stdout.log"
        t = Target(name, port, logfile=logfile)
        t.proc = self.procs.spawn(argv, cpu=PROXY_CPU, logfile=logfile)
        t.started_at = time.monotonic()
        if kind["ready"] == "admin":
            def ready():
                try:
                    return http_get(admin, "/ready", timeout=0.5)[0] == 200
                except OSError:
                    return False
        else:
            def ready():
                return port_open(port)
        wait_until(ready, 15, t.proc, f"{name} ({scen.name})", logfile)
        return t

    def relay(self) -> Path:
        """bench/relay.c, compiled once per run (gcc -O2)."""
        exe = self.tmp / "relay"
        if not exe.exists():
            src = BENCH / "relay.c"
            r = subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise BenchError(f"gcc {src} failed:\n{r.stderr}")
        return exe

    def url(self, scen: Scenario, t: Target) -> str:
        return f"http://127.0.0.1:{t.port}{scen.path}"

    def preflight(self, scen: Scenario, t: Target) -> None:
        """One request end to end before anything is measured: status and body size."""
        if scen.proto == "http1":
            hdrs = dict(h.split(":", 1) for h in scen.headers)
            try:
                status, body = http_get(t.port, scen.path,
                                        {k: v.strip() for k, v in hdrs.items()}, timeout=10)
            except OSError as e:   # refused, reset, timed out
                raise BenchError(f"({scen.name}) GET failed: {e!r}") from None
            n = len(body)
            if status != 200:
                raise BenchError(f"({scen.name}) GET answered {status}: {body[:300]!r}")
        else:
            r = h2load(self.procs, self.url(scen, t), 1, 1, 10, scen.headers, n=4)
            if r["ok"] != 4 or r["errors"]:
                raise BenchError(f"({scen.name}) h2c requests failed: {r}")
            n = (r["data_bytes"] or 0) // 4
        if scen.body_bytes is not None and n != scen.body_bytes:
            raise BenchError(f"({scen.name}) body of {n} bytes, expected {scen.body_bytes}")

    # ---------------------------------------------------------------- measuring
    def measure(self, label: str, t: Target, run) -> dict:
        """Run one test, charging the target's process tree for the CPU it used, and
        checking that processes we did not start stayed quiet; redo a noisy test."""
        for attempt in range(MAX_REDO + 1):
            ours_roots = [p.pid for p in self.procs.live]
            kids = children_map()
            ours_pids = [pid for root in ours_roots for pid in tree(root, kids)]
            t_pids = t.pids()
            up_pids = tree(self.upstream.pid, kids)
            a_t, a_up, a_ours = cpu_sample(t_pids), cpu_sample(up_pids), cpu_sample(ours_pids)
            a_busy, a_self, t0 = system_busy(), self_cpu(), time.monotonic()

            counter = self.count_syscalls(t_pids) if self.args.syscalls and t.proc else None
            try:
                r = self.guard(label, t, run)
            finally:
                counts = self.stop_counting(counter) if counter else None

            wall = time.monotonic() - t0
            b_busy, b_self = system_busy(), self_cpu()
            kids = children_map()
            b_t = cpu_sample(t.pids())
            b_up = cpu_sample(tree(self.upstream.pid, kids))
            b_ours = cpu_sample([pid for root in ours_roots for pid in tree(root, kids)])
            proxy_cpu, precise = cpu_delta(a_t, b_t) if t.proc else (None, True)
            # The same from utime+stime (10 ms ticks), kept in the JSON as a cross-check.
            ticks_cpu = (sum(b_t.procs.values()) - sum(a_t.procs.values())) / CLK_TCK \
                if t.proc else None
            # Of which user space (utime): what the proxy's own code costs, against the
            # kernel's part (stime), which is much the same for every target.
            user_cpu = (sum(b_t.user.values()) - sum(a_t.user.values())) / CLK_TCK \
                if t.proc else None
            up_cpu, _ = cpu_delta(a_up, b_up)
            ours, _ = cpu_delta(a_ours, b_ours)
            loadgen_cpu = b_self - a_self
            # Everything the machine did that no process of ours accounts for.
            other = max(0.0, (b_busy - a_busy) - ours - loadgen_cpu)
            r.update({
                "wall_s": wall,
                "proxy_cpu_s": proxy_cpu,
                "proxy_cpu_s_from_ticks": ticks_cpu,
                "proxy_user_s_from_ticks": user_cpu,
                "user_us_per_req": user_cpu / r["ok"] * 1e6 if user_cpu is not None and r["ok"]
                else None,
                "sys_us_per_req": (ticks_cpu - user_cpu) / r["ok"] * 1e6
                if user_cpu is not None and r["ok"] else None,
                "cpu_us_per_req": proxy_cpu / r["ok"] * 1e6 if proxy_cpu is not None and r["ok"]
                else None,
                "cpu_precise": precise,
                "upstream_cpu_us_per_req": up_cpu / r["ok"] * 1e6 if r["ok"] else None,
                "loadgen_cpu_us_per_req": loadgen_cpu / r["ok"] * 1e6 if r["ok"] else None,
                "other_cpu_core_frac": other / wall if wall > 0 else 0.0,
                "machine_busy_s": b_busy - a_busy, "ours_cpu_s": ours + loadgen_cpu,
                "attempts": attempt + 1,
            })
            if counts is not None and r["ok"]:
                r["syscalls_per_req"] = {k: v / r["ok"] for k, v in counts.items()}
            if r["other_cpu_core_frac"] <= NOISE_LIMIT:
                break
            if attempt < MAX_REDO:
                log(f"  {label} {t.name}: other processes used {r['other_cpu_core_frac']:.0%} "
                    f"of a core; running it again")
        else:
            r["noisy"] = True
        if r["errors"] or not r["ok"]:
            msg = f"{label} {t.name}: {r['errors']} errors, {r['ok']} 2xx responses"
            self.failures.append(msg)
            log("  ERROR " + msg + log_tail(t.logfile))
        return r

    def count_syscalls(self, pids: list[int]):
        """perf stat counting the target's system calls by tracepoint until stop_counting.
        Tracepoints cost a little per call: a run with --syscalls says how many calls a
        request takes, its CPU figures are not comparable with a run without."""
        out = self.tmp / "perf-stat.csv"
        out.unlink(missing_ok=True)
        events = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{n}" for n in SYSCALLS]
        p = self.procs.spawn(["perf", "stat", "-x,", "-o", str(out), "-e", ",".join(events),
                              "-p", ",".join(map(str, pids))],
                             cpu=LOAD_CPU, priority=False, logfile=self.tmp / "perf.log")
        # perf has attached once it has opened its output file.
        wait_until(lambda: out.exists(), 10, p, "perf stat", self.tmp / "perf.log")
        return p, out

    def stop_counting(self, counter) -> dict[str, float]:
        p, out = counter
        os.kill(p.pid, signal.SIGINT)
        try:
            p.wait(timeout=10)
        finally:
            self.procs.stop(p)
        counts = {}
        for line in out.read_text().splitlines():
            f = line.split(",")
            if len(f) > 3 and f[2].startswith(("raw_syscalls", "syscalls")):
                name = f[2].split(":")[1].removeprefix("sys_enter_").replace("sys_enter", "all")
                try:
                    counts[name] = float(f[0])
                except ValueError:   # <not counted>
                    pass
        return counts

    def guard(self, label: str, t: Target, run):
        """run(), with a failure reported against the target: its name, whether it is
        still alive, and the end of its log."""
        try:
            return run()
        except BenchError as e:
            dead = (f" ({t.name} exited with {t.proc.returncode})"
                    if t.proc and t.proc.poll() is not None else "")
            raise BenchError(f"{label} {t.name}{dead}: {e}" + log_tail(t.logfile)) from None

    def test_saturation(self, scen: Scenario, t: Target) -> dict:
        secs = self.mode["sat"]
        if scen.proto == "h2c":
            run = lambda: h2load(self.procs, self.url(scen, t), H2_CONNS, H2_STREAMS, secs,
                                 scen.headers)
        else:
            run = lambda: wrk(self.procs, self.url(scen, t), SAT_CONNS, secs, scen.headers)
        return self.measure("saturation", t, run)

    def test_rate(self, scen: Scenario, t: Target) -> dict:
        return self.measure("rate", t, lambda: oha(
            self.procs, self.url(scen, t), RATE_CONNS, self.mode["rate"], scen.headers,
            rate=RATE, h2=scen.proto == "h2c"))

    def test_ping(self, scen: Scenario, t: Target) -> dict:
        """One connection, one request at a time, with the proxy on the load generator's
        CPU: the latency a request pays for going through the proxy."""
        secs = self.mode["ping"]
        if scen.proto == "h2c":
            run = lambda: oha(self.procs, self.url(scen, t), 1, secs, scen.headers,
                              rate=None, h2=True)
        else:
            run = lambda: wrk(self.procs, self.url(scen, t), 1, secs, scen.headers)
        if t.proc:
            move_tree(t.proc.pid, LOAD_CPU)
        try:
            return self.measure("ping", t, run)
        finally:
            if t.proc:
                move_tree(t.proc.pid, PROXY_CPU)

    def test_idle_conns(self, scen: Scenario, t: Target) -> dict:
        """RSS with many idle keep-alive client connections, each having served one
        request. Compared with the RSS just before they were opened."""
        n = self.idle_conns
        before = rss_bytes(t.pids())
        helper = self.procs.spawn([sys.executable, str(BENCH / "idle_conns.py"),
                                   "--port", str(t.port), "--path", scen.path, "-n", str(n)],
                                  cpu=LOAD_CPU, stdin=subprocess.PIPE, pipe=True,
                                  logfile=self.tmp / "idle_conns.log")
        try:
            opened = json.loads(read_line(helper, 120, "idle_conns.py"))
            with_conns = rss_bytes(t.pids())
            helper.stdin.write(b"check\n")
            helper.stdin.flush()
            still = json.loads(read_line(helper, 30, "idle_conns.py"))
        finally:
            self.procs.stop(helper)
        r = {"conns": n, "ok": opened["ok"], "still_open": still["still_open"],
             "rss_before": before, "rss_with_conns": with_conns,
             "bytes_per_conn": (with_conns - before) / max(1, opened["ok"])}
        if opened["ok"] < n:
            msg = f"idle-conns {t.name}: only {opened['ok']} of {n} connections served"
            self.failures.append(msg)
            log("  ERROR " + msg + f" ({opened.get('error')})")
        elif still["still_open"] < opened["ok"]:
            log(f"  note: {t.name} closed {opened['ok'] - still['still_open']} idle connections")
        return r

    # ---------------------------------------------------------------- one round
    def round(self, rnd: int, scen: Scenario) -> dict:
        names = [n for n in scen.target_names() if n in self.args.targets]
        if not names:
            log(f"{scen.name}: none of the selected targets runs in this scenario")
            return {}
        k = rnd % len(names)
        order = names[k:] + names[:k]   # rotated: A B C D, B C D A, ...
        log(f"round {rnd + 1}, {scen.name}: {' '.join(order)}")
        targets: dict[str, Target] = {}
        res: dict[str, dict] = {n: {} for n in order}
        try:
            for n in order:
                targets[n] = self.start_target(scen, n)
            # Idle RSS: 1 s after start, before any request (a measurement point, not a
            # synchronisation: readiness was polled).
            for n in order:
                t = targets[n]
                if t.proc:
                    time.sleep(max(0.0, t.started_at + 1.0 - time.monotonic()))
                    res[n]["rss_idle"] = rss_bytes(t.pids())
            for n in order:
                self.guard("pre-flight", targets[n], lambda: self.preflight(scen, targets[n]))
            for n in order:   # warm-up: connections to the upstream, caches, allocator
                self.guard("warm-up", targets[n], lambda: self.warm(scen, targets[n]))
            tests = {"sat": self.test_saturation, "rate": self.test_rate,
                     "ping": self.test_ping}
            for test in (tests[k] for k in self.args.tests):
                for n in order:
                    res[n][test.__name__[5:]] = test(scen, targets[n])
            for n in order:
                if targets[n].proc:
                    res[n]["rss_peak"] = rss_bytes(targets[n].pids(), "VmHWM")
            if scen.idle_conns and scen.proto == "http1" and not self.args.no_idle_conns:
                for n in order:
                    if targets[n].proc and KINDS[n].get("idle_conns", True):
                        res[n]["idle_conns"] = self.test_idle_conns(scen, targets[n])
        finally:
            for t in targets.values():
                if t.proc:
                    self.procs.stop(t.proc)
        rec = {"round": rnd + 1, "scenario": scen.name, "order": order, "targets": res}
        self.records.append(rec)
        return rec

    def warm(self, scen: Scenario, t: Target) -> None:
        secs = self.mode["warm"]
        if scen.proto == "h2c":
            h2load(self.procs, self.url(scen, t), H2_CONNS, H2_STREAMS, secs, scen.headers)
        else:
            wrk(self.procs, self.url(scen, t), SAT_CONNS, secs, scen.headers)

    def close(self) -> None:
        self.procs.stop_all()
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"kept {self.tmp}")


def read_line(p: subprocess.Popen, timeout: float, what: str) -> str:
    """One line from a helper's stdout, with a deadline."""
    end = time.monotonic() + timeout
    buf = b""
    fd = p.stdout.fileno()
    while not buf.endswith(b"\n"):
        left = end - time.monotonic()
        if left <= 0:
            raise BenchError(f"{what}: no answer within {timeout:.0f} s")
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 1)
            if not chunk:
                raise BenchError(f"{what} exited: {buf.decode(errors='replace')}")
            buf += chunk
    return buf.decode()


# --------------------------------------------------------------------------------------
# Summary: medians over rounds, ratios to HAProxy within each round.
# --------------------------------------------------------------------------------------

# (key, extractor) for every figure summarised; extractors take one target's round result.
FIGURES = {
    "cpu_sat": lambda r: r.get("saturation", {}).get("cpu_us_per_req"),
    "cpu_rate": lambda r: r.get("rate", {}).get("cpu_us_per_req"),
    "rps_sat": lambda r: r.get("saturation", {}).get("rps"),
    "p50_rate": lambda r: r.get("rate", {}).get("p50_us"),
    "p99_rate": lambda r: r.get("rate", {}).get("p99_us"),
    "p999_rate": lambda r: r.get("rate", {}).get("p999_us"),
    "ping_p50": lambda r: r.get("ping", {}).get("p50_us"),
    "rss_idle": lambda r: r.get("rss_idle"),
    "rss_peak": lambda r: r.get("rss_peak"),
    "rss_conns": lambda r: r.get("idle_conns", {}).get("rss_with_conns"),
    "bytes_per_conn": lambda r: r.get("idle_conns", {}).get("bytes_per_conn"),
}
RATIOS = ("cpu_sat", "cpu_rate", "added_p50", "rss_idle")


def summarise(records: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for scen in dict.fromkeys(r["scenario"] for r in records):
        recs = [r for r in records if r["scenario"] == scen]
        per_round = []
        for rec in recs:
            vals = {n: {k: f(res) for k, f in FIGURES.items()} for n, res in rec["targets"].items()}
            base = vals.get("direct", {}).get("ping_p50")
            for n, v in vals.items():
                v["added_p50"] = (v["ping_p50"] - base
                                  if n != "direct" and v["ping_p50"] is not None and base is not None
                                  else None)
            ha = vals.get("haproxy")
            for n, v in vals.items():
                for k in RATIOS:
                    v["x_" + k] = (v[k] / ha[k] if ha and v[k] is not None and ha[k]
                                   else None)
            per_round.append(vals)
        names = list(dict.fromkeys(n for v in per_round for n in v))
        out[scen] = {n: {k: median([v[n][k] for v in per_round if n in v])
                         for k in next(v[n] for v in per_round if n in v)}
                     for n in names}
        for n in names:
            out[scen][n]["rounds"] = sum(1 for v in per_round if n in v)
    return out


def fmt(v, spec="{:.1f}", none="-"):
    return none if v is None else spec.format(v)


COLUMNS = ["target", "CPU µs/req sat", "CPU µs/req @2k/s", "req/s sat",
           "p50/p99/p99.9 @2k/s µs", "added 1-conn p50 µs", "RSS MiB idle/peak/conns",
           "KiB/idle conn", "× HAProxy cpu sat/@2k/added/rss"]


def rows(summary: dict) -> list[list[str]]:
    out = []
    for n, v in summary.items():
        added = (f"(base {fmt(v['ping_p50'], '{:.0f}')})" if n == "direct"
                 else fmt(v["added_p50"], "{:+.0f}"))
        rss = ("-" if v["rss_idle"] is None else
               "/".join(fmt(v[k] / MIB if v[k] is not None else None, "{:.1f}")
                        for k in ("rss_idle", "rss_peak", "rss_conns")))
        ratio = ("-" if all(v["x_" + k] is None for k in RATIOS) else
                 "/".join(fmt(v["x_" + k], "{:.2f}") for k in RATIOS))
        out.append([n, fmt(v["cpu_sat"]), fmt(v["cpu_rate"]), fmt(v["rps_sat"], "{:,.0f}"),
                    "/".join(fmt(v[k], "{:.0f}") for k in ("p50_rate", "p99_rate", "p999_rate")),
                    added, rss, fmt(v["bytes_per_conn"] / 1024 if v["bytes_per_conn"] is not None
                                    else None),
                    ratio])
    return out


def text_table(summary: dict) -> str:
    rs = [COLUMNS] + rows(summary)
    w = [max(len(r[i]) for r in rs) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
             for r in rs]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def md_table(summary: dict) -> str:
    rs = rows(summary)
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rs]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Run metadata and reports
# --------------------------------------------------------------------------------------

def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                              cwd=ROOT).stdout.strip() or subprocess.run(
            cmd, capture_output=True, text=True, timeout=10, cwd=ROOT).stderr.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def attache_rev(args, rev: str) -> str:
    """Which attache was measured. Without a build, the binary may predate the sources."""
    if args.attache_bin:
        return f"binary {args.attache_bin}"
    if args.no_build:
        binary = ROOT / "target" / "release" / "attache"
        if binary.exists():
            built = dt.datetime.fromtimestamp(binary.stat().st_mtime, dt.timezone.utc)
            return f"{rev}, binary built {built:%Y-%m-%d %H:%M UTC} (--no-build)"
    return rev


def metadata(args, argv: list[str]) -> dict:
    cpu_model = next((l.split(":", 1)[1].strip()
                      for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("model name")), "unknown")
    rev = sh(["git", "rev-parse", "--short", "HEAD"]) or "no commit"
    dirty = bool(sh(["git", "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"]))
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "bench/run" + ("" if not argv else " " + shlex.join(argv)),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": os.uname().release,
        "attache_rev": attache_rev(args, rev + (" (uncommitted changes)" if dirty else "")),
        "baseline_bin": args.baseline_bin,
        "versions": {
            "haproxy": sh(["haproxy", "-v"]).splitlines()[0] if shutil.which("haproxy") else None,
            "nginx": sh(["nginx", "-v"]),
            "wrk": sh(["wrk", "-v"]).splitlines()[0] if shutil.which("wrk") else None,
            "oha": sh(["oha", "--version"]),
            "h2load": sh(["h2load", "--version"]),
        },
        "mode": "quick" if args.quick else "full",
        "rounds": args.rounds,
        "settings": {"rate": RATE, "rate_conns": RATE_CONNS, "sat_conns": SAT_CONNS,
                     "h2_conns": H2_CONNS, "h2_streams": H2_STREAMS,
                     "noise_limit_core_frac": NOISE_LIMIT,
                     **(QUICK if args.quick else FULL)},
    }


def markdown_section(meta: dict, scens: list[Scenario], summary: dict, notes: list[str]) -> str:
    v = meta["versions"]
    out = [f"## {meta['date']}: `{meta['command']}`", "",
           f"- Machine: nproc {meta['nproc']}, {meta['cpu_model']}, kernel {meta['kernel']}",
           f"- attache {meta['attache_rev']}; {v['haproxy']}; {v['nginx']}; {v['oha']}; "
           f"{v['h2load']}",
           f"- {meta['rounds']} round(s), medians; ratios to HAProxy taken within each round. "
           f"RSS 'conns': with {meta['settings']['idle_conns']:,} idle keep-alive client "
           f"connections open.",
           ""]
    for s in scens:
        if s.name in summary:
            out += [f"### {s.name}: {s.description}", "", md_table(summary[s.name]), ""]
    out += [f"- {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(out)


RESULTS_HEADER = """# attache benchmark results

Written by `bench/run` (see bench/README.md for what each figure means), newest first.
Compare figures only within one section: the machine drifts between runs.

"""


def write_results_md(section: str) -> Path:
    p = BENCH / "RESULTS.md"
    old = p.read_text() if p.exists() else RESULTS_HEADER
    body = old[len(RESULTS_HEADER):] if old.startswith(RESULTS_HEADER) else old
    p.write_text(RESULTS_HEADER + section + "\n" + body)
    return p


# --------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="bench/run also takes --no-install: don't check or "
                                        "install the tools.")
    ap.add_argument("--quick", action="store_true",
                    help="one round, short tests, default quick scenario, 500 idle conns: "
                         "proves the harness end to end")
    ap.add_argument("--rounds", type=int, help="rounds (default 5; 1 with --quick)")
    ap.add_argument("--scenarios", help="comma-separated scenario names (default: all "
                    "scenarios marked default; http1-100b with --quick)")
    ap.add_argument("--targets", default="direct,attache,haproxy,nginx,relay",
                    help="comma-separated targets to run (default: all)")
    ap.add_argument("--tests", default="sat,rate,ping",
                    help="comma-separated tests: sat (saturation), rate (fixed rate), ping "
                         "(one connection); default all")
    ap.add_argument("--baseline-bin", metavar="PATH",
                    help="also measure this attache binary, as target attache-base, in the "
                         "same rounds (an A/B of two builds)")
    ap.add_argument("--no-build", action="store_true", help="use target/release/attache as is")
    ap.add_argument("--attache-bin", metavar="PATH",
                    help="measure this attache binary (implies --no-build)")
    ap.add_argument("--lock-cargo", action="store_true",
                    help=f"hold {CARGO_LOCK} while measuring, so that no cargo build or test "
                         "of this project runs meanwhile (they wait)")
    ap.add_argument("--no-idle-conns", action="store_true", help="skip the idle-connection RSS test")
    ap.add_argument("--no-spinners", action="store_true",
                    help="no idle spinners (to see what they change; figures are not comparable)")
    ap.add_argument("--syscalls", action="store_true",
                    help="count the proxy's system calls per request (perf tracepoints) and "
                         "print them; the tracepoints cost CPU: such a run does not go into "
                         "RESULTS.md")
    ap.add_argument("--keep-tmp", action="store_true", help="keep generated configs and logs")
    ap.add_argument("--list", action="store_true", help="list scenarios and exit")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="print the tables (and Markdown) of saved results and exit; several "
                         "files are pooled; nothing is run")
    a = ap.parse_args(argv)
    a.rounds = a.rounds or (QUICK if a.quick else FULL)["rounds"]
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    a.targets = [t for t in a.targets.split(",") if t]
    if a.baseline_bin and "attache-base" not in a.targets:
        a.targets.append("attache-base")
    if "attache-base" in a.targets and not a.baseline_bin:
        ap.error("target attache-base needs --baseline-bin")
    a.tests = [t for t in a.tests.split(",") if t]
    bad_tests = set(a.tests) - {"sat", "rate", "ping"}
    if bad_tests or not a.tests:
        ap.error(f"--tests: choose from sat, rate, ping (got {a.tests})")
    bad = set(a.targets) - {"direct", *KINDS}
    if bad:
        ap.error(f"unknown targets: {', '.join(sorted(bad))}")
    return a


def run_notes(records: list[dict], failures: list[str]) -> list[str]:
    """What a reader must know to trust the figures: tests redone or still noisy, errors."""
    tests = [res[k] for rec in records for res in rec["targets"].values()
             for k in ("saturation", "rate", "ping") if k in res]
    notes = []
    redone = sum(1 for t in tests if t.get("attempts", 1) > 1)
    noisy = [t for t in tests if t.get("noisy")]
    if redone:
        notes.append(f"{redone} of {len(tests)} tests were run again because processes the "
                     f"benchmark did not start used more than {NOISE_LIMIT:.0%} of a core.")
    if noisy:
        other = statistics.median(t["other_cpu_core_frac"] for t in noisy)
        notes.append(f"{len(noisy)} of {len(tests)} tests stayed above that after {MAX_REDO} "
                     f"redos (median {other:.0%} of a core used by others): their figures are "
                     f"less reliable; they are marked \"noisy\" in the JSON.")
    if failures:
        notes.append("ERRORS: " + "; ".join(failures))
    return notes


def print_tables(scens: list[Scenario], summary: dict, notes: list[str]) -> None:
    for s in scens:
        if s.name in summary:
            rounds = max(v["rounds"] for v in summary[s.name].values())
            print(f"\n{s.name}: {s.description} — medians of {rounds} round(s)")
            print(text_table(summary[s.name]))
    for n in notes:
        print(f"\n* {n}")


def syscall_table(records: list[dict]) -> str:
    """Medians over rounds of the system calls per request, per scenario, test and target
    (runs with --syscalls); the calls no target makes are left out."""
    cells: dict[tuple, dict[str, list[float]]] = {}
    for rec in records:
        for n, res in rec["targets"].items():
            for test in ("saturation", "rate", "ping"):
                c = res.get(test, {}).get("syscalls_per_req")
                if c:
                    row = cells.setdefault((rec["scenario"], test, n), {})
                    for k, v in c.items():
                        row.setdefault(k, []).append(v)
    if not cells:
        return ""
    names = ["all"] + [k for k in SYSCALLS
                       if any(median(r.get(k, [0])) >= 0.005 for r in cells.values())]
    head = ["scenario", "test", "target"] + names
    rs = [head] + [[*key] + [f"{median(r.get(k, [0])):.2f}" for k in names]
                   for key, r in cells.items()]
    w = [max(len(r[i]) for r in rs) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i])
                               for i, c in enumerate(r)) for r in rs)


def report(files: list[str], all_scens: dict[str, Scenario]) -> int:
    """Tables from saved JSON results; several files are pooled (their rounds together),
    as BENCH-METHOD asks before claiming a small difference."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    records = [rec for run in runs for rec in run["records"]]
    summary = summarise(records)
    notes = run_notes(records, [f for run in runs for f in run.get("failures", [])])
    scens = [s for n, s in all_scens.items() if n in summary]
    meta = dict(runs[0]["meta"])
    if len(runs) > 1:
        meta["command"] = "pooled: " + "; ".join(run["meta"]["command"] for run in runs)
        meta["date"] = ", ".join(run["meta"]["date"] for run in runs)
    meta["rounds"] = max((sum(1 for r in records if r["scenario"] == s.name) for s in scens),
                         default=0)
    print_tables(scens, summary, notes)
    calls = syscall_table(records)
    if calls:
        print("\nSystem calls per request (medians over rounds):\n" + calls)
    print("\n" + markdown_section(meta, scens, summary, notes))
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    loaded = [Scenario.load(d) for d in SCENARIOS.iterdir() if (d / "scenario.toml").exists()]
    all_scens = {s.name: s for s in sorted(loaded, key=lambda s: (s.order, s.name))}
    if args.report:
        return report(args.report, all_scens)
    if args.list:
        for s in all_scens.values():
            flags = ",".join(f for f in ("default", "quick") if getattr(s, f))
            print(f"{s.name:16} {s.proto:6} {', '.join(s.target_names()):32} "
                  f"{s.description} [{flags}]")
        return 0
    if args.scenarios:
        names = [s for s in args.scenarios.split(",") if s]
        missing = [n for n in names if n not in all_scens]
        if missing:
            log(f"unknown scenarios: {', '.join(missing)} (have: {', '.join(all_scens)})")
            return 2
    else:
        names = [n for n, s in all_scens.items() if (s.quick if args.quick else s.default)]
    scens = [all_scens[n] for n in names]

    if os.geteuid() != 0:
        log("warning: not root: no autogroup priority, and the 10k-connection test may "
            "hit the open-files limit")
    # Open-file limit for every process started from here (proxies and helpers inherit
    # it): 10,000 client connections plus the proxy's side of them.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for lim in ((65536, 65536), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, lim)
            break
        except (ValueError, OSError):
            continue
    for tool in ("wrk", "oha", "haproxy", "nginx", "taskset", "chrt") + (
            ("h2load",) if any(s.proto == "h2c" for s in scens) else ()):
        if not shutil.which(tool):
            log(f"{tool} not found: run bench/run (it installs the tools)")
            return 2
    if args.syscalls and not shutil.which("perf"):
        log("--syscalls needs perf (Debian package linux-perf)")
        return 2
    if (os.cpu_count() or 1) < 2:
        log("needs at least 2 CPUs (load generator on 0, proxy on 1)")
        return 2

    if "attache" in args.targets and any("attache" in s.targets for s in scens) \
            and not args.no_build and not args.attache_bin:
        log("building attache (release)")
        b = subprocess.run(["flock", CARGO_LOCK, "cargo", "build", "--release",
                            "--bin", "attache"], cwd=ROOT)
        if b.returncode != 0:
            log("cargo build failed")
            return 1

    if args.lock_cargo:
        # Everything in this project runs cargo under this lock (builds and tests): holding
        # it keeps them from running during the measurements; they wait, then go on.
        lock_fd = os.open(CARGO_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        end = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    log(f"{CARGO_LOCK} still held after {LOCK_WAIT // 60} minutes; giving up")
                    return 1
                if not getattr(main, "said", False):
                    log(f"waiting for {CARGO_LOCK} (a cargo command is running)")
                    main.said = True
                time.sleep(1)
        log(f"holding {CARGO_LOCK} until the end of the run")

    meta = metadata(args, argv)
    bench = Bench(args)
    meta["settings"]["idle_conns"] = bench.idle_conns

    # Stop everything we started on any exit: normal, error, Ctrl-C, TERM, HUP.
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    status = 0
    try:
        bench.start_spinners()
        bench.start_upstream()
        log(f"upstream nginx on 127.0.0.1:{bench.up_port} (h2c {bench.up_h2_port}); "
            f"configs and logs in {bench.tmp}")
        for rnd in range(args.rounds):
            for scen in scens:
                bench.round(rnd, scen)
    except BenchError as e:
        log(f"FAILED: {e}")
        status = 1
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    except Exception:   # a bug here: report it, but still stop everything (finally)
        log("FAILED with an unexpected error:\n" + traceback.format_exc())
        status = 1
    finally:
        bench.close()

    if not bench.records:
        return status or 1
    summary = summarise(bench.records)
    notes = run_notes(bench.records, bench.failures)
    if status:
        notes.append("the run stopped early; figures cover the rounds completed.")

    OUT.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_json = OUT / f"results-{stamp}{'-quick' if args.quick else ''}.json"
    out_json.write_text(json.dumps({"meta": meta, "summary": summary, "notes": notes,
                                    "failures": bench.failures, "records": bench.records},
                                   indent=1))
    shutil.copyfile(out_json, OUT / "latest.json")

    print_tables(scens, summary, notes)
    calls = syscall_table(bench.records)
    if calls:
        print("\nSystem calls per request (medians over rounds):\n" + calls)
    section = markdown_section(meta, scens, summary, notes)
    working = len(args.tests) < 3 or args.baseline_bin or args.syscalls
    if args.quick or status or working:
        # A quick run proves the harness works, a run that stopped early is partial, and an
        # A/B or a run of some tests only is work in progress: none goes into RESULTS.md.
        md = OUT / ("RESULTS-quick.md" if args.quick
                    else f"RESULTS-partial-{stamp}.md")
        md.write_text(section)
    else:
        md = write_results_md(section)
    print(f"\nJSON: {out_json.relative_to(ROOT)}   Markdown: {md.relative_to(ROOT)}")
    if bench.failures and not status:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
