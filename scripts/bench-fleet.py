#!/usr/bin/env python3
"""The fleet scenario, end to end on loopback: the measuring driver behind
scripts/bench-fleet.sh (run that; it builds the binary first).

Starts `onsip-ua-exporter simulate` (the OnSIP simulator's in-process XMPP
face) and the exporter binary logged into it, drives load through the
simulator's standard input (one load a line, as --load.* flags) and measures
from outside, as a user would: HTTP scrapes, /proc/PID/status for memory.

Phases:
  small  1,000 addresses: idle memory; 10,000 events/s with the latency
         probe (a phone in its own domain comes and goes; time until
         /metrics shows it); a real Prometheus scrapes it (OpenMetrics).
  fleet  100,000 addresses, 150,000 phones registered: time to up,
         ingestion of the registrations, /metrics p50/p99 (text,
         OpenMetrics, gzip), promtool on a full scrape, memory, then the
         highest sustained event rate into the state.
  start  a restart with the state file the fleet phase left (when the
         exporter has --state.file): time until /readyz answers 200 with
         the devices loaded.
Python 3.11, standard library only.
"""

import argparse
import gzip
import http.client
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TARGETS = []  # (figure, target, measured, naive or note)


def log(msg):
    print(f"[bench-fleet] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values, q):
    values = sorted(values)
    return values[round((len(values) - 1) * q)]


def rss_kb(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Simulator:
    """`onsip-ua-exporter simulate` with --sim.commands."""

    def __init__(self, binary, addresses, domains, workdir):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "simulate", "--sim.listen-address", f"127.0.0.1:{self.port}",
             "--sim.addresses", str(addresses), "--sim.domains", str(domains),
             "--sim.commands", "--load.duration", "0s", "--log.level", "warn"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(os.path.join(workdir, f"sim-{addresses}.log"), "w"),
            text=True, bufsize=1)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.info = {}
        while "exporter" not in self.info:
            line = self.next_line(30)
            if ": " in line:
                key, value = line.split(": ", 1)
                self.info[key] = value

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout):
        line = self.lines.get(timeout=timeout)
        if line is None:
            raise RuntimeError("simulate exited")
        log(f"sim: {line}")
        return line

    def wait_for(self, text, timeout):
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(max(0.1, deadline - time.monotonic()))
            if text in line:
                return line

    def load(self, flags, timeout=600):
        """Runs one load; returns its JSON figures (or {})."""
        self.proc.stdin.write(flags + "\n")
        self.proc.stdin.flush()
        result = {}
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(max(0.1, deadline - time.monotonic()))
            if line.startswith("json: "):
                result = json.loads(line[6:])
            elif line.startswith("error: "):
                raise RuntimeError(line)
            elif line == "done":
                return result

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Exporter:
    def __init__(self, binary, sim_info, xmpp_server, workdir, name, extra=()):
        self.port = free_port()
        env = dict(os.environ, ONSIP_XMPP_PASSWORD=sim_info["xmpp_password"],
                   ONSIP_AUTH_PASSWORD=sim_info["auth_password"])
        env.pop("RUST_LOG", None)
        self.log_path = os.path.join(workdir, f"exporter-{name}.log")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [binary, "--xmpp.jid", sim_info["jid"], "--xmpp.server", xmpp_server,
             "--xmpp.insecure-plaintext-for-tests",
             "--onsip.auth-jid", sim_info["auth_jid"],
             "--onsip.pubsub-jid", sim_info["pubsub_jid"],
             "--onsip.sip-address", sim_info["sip_address"],
             "--web.listen-address", f"127.0.0.1:{self.port}",
             "--log.level", "warn", *extra],
            env=env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)

    def get(self, path, headers=None, timeout=60):
        """(status, headers, body bytes, seconds): the whole response read."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        t = time.perf_counter()
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            body = response.read()
            headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, headers, body, time.perf_counter() - t
        finally:
            conn.close()

    def scrape(self):
        return self.get("/metrics")[2].decode()

    def values(self, prefixes, text=None):
        """Sum of the samples whose line starts with each prefix."""
        text = text if text is not None else self.scrape()
        sums = {p: 0.0 for p in prefixes}
        for line in text.splitlines():
            if line.startswith("onsip_"):
                for p in prefixes:
                    if line.startswith(p):
                        sums[p] += float(line.rsplit(" ", 1)[1])
        return sums

    def wait_until(self, predicate, timeout, every=0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited; see {self.log_path}")
            try:
                if predicate():
                    return time.monotonic()
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(every)
        raise RuntimeError(f"timed out; see {self.log_path}")

    def events(self, text=None):
        v = self.values(['onsip_pubsub_events_total{kind="publish"}',
                         'onsip_pubsub_events_total{kind="retract"}'], text)
        return sum(v.values())

    def last_event(self, text=None):
        """`onsip_last_event_timestamp_seconds`: when the exporter applied
        its last event (Unix seconds, the machine's clock)."""
        key = "onsip_last_event_timestamp_seconds "
        return self.values([key], text)[key]

    def devices(self, text=None):
        return self.values(["onsip_domain_devices{"], text)["onsip_domain_devices{"]

    def rss_mb(self, field="VmRSS"):
        return rss_kb(self.proc.pid, field) / 1024

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def is_up(exporter):
    return 'onsip_up 1' in exporter.scrape().splitlines()


def record(figure, target, measured, note=""):
    TARGETS.append((figure, target, measured, note))
    log(f"{figure}: {measured} (target {target}) {note}")


def prometheus_check(exporter, workdir, series_expected):
    """A real Prometheus scrapes the exporter (it asks for OpenMetrics)."""
    binary = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if not binary:
        record("Prometheus parses /metrics (OpenMetrics)", "parses", "prometheus not installed: not checked")
        return
    port = free_port()
    pdir = tempfile.mkdtemp(dir=workdir, prefix="prometheus-")
    with open(os.path.join(pdir, "prometheus.yml"), "w") as f:
        f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                "scrape_configs:\n  - job_name: exporter\n    static_configs:\n"
                f"      - targets: ['127.0.0.1:{exporter.port}']\n")
    proc = subprocess.Popen(
        [binary, f"--config.file={pdir}/prometheus.yml", f"--storage.tsdb.path={pdir}/data",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=open(os.path.join(pdir, "log"), "w"), stderr=subprocess.STDOUT)
    try:
        def query(expr):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/v1/query?query=" + expr)
            data = json.loads(conn.getresponse().read())
            conn.close()
            return data["data"]["result"]
        deadline = time.monotonic() + 60
        result = None
        while time.monotonic() < deadline:
            try:
                up = query("up")
                if up and up[0]["value"][1] == "1":
                    result = query("scrape_samples_scraped")
                    break
                if up and up[0]["value"][1] == "0":
                    targets = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    targets.request("GET", "/api/v1/targets")
                    raise RuntimeError(f"Prometheus cannot scrape: {targets.getresponse().read()[:600]!r}")
            except (OSError, http.client.HTTPException, KeyError, ValueError):
                pass
            time.sleep(0.5)
        if result is None:
            raise RuntimeError("Prometheus did not scrape the exporter within 60 s")
        samples = int(float(result[0]["value"][1]))
        record("Prometheus parses /metrics (OpenMetrics)", "parses",
               f"up=1, {samples} samples (text has {series_expected})")
    finally:
        proc.terminate()
        proc.wait()


def phase_small(binary, workdir, args):
    log("phase small: 1,000 addresses")
    sim = Simulator(binary, 1000, 10, workdir)
    exporter = Exporter(binary, sim.info, sim.info["xmpp_address"], workdir, "small")
    try:
        exporter.wait_until(lambda: is_up(exporter), 60)
        sim.wait_for("exporter subscribed", 30)
        sim.wait_for("done", 30)
        time.sleep(3)
        record("Idle RSS (connected, 1,000 addresses, no events)", "<= 15 MB",
               f"{exporter.rss_mb():.1f} MB")
        before = exporter.events()
        t0 = time.monotonic()
        report = sim.load(f"--load.rate {args.latency_rate} --load.churn 0.1 "
                          f"--load.duration {args.latency_duration}s --load.devices-per-address 2 "
                          f"--probe.metrics-url http://127.0.0.1:{exporter.port}/metrics "
                          f"--probe.interval 50ms")
        exporter.wait_until(lambda: exporter.events() >= before + report["events"], 30)
        lat = report.get("latency_ms", {})
        record(f"Event to /metrics latency at {args.latency_rate} events/s (1,000 addresses)",
               "p99 <= 100 ms",
               f"p50 {lat.get('p50', 0):.1f} ms, p99 {lat.get('p99', 0):.1f} ms, "
               f"max {lat.get('max', 0):.1f} ms (n={lat.get('n', 0)})",
               f"simulator sent {report['events_per_second']:.0f} events/s; all {report['events']} applied")
        record("RSS after that load (1,000 addresses)", "-", f"{exporter.rss_mb():.1f} MB")
        text = exporter.scrape()
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        prometheus_check(exporter, workdir, series)
    finally:
        exporter.stop()
        sim.stop()


def phase_fleet(binary, workdir, args, state_file):
    log(f"phase fleet: {args.addresses} addresses, {args.phones} phones")
    sim = Simulator(binary, args.addresses, 50, workdir)
    extra = ["--state.file", state_file] if state_file else []
    exporter = Exporter(binary, sim.info, sim.info["xmpp_address"], workdir, "fleet", extra)
    try:
        t_up = exporter.wait_until(lambda: is_up(exporter), 300, every=0.5)
        record(f"Start-up to onsip_up 1 ({args.addresses} addresses authorized, empty state)", "-",
               f"{t_up - exporter.started:.2f} s")
        sim.wait_for("exporter subscribed", 60)
        sim.wait_for("done", 60)
        record(f"RSS at {args.addresses} addresses authorized, no devices yet", "-",
               f"{exporter.rss_mb():.0f} MB, peak {exporter.rss_mb('VmHWM'):.0f} MB")
        before = exporter.events()
        t0 = time.time()
        sim.load(f"--load.phones {args.phones} --load.duration 0s", timeout=900)
        exporter.wait_until(lambda: exporter.devices() >= args.phones, 900, every=2)
        text = exporter.scrape()
        applied = exporter.events(text) - before
        # From the command to the exporter applying the last event.
        record(f"Registrations of {args.phones} phones through XMPP into the state", ">= 50,000 events/s",
               f"{applied / (exporter.last_event(text) - t0):.0f} events/s",
               "a burst of new registrations")
        time.sleep(2)
        rss_loaded = exporter.rss_mb()
        # Scrapes: the first sizes the buffer; then timed, one after another.
        exporter.get("/metrics")
        times, size = [], 0
        for _ in range(args.scrapes):
            status, _, body, seconds = exporter.get("/metrics")
            assert status == 200
            times.append(seconds)
            size = len(body)
        record(f"/metrics at {args.addresses} addresses, {args.phones} devices (text, {size / 1e6:.1f} MB)",
               "p50 <= 150 ms, p99 <= 250 ms",
               f"p50 {pct(times, 0.5) * 1e3:.0f} ms, p99 {pct(times, 0.99) * 1e3:.0f} ms (n={len(times)})")
        om = [exporter.get("/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
              for _ in range(max(3, args.scrapes // 4))]
        assert om[-1][2].endswith(b"# EOF\n")
        record("/metrics, OpenMetrics", "p50 <= 150 ms",
               f"p50 {pct([o[3] for o in om], 0.5) * 1e3:.0f} ms")
        gz = [exporter.get("/metrics", {"Accept-Encoding": "gzip"})
              for _ in range(max(3, args.scrapes // 4))]
        assert gz[-1][1].get("content-encoding") == "gzip"
        unzipped = gzip.decompress(gz[-1][2])
        record("/metrics with gzip", "available",
               f"p50 {pct([g[3] for g in gz], 0.5) * 1e3:.0f} ms, {len(gz[-1][2]) / 1e6:.1f} MB "
               f"(of {len(unzipped) / 1e6:.1f} MB)")
        promtool = os.environ.get("PROMTOOL_BIN") or shutil.which("promtool")
        if promtool:
            check = subprocess.run([promtool, "check", "metrics"], input=unzipped,
                                   capture_output=True)
            record("promtool check metrics on a full scrape", "passes",
                   "passes" if check.returncode == 0 else
                   f"FAILS: {check.stdout[:300]!r} {check.stderr[:300]!r}")
        else:
            record("promtool check metrics on a full scrape", "passes", "promtool not installed: not checked")
        record(f"RSS at {args.addresses} addresses, {args.phones} devices", "<= 200 MB",
               f"{rss_loaded:.0f} MB before scrapes, {exporter.rss_mb():.0f} MB after, "
               f"peak {exporter.rss_mb('VmHWM'):.0f} MB")
        # Highest sustained rate: the simulator publishes as fast as the link
        # drains (back-pressure at 10,000 queued stanzas); the exporter's
        # counters say how many reached the state.
        e0, t0 = exporter.events(), time.time()
        report = sim.load(f"--load.rate 0 --load.churn 0.1 --load.duration {args.rate_duration}s "
                          f"--load.devices-per-address 1", timeout=args.rate_duration + 300)
        # Until the exporter has applied everything sent (plus the queue).
        exporter.wait_until(lambda: exporter.events() >= e0 + report["events"], 300, every=2)
        text = exporter.scrape()
        e1, t1 = exporter.events(text), exporter.last_event(text)
        record("End to end through loopback XMPP into the state, sustained", ">= 50,000 events/s",
               f"{(e1 - e0) / (t1 - t0):.0f} events/s over {t1 - t0:.0f} s",
               f"simulator published {report['events_per_second']:.0f}/s, "
               f"{report['backpressure_waits']} back-pressure pauses")
        record(f"RSS after the sustained load ({exporter.devices(text):.0f} devices)", "<= 200 MB",
               f"{exporter.rss_mb():.0f} MB, peak {exporter.rss_mb('VmHWM'):.0f} MB")
    finally:
        exporter.stop()
        sim.stop()


def phase_start(binary, workdir, state_file):
    if not state_file or not os.path.exists(state_file):
        record("Start-up with a 100,000-address state file", "<= 1 s to ready, state loaded",
               "pending: the exporter has no --state.file yet" if not state_file else
               "no state file was written")
        return
    size = os.path.getsize(state_file)
    info = {"jid": "bench@sim.onsip.test", "xmpp_password": "x", "auth_password": "x",
            "auth_jid": "commands.auth.sim.onsip.test",
            "pubsub_jid": "pubsub.user-agents.sim.onsip.test",
            "sip_address": "user0@domain0.sim.test"}
    # No XMPP server at all: only loading the state counts.
    exporter = Exporter(binary, info, f"127.0.0.1:{free_port()}", workdir, "restart",
                        ["--state.file", state_file])
    try:
        def ready():
            return exporter.get("/readyz", timeout=5)[0] == 200
        t_ready = exporter.wait_until(ready, 60, every=0.005)
        devices = exporter.devices()
        record(f"Start-up with the state file ({size / 1e6:.1f} MB)", "<= 1 s to ready, state loaded",
               f"{t_ready - exporter.started:.2f} s to /readyz 200, {devices:.0f} devices on /metrics",
               f"RSS {exporter.rss_mb():.0f} MB")
    finally:
        exporter.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", required=True, help="the onsip-ua-exporter binary")
    parser.add_argument("--addresses", type=int, default=100_000)
    parser.add_argument("--phones", type=int, default=150_000)
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--rate-duration", type=int, default=20)
    parser.add_argument("--latency-rate", type=int, default=10_000)
    parser.add_argument("--latency-duration", type=int, default=20)
    parser.add_argument("--phases", default="small,fleet,start")
    args = parser.parse_args()
    phases = args.phases.split(",")
    workdir = tempfile.mkdtemp(prefix="bench-fleet-")
    log(f"logs in {workdir}")
    help_text = subprocess.run([args.bin, "--help"], capture_output=True, text=True).stdout
    state_file = os.path.join(workdir, "state.json") if "--state.file" in help_text else None
    failed = False
    try:
        if "small" in phases:
            phase_small(args.bin, workdir, args)
        if "fleet" in phases:
            phase_fleet(args.bin, workdir, args, state_file)
        if "start" in phases:
            phase_start(args.bin, workdir, state_file)
    except Exception as err:  # report what was measured, then fail
        log(f"FAILED: {err!r}")
        failed = True
    print()
    print("| figure | target | measured | note |")
    print("|---|---|---|---|")
    for figure, target, measured, note in TARGETS:
        print(f"| {figure} | {target} | {measured} | {note} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
