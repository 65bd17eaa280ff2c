#!/usr/bin/python3
"""End-to-end throughput, latency and memory of sendguard, side by side
with the references, in one run on loopback.

For each message size (2 KiB, 64 KiB) and each session mode (a new SMTP
session per message, or sessions reused with smtp-source -d), with 20
parallel sessions, it measures:

  1  smtp-source -> smtp-sink                      (the machine's SMTP limit)
  2  smtp-source -> sendguard proxy, scanners off -> smtp-sink
  3  smtp-source -> sendguard proxy, clamd + built-in rules -> smtp-sink
  3r smtp-source -> sendguard proxy, rspamd only -> smtp-sink (--no-rspamd
     leaves it out)
  4  smtp-source -> Postfix relaying, no milter -> smtp-sink
  5  smtp-source -> Postfix + sendguard milter (clamd + rules) -> smtp-sink
  5u the same with the milter on a unix socket
  2R row 2 with the Redis store (redis-server with appendfsync always)
  6  clamd INSTREAM on the same message (examples/loadgen.rs, 20 connections)

Every row is run --reps times, interleaved (rows 1..6, then again), and
the median rate is reported with sendguard's CPU seconds and peak RSS
during the run. Latency p50/p99 comes from examples/loadgen.rs at a fixed
rate: half of row 2's rate, or half the row's own rate when that is lower.
Memory: RSS per tracked mailbox with 1 000 000 mailboxes (each with a
strike), and sendguard's RSS with 10 000 idle connections.

Every process it starts listens on 127.0.0.1 only, and is stopped at the
end. Runs are bounded by message count and by a timeout. Run it with
benches/e2e.sh, which installs the packages and builds the binaries.
"""

import argparse
import atexit
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SENDGUARD = REPO / "target/release/sendguard"
LOADGEN = REPO / "target/release/examples/loadgen"
SESSIONS = 20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Time limit of one smtp-source or loadgen run, in seconds.
RUN_TIMEOUT = 180
# File descriptors for the 10 000 idle connections on both ends.
IDLE_CONNECTIONS = 10_000
TRACKED_MAILBOXES = 1_000_000
# Share of the machine that other work may take during a run before the
# targets that use the run are marked as not reliable.
NOISY = 0.10
# [smtp] worker_threads of every sendguard started; set from --worker-threads.
WORKER_THREADS = 0


def log(message):
    print(f"e2e: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


class Processes:
    """The processes this script started, stopped at exit."""

    def __init__(self):
        self.children = []
        self.postfix_dirs = []
        atexit.register(self.stop_all)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    def start(self, name, command, log_path, **options):
        log_file = open(log_path, "wb")
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **options,
        )
        self.children.append((name, child))
        return child

    def stop(self, child):
        if child.poll() is None:
            # Each child leads its own process group, which contains its
            # workers (rspamd) too.
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(10)

    def stop_all(self):
        for directory in self.postfix_dirs:
            postfix_command(directory, "stop", check=False)
            master = postfix_master_pid(directory)
            if master is not None and Path(f"/proc/{master}").exists():
                os.kill(master, signal.SIGTERM)
        self.postfix_dirs.clear()
        for _, child in reversed(self.children):
            try:
                self.stop(child)
            except (ProcessLookupError, PermissionError):
                pass
        self.children.clear()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(check, seconds, description, child=None, log_path=None):
    deadline = time.monotonic() + seconds
    while not check():
        if child is not None and child.poll() is not None:
            raise SystemExit(f"{description} exited with {child.returncode}:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{description} was not ready after {seconds} s:\n{tail(log_path)}")
        time.sleep(0.1)


def tail(path, lines=30):
    if path is None or not Path(path).exists():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def greets(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
            return connection.recv(4).startswith(b"220")
    except OSError:
        return False


def listens(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def replies(port, request, expected):
    """Returns whether the server on `port` replies to `request` with bytes
    that contain `expected`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
            connection.sendall(request)
            return expected in connection.recv(4096)
    except OSError:
        return False


# ---------------------------------------------------------------- services


def start_smtp_sink(processes, work, port):
    log_path = work / "smtp-sink.log"
    # smtp-sink refuses to run as root; -u names the user it switches to.
    user = ["-u", "postfix"] if os.getuid() == 0 else []
    child = processes.start(
        "smtp-sink", ["smtp-sink", *user, f"127.0.0.1:{port}", "1024"], log_path
    )
    wait_until(lambda: greets(port), 20, "smtp-sink", child, log_path)
    return child


def start_clamd(processes, work, port):
    directory = work / "clamd"
    (directory / "db").mkdir(parents=True)
    (directory / "tmp").mkdir()
    for signature in (REPO / "fixtures/clamd").glob("*.ndb"):
        shutil.copy(signature, directory / "db")
    config = directory / "clamd.conf"
    config.write_text(
        "Foreground yes\n"
        f"DatabaseDirectory {directory / 'db'}\n"
        f"TemporaryDirectory {directory / 'tmp'}\n"
        f"TCPSocket {port}\nTCPAddr 127.0.0.1\n"
        "StreamMaxLength 25M\nAlertExceedsMax yes\n"
    )
    log_path = directory / "clamd.log"
    child = processes.start("clamd", ["clamd", "-c", str(config)], log_path)
    wait_until(lambda: replies(port, b"zPING\0", b"PONG"), 60, "clamd", child, log_path)
    return child


def start_redis(processes, work, port):
    """Starts redis-server with the durability docs/redis-store.md recommends:
    an append-only file written with fsync on every write."""
    directory = work / "redis"
    directory.mkdir()
    log_path = directory / "redis.log"
    child = processes.start("redis", [
        "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory),
        "--save", "", "--appendonly", "yes", "--appendfsync", "always",
    ], log_path)
    wait_until(lambda: replies(port, b"PING\r\n", b"+PONG"), 30, "redis-server", child, log_path)
    return child


def start_rspamd(processes, work, port):
    directory = work / "rspamd"
    for name in ("db", "run", "log"):
        (directory / name).mkdir(parents=True)

    # The DNS server that refuses every query keeps rspamd off the network.
    dns_log = directory / "dns.log"
    dns = processes.start(
        "refuse-dns",
        ["perl", str(REPO / "scripts/lib/refuse-dns.pl")],
        dns_log,
    )
    wait_until(lambda: dns_log.stat().st_size > 0, 10, "refuse-dns.pl", dns, dns_log)
    dns_port = int(dns_log.read_text().split()[0])

    cache = REPO / "target/tmp/rspamd-hs-cache"
    cache.mkdir(parents=True, exist_ok=True)
    user = ["-u", "root", "-g", "root", "-i"] if os.getuid() == 0 else []
    command = [
        "rspamd", "-f", "-c", "/etc/rspamd/rspamd.conf", *user,
        f"--var=LOCAL_CONFDIR={REPO / 'fixtures/rspamd'}",
        f"--var=DBDIR={directory / 'db'}",
        f"--var=RUNDIR={directory / 'run'}",
        f"--var=LOGDIR={directory / 'log'}",
        f"--var=SENDGUARD_HS_CACHE={cache}",
        f"--var=SENDGUARD_RSPAMD_PORT={port}",
        f"--var=SENDGUARD_DNS_PORT={dns_port}",
    ]
    log_path = directory / "rspamd.log"
    child = processes.start("rspamd", command, log_path)
    # The first start compiles the Hyperscan databases (about 9 s).
    wait_until(lambda: replies(port, b"GET /ping HTTP/1.0\r\n\r\n", b"pong"), 180, "rspamd", child, log_path)
    return child


def raise_file_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = 3 * IDLE_CONNECTIONS
    if hard != resource.RLIM_INFINITY:
        limit = min(hard, limit)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit), hard))


def start_sendguard(processes, work, name, upstream_port, scan, smtp_extra="", extra="", store_extra=""):
    directory = work / name
    directory.mkdir()
    port = free_port()
    config = directory / "sendguard.toml"
    config.write_text(
        "[smtp]\n"
        f'listen = "127.0.0.1:{port}"\n'
        'hostname = "sendguard.bench"\n'
        'relay_networks = ["127.0.0.0/8"]\n'
        f"worker_threads = {WORKER_THREADS}\n"
        f"{smtp_extra}\n"
        "[upstream]\n"
        f'address = "127.0.0.1:{upstream_port}"\n'
        'tls = "none"\n'
        "[store]\n"
                f'path = "{directory / "sendguard.db"}"\n'
        f"{store_extra}\n"
        f"{scan}\n{extra}\n"
    )
    log_path = directory / "sendguard.log"
    child = processes.start(
        name,
        [str(SENDGUARD), "serve", "--config", str(config)],
        log_path,
        preexec_fn=raise_file_limit,
    )
    wait_until(
        lambda: "sendguard started" in log_path.read_text(errors="replace"),
        60, name, child, log_path,
    )
    return child, port


def postfix_command(directory, action, check=True):
    # Postfix prints its errors only to a terminal, so it runs under script(1).
    result = subprocess.run(
        ["script", "-qec", f"postfix -c {directory / 'etc'} {action}", "/dev/null"],
        capture_output=True, text=True, timeout=120,
    )
    if check and result.returncode != 0:
        raise SystemExit(
            f"postfix {action} failed:\n{result.stdout}{tail(directory / 'maillog')}"
        )


def start_postfix(processes, work, name, relay_port, main_cf_extra=""):
    directory = work / name
    for sub in ("etc", "queue", "data"):
        (directory / sub).mkdir(parents=True)
    directory.chmod(0o755)
    shutil.chown(directory / "data", "postfix", "postfix")

    port = free_port()
    (directory / "etc/main.cf").write_text(
        "compatibility_level = 3.6\n"
        f"queue_directory = {directory / 'queue'}\n"
        f"data_directory = {directory / 'data'}\n"
        "mail_owner = postfix\nsetgid_group = postdrop\n"
        "myhostname = postfix.bench\nmydomain = bench\nmydestination =\n"
        "inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n"
        "mynetworks = 127.0.0.0/8\n"
        "smtpd_relay_restrictions = permit_mynetworks, reject\n"
        f"relayhost = [127.0.0.1]:{relay_port}\n"
        "smtp_dns_support_level = disabled\nsmtpd_peername_lookup = no\n"
        "disable_dns_lookups = yes\n"
        "smtp_tls_security_level = none\nsmtpd_tls_security_level = none\n"
        "alias_maps =\nalias_database =\nbiff = no\n"
        f"maillog_file = {directory / 'maillog'}\n"
        f"maillog_file_prefixes = {directory}\n"
        f"{main_cf_extra}\n"
    )
    master = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        if line.startswith("smtp      inet"):
            line = f"127.0.0.1:{port}      inet  n       -       n       -       -       smtpd"
        master.append(line)
    if not any("postlogd" in line for line in master):
        master.append("postlog   unix-dgram n  -       n       -       1       postlogd")
    (directory / "etc/master.cf").write_text("\n".join(master) + "\n")

    postfix_command(directory, "start")
    processes.postfix_dirs.append(directory)
    wait_until(lambda: greets(port), 60, f"Postfix {name}", None, directory / "maillog")
    return directory, port


def postfix_queue_size(directory):
    count = 0
    for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
        for _, _, files in os.walk(directory / "queue" / sub):
            count += len(files)
    return count


def postfix_master_pid(directory):
    try:
        return int((directory / "queue/pid/master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------- messages


PROSE = (
    "The quarterly figures are attached as agreed in last week's meeting. "
    "Please check the totals for the northern region before Friday, since "
    "the auditors asked for the reconciled numbers and the notes on the two "
    "late invoices. Thanks for the quick turnaround on the supplier list."
)


def write_message(path, size):
    """Writes a plain message of about `size` bytes with LF line endings: a
    text body for small sizes, text plus a base64 CSV attachment above
    8 KiB."""
    header = (
        "From: Alice Example <alice@example.org>\n"
        "To: Bob Example <bob@example.net>\n"
        "Subject: Quarterly figures\n"
        "Date: Mon, 02 Dec 2024 10:15:00 +0000\n"
        "Message-ID: <bench.20241202101500@example.org>\n"
        "MIME-Version: 1.0\n"
    )
    words = PROSE.split()
    text_lines = []
    line = ""
    for index in range(4000):
        word = words[index % len(words)]
        if len(line) + len(word) + 1 > 72:
            text_lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    if size <= 8192:
        message = header + "Content-Type: text/plain; charset=us-ascii\n\n"
        for text_line in text_lines:
            if len(message) + len(text_line) + 1 > size:
                break
            message += text_line + "\n"
    else:
        boundary = "bench-boundary-7f3a"
        message = (
            header
            + f'Content-Type: multipart/mixed; boundary="{boundary}"\n\n'
            + f"--{boundary}\nContent-Type: text/plain; charset=us-ascii\n\n"
            + "\n".join(text_lines[:12]) + "\n\n"
            + f"--{boundary}\nContent-Type: text/csv; name=figures.csv\n"
            + "Content-Disposition: attachment; filename=figures.csv\n"
            + "Content-Transfer-Encoding: base64\n\n"
        )
        closing = f"\n--{boundary}--\n"
        generator = random.Random(20241202)
        room = size - len(message) - len(closing)
        # base64 lines of 76 characters carry 57 bytes each.
        csv_bytes = (room // 77) * 57
        rows = []
        while sum(len(row) for row in rows) < csv_bytes:
            rows.append(
                f"{len(rows)},region-{generator.randint(1, 9)},"
                f"{generator.randint(100, 99999)}.{generator.randint(0, 99):02d}\n"
            )
        import base64

        encoded = base64.encodebytes("".join(rows).encode()[:csv_bytes]).decode()
        message += encoded + closing
    path.write_text(message)
    return len(message.encode())


# ---------------------------------------------------------------- accounting


def process_cpu(pid, with_children=False):
    """CPU seconds (user + system) of a live process and its threads, and
    with `with_children` also of its children that exited and were waited
    for, such as Postfix's recycled smtpd processes."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        if with_children:
            ticks += int(fields[13]) + int(fields[14])
        return ticks / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def process_parents():
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def descendants(roots):
    parents = process_parents()
    ours = set(root for root in roots if root in parents)
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                changed = True
    return ours


def machine_busy_seconds():
    """CPU seconds the machine spent in processes: user, nice, system and
    steal. Interrupt and softirq time is left out, because the kernel's
    loopback network work lands there without being charged to the
    process that caused it, so it cannot be told apart from other work."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + steal) / CLOCK_TICKS


def load_average():
    return float(Path("/proc/loadavg").read_text().split()[0])


class ForeignLoad:
    """Measures how much CPU processes other than this benchmark's used
    during a run: the machine's busy time minus the CPU of this script's
    process tree and of its Postfix instances, each with its children that
    exited during the run. Also keeps the CPU of each named service, so that
    a service busy outside its own row shows up."""

    def __init__(self, roots_callback, services_callback):
        self.roots_callback = roots_callback
        self.services_callback = services_callback

    def tree_cpu(self, root):
        return sum(process_cpu(pid, True) for pid in descendants([root]))

    def begin(self):
        self.started = time.monotonic()
        self.busy = machine_busy_seconds()
        self.ours = {pid: process_cpu(pid, True) for pid in descendants(self.roots_callback())}
        self.services = {name: self.tree_cpu(pid) for name, pid in self.services_callback().items()}

    def end(self):
        """Returns the share of the machine that other processes used, and
        the CPU seconds of each service."""
        elapsed = time.monotonic() - self.started
        busy = machine_busy_seconds() - self.busy
        ours_now = {pid: process_cpu(pid, True) for pid in descendants(self.roots_callback())}
        ours = sum(cpu - self.ours.get(pid, 0.0) for pid, cpu in ours_now.items())
        foreign = max(0.0, busy - ours)
        services = {
            name: round(self.tree_cpu(pid) - self.services.get(name, 0.0), 3)
            for name, pid in self.services_callback().items()
        }
        return foreign / (elapsed * os.cpu_count()), services


def peak_rss_reset(pid):
    # Writing 5 to clear_refs resets VmHWM, the peak resident set size
    # (Linux 4.0 and later).
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def status_kib(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------- runs


def smtp_source(port, message_file, count, reuse):
    command = [
        "smtp-source", "-s", str(SESSIONS), "-m", str(count),
        "-F", str(message_file), "-M", "loadgen.bench",
        "-f", "alice@example.org", "-t", "bob@example.net",
    ]
    if reuse:
        command.append("-d")
    command.append(f"127.0.0.1:{port}")
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    elapsed = time.monotonic() - started
    # smtp-source stops at the first unexpected reply, with a message on
    # standard error.
    if result.returncode != 0 or result.stderr.strip():
        raise RuntimeError(
            f"smtp-source to port {port} failed ({result.returncode}): {result.stderr.strip()[:500]}"
        )
    return elapsed


def loadgen(mode, *arguments):
    result = subprocess.run(
        [str(LOADGEN), mode, *map(str, arguments)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    if result.returncode != 0:
        raise RuntimeError(f"loadgen {mode} failed: {result.stderr.strip()[:500]}")
    return json.loads(result.stdout)


class Row:
    def __init__(self, key, label, port=None, sendguard=None, postfix=None, clamd_port=None):
        self.key = key
        self.label = label
        self.port = port
        self.sendguard = sendguard
        self.postfix = postfix
        self.clamd_port = clamd_port


def run_once(row, message_file, count, reuse, foreign):
    """Runs one bounded measurement of `row`; returns its figures."""
    pid = row.sendguard.pid if row.sendguard else None
    if pid:
        peak_rss_reset(pid)
        cpu_before = process_cpu(pid)
    foreign.begin()
    load_before = load_average()
    if row.clamd_port:
        outcome = loadgen(
            "clamd", "--target", f"127.0.0.1:{row.clamd_port}", "--message", message_file,
            "--count", count, "--concurrency", SESSIONS, "--sessions", "1",
        )
        elapsed = outcome["seconds"]
        delivered_elapsed = elapsed
    else:
        elapsed = smtp_source(row.port, message_file, count, reuse)
        delivered_elapsed = elapsed
        if row.postfix:
            # Postfix replies 250 once the message is in its queue, so the
            # run ends when the queue is empty again.
            started = time.monotonic() - elapsed
            wait_until(lambda: postfix_queue_size(row.postfix) == 0, 120,
                       f"{row.label}: queue drain")
            delivered_elapsed = time.monotonic() - started
    foreign_share, services = foreign.end()
    figures = {
        "count": count,
        "seconds": elapsed,
        "rate": count / elapsed,
        "delivered_rate": count / delivered_elapsed,
        "foreign_cpu": foreign_share,
        "cpu_by_service": services,
        "load_before": load_before,
    }
    if pid:
        figures["cpu"] = process_cpu(pid) - cpu_before
        figures["peak_rss_kib"] = status_kib(pid, "VmHWM")
    return figures


def latency_once(row, message_file, rate, seconds):
    count = max(100, min(20_000, int(rate * seconds)))
    return loadgen(
        "latency", "--target", f"127.0.0.1:{row.port}", "--message", message_file,
        "--rate", f"{rate:.1f}", "--count", count, "--concurrency", SESSIONS,
    )


def median(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- report


def format_number(value, digits=0):
    if value is None:
        return "-"
    return f"{value:,.{digits}f}".replace(",", " ")


def table(results):
    lines = []
    for scenario in results["scenarios"]:
        lines.append("")
        lines.append(f"### {scenario['title']}")
        lines.append("")
        lines.append(
            "| row | configuration | msg/s | × row 1 | × row 4 | delivered msg/s "
            "| sendguard CPU s | CPU µs/msg | peak RSS MiB | p50 ms | p99 ms | other CPU |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        direct = scenario["rows"].get("1", {}).get("rate")
        postfix = scenario["rows"].get("4", {}).get("rate")
        for key, row in scenario["rows"].items():
            rate = row.get("rate")
            cpu = row.get("cpu")
            per_message = None
            if cpu is not None and row.get("count"):
                per_message = cpu / row["count"] * 1e6
            rss = row.get("peak_rss_kib")
            lines.append(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                    key,
                    row["label"],
                    format_number(rate),
                    format_number(rate / direct if rate and direct else None, 2),
                    format_number(rate / postfix if rate and postfix else None, 2),
                    format_number(row.get("delivered_rate")),
                    format_number(cpu, 2),
                    format_number(per_message),
                    format_number(rss / 1024 if rss else None, 1),
                    format_number(row.get("p50_ms"), 2),
                    format_number(row.get("p99_ms"), 2),
                    "{:.0%}".format(row["foreign_cpu"]) if row.get("foreign_cpu") is not None else "-",
                )
            )
        if scenario.get("latency_rate"):
            lines.append("")
            lines.append(
                f"Latency offered at {format_number(scenario['latency_rate'])} msg/s "
                "(half of row 2's rate; rows 4 to 5u at half their own rate when lower)."
            )
        quarter = scenario.get("quarter_rate")
        if quarter:
            lines.append(
                f"At a quarter of row 2's rate ({format_number(quarter['rate'])} msg/s): "
                f"row 1 p50 {quarter['rows']['1']['p50_ms']:.2f} ms, p99 {quarter['rows']['1']['p99_ms']:.2f} ms; "
                f"row 2 p50 {quarter['rows']['2']['p50_ms']:.2f} ms, p99 {quarter['rows']['2']['p99_ms']:.2f} ms; "
                f"p99 added by the proxy {quarter['added_p99_ms']:.2f} ms."
            )
    return "\n".join(lines)


def targets(results):
    """Checks the targets that the end-to-end figures decide."""
    checks = []
    for scenario in results["scenarios"]:
        rows = scenario["rows"]
        rate = lambda key: rows.get(key, {}).get("rate")
        direct, off, clamd_row, postfix, milter, milter_unix = (
            rate(k) for k in ("1", "2", "3", "4", "5", "5u"))
        clamd_rate = results["clamd_rate"].get(scenario["size_name"])
        title = scenario["title"]

        def noisy(keys):
            """Whether other work took more than NOISY of the machine in a run of these rows."""
            return any((rows.get(key, {}).get("foreign_cpu") or 0) > NOISY for key in keys)

        def check(name, value, goal, keys):
            if value is None or goal is None:
                checks.append((title, name, None, goal, None))
            else:
                checks.append((title, name, value, goal, (value >= goal, noisy(keys))))

        if direct and off:
            check("scanners off: × direct (goal 0.4)", off / direct, 0.4, ("1", "2"))
        if postfix and off:
            check("scanners off: × Postfix relaying (goal 2.5)", off / postfix, 2.5, ("2", "4"))
        if direct and clamd_row and clamd_rate:
            # Each message crosses one more SMTP hop (twice the direct
            # path's work) and one clamd scan, on the same cores.
            ceiling = 1 / (2 / direct + 1 / clamd_rate)
            check(f"clamd: × ceiling {ceiling:.0f} msg/s (goal 0.7)", clamd_row / ceiling, 0.7, ("1", "3", "6"))
        if postfix and clamd_row:
            check("clamd: × Postfix relaying (goal 1.5)", clamd_row / postfix, 1.5, ("3", "4"))
        if postfix and milter:
            check("milter: × Postfix without milter (goal 0.7)", milter / postfix, 0.7, ("4", "5"))
        if postfix and milter_unix:
            check("milter on a unix socket: × Postfix without milter (goal 0.7)", milter_unix / postfix, 0.7,
                  ("4", "5u"))
        added = scenario.get("added_p99_ms")
        if added is not None:
            checks.append((title, "p99 added by the proxy, scanners off (goal ≤ 1 ms)", added, 1.0,
                           (added <= 1.0, noisy(("1", "2")))))
        quarter = scenario.get("quarter_rate")
        if quarter:
            added = quarter["added_p99_ms"]
            checks.append((title, "p99 added by the proxy at a quarter of its rate (not a target)",
                           added, None, None))
    memory = results.get("memory", {})
    if "bytes_per_mailbox" in memory:
        value = memory["bytes_per_mailbox"]
        checks.append(("memory", "bytes per tracked mailbox (goal ≤ 256)", value, 256, (value <= 256, False)))
    if "bytes_per_locked_mailbox" in memory:
        value = memory["bytes_per_locked_mailbox"]
        checks.append(("memory", "bytes per locked-out mailbox (goal ≤ 256)", value, 256, (value <= 256, False)))
    if "idle_rss_mib" in memory:
        value = memory["idle_rss_mib"]
        checks.append(("memory", "RSS MiB with 10 000 idle connections (goal ≤ 256)", value, 256,
                       (value <= 256, False)))
    lines = ["| scenario | target | measured | met |", "|---|---|---:|---|"]
    for title, name, value, _, outcome in checks:
        if outcome is None:
            verdict = "-"
        else:
            met, unreliable = outcome
            verdict = "met" if met else "**missed**"
            if unreliable:
                verdict += f" (other work above {NOISY:.0%} of the machine: not reliable)"
        lines.append(f"| {title} | {name} | {format_number(value, 2)} | {verdict} |")
    return "\n".join(lines)


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plot

    scenarios = results["scenarios"]
    keys = []
    for scenario in scenarios:
        for key in scenario["rows"]:
            if key not in keys:
                keys.append(key)
    labels = {}
    for scenario in scenarios:
        for key, row in scenario["rows"].items():
            labels.setdefault(key, f"{key}: {row['label']}")
    figure, axes = plot.subplots(figsize=(11, 5.5))
    width = 0.8 / max(1, len(keys))
    for index, key in enumerate(keys):
        values = [scenario["rows"].get(key, {}).get("rate") or 0 for scenario in scenarios]
        positions = [position + (index - (len(keys) - 1) / 2) * width for position in range(len(scenarios))]
        axes.bar(positions, values, width, label=labels[key])
    axes.set_xticks(range(len(scenarios)))
    axes.set_xticklabels([scenario["title"] for scenario in scenarios], fontsize=8)
    axes.set_ylabel("messages/s (median)")
    axes.set_title(f"sendguard end to end, {os.cpu_count()} cores, {results['when']}", fontsize=10)
    axes.legend(fontsize=7)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def machine_description():
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    versions = {}
    for name, command in {
        "kernel": ["uname", "-r"],
        "postfix": ["postconf", "-d", "-h", "mail_version"],
        "clamd": ["clamd", "--version"],
    }.items():
        try:
            versions[name] = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout.strip()
        except OSError:
            versions[name] = "unknown"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / 1024 / 1024, 1),
        **versions,
    }


# ---------------------------------------------------------------- main


KNOWN_ROWS = ("1", "2", "2R", "3", "3r", "4", "5", "5u")
SIZES = {"2k": 2048, "64k": 65536}


def check_options(parser, options):
    """Refuses option values that would give a meaningless or failing run."""
    if options.replot:
        if not Path(options.replot).is_file():
            parser.error(f"--replot: {options.replot} is not a file; give the results.json of an earlier run")
        return
    if options.reps < 1:
        parser.error(f"--reps must be at least 1, not {options.reps}")
    if not options.seconds > 0:
        parser.error(f"--seconds must be above 0, not {options.seconds}")
    if options.worker_threads < 0:
        parser.error(f"--worker-threads must be 0 (one per core) or more, not {options.worker_threads}")
    for size in options.sizes.split(","):
        if size not in SIZES:
            parser.error(f"--sizes: unknown size {size!r}; use 2k, 64k or 2k,64k")
    for mode in options.modes.split(","):
        if mode not in ("new", "reused"):
            parser.error(f"--modes: unknown mode {mode!r}; use new, reused or new,reused")
    if options.rows:
        for row in options.rows.split(","):
            if row not in KNOWN_ROWS:
                parser.error(f"--rows: unknown row {row!r}; rows are {','.join(KNOWN_ROWS)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per row (median reported); default 3")
    parser.add_argument("--seconds", type=float, default=3.0, help="target length of one run in seconds; default 3")
    parser.add_argument("--sizes", default="2k,64k", help="message sizes: 2k, 64k or both; default 2k,64k")
    parser.add_argument("--modes", default="new,reused", help="session modes: new, reused or both")
    parser.add_argument("--no-rspamd", action="store_true", help="leave out row 3r, the proxy with rspamd")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--no-redis", action="store_true",
                        help="leave out row 2R, the proxy on the Redis store")
    parser.add_argument("--worker-threads", type=int, default=0,
                        help="[smtp] worker_threads of every sendguard; default 0, one per core")
    parser.add_argument("--rows", help="run only these rows, such as 1,2 (rows 1, 2 and 4 are the "
                        "references of the ratios); default all")
    parser.add_argument("--out", default=str(REPO / "target/e2e"), help="directory for results.json and table.md")
    parser.add_argument("--chart", default=str(REPO / "docs/benchmarks.png"), help="PNG chart to write")
    parser.add_argument("--replot", metavar="RESULTS", help="only draw the chart from a results.json of an earlier run")
    options = parser.parse_args()
    check_options(parser, options)
    global WORKER_THREADS
    WORKER_THREADS = options.worker_threads
    if options.replot:
        write_chart(json.loads(Path(options.replot).read_text()), options.chart)
        return

    for program in ("smtp-source", "smtp-sink", "clamd", "postfix", "script"):
        if shutil.which(program) is None:
            raise SystemExit(f"{program} is not installed; run benches/e2e.sh, which installs it")
    for binary in (SENDGUARD, LOADGEN):
        if not binary.exists():
            raise SystemExit(f"{binary} is missing; run benches/e2e.sh, which builds it")
    if os.getuid() != 0:
        raise SystemExit("run as root: private Postfix instances and smtp-sink need it")

    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sendguard-e2e-"))
    work.chmod(0o755)
    # atexit runs the last registered first: the processes must stop
    # before their directory goes, because "postfix stop" reads its
    # configuration there.
    atexit.register(lambda: shutil.rmtree(work, ignore_errors=True))
    processes = Processes()
    load_at_start = Path("/proc/loadavg").read_text().split()[:3]
    log(f"load average at start: {' '.join(load_at_start)}; work directory {work}")

    sizes = SIZES
    messages = {}
    for name in options.sizes.split(","):
        messages[name] = work / f"message-{name}.eml"
        write_message(messages[name], sizes[name])

    # Services.
    sink_port = free_port()
    sink = start_smtp_sink(processes, work, sink_port)
    clamd_port = free_port()
    clamd = start_clamd(processes, work, clamd_port)
    scan_off = "[scan.spam]\nenabled = false\n"
    scan_clamd = f'[scan.clamd]\naddress = "127.0.0.1:{clamd_port}"\n[scan.spam]\nenabled = true\n'
    proxy_off, proxy_off_port = start_sendguard(processes, work, "proxy-off", sink_port, scan_off)
    proxy_clamd, proxy_clamd_port = start_sendguard(processes, work, "proxy-clamd", sink_port, scan_clamd)
    milter_port = free_port()
    milter, _ = start_sendguard(
        processes, work, "milter", sink_port, scan_clamd,
        extra=f'[milter]\nlisten = "127.0.0.1:{milter_port}"\n',
    )
    wait_until(lambda: listens(milter_port), 30, "sendguard milter")
    # The same milter on a unix socket, where sendguard waives more replies.
    milter_socket = work / "milter-unix.sock"
    milter_unix, _ = start_sendguard(
        processes, work, "milter-unix", sink_port, scan_clamd,
        extra=f'[milter]\nlisten = "{milter_socket}"\n',
    )
    wait_until(milter_socket.exists, 30, "sendguard milter on a unix socket")
    # Postfix's smtpd connects as the user postfix.
    milter_socket.chmod(0o666)
    postfix_plain, postfix_plain_port = start_postfix(processes, work, "postfix-plain", sink_port)
    postfix_milter, postfix_milter_port = start_postfix(
        processes, work, "postfix-milter", sink_port,
        f"smtpd_milters = inet:127.0.0.1:{milter_port}\n"
        "milter_protocol = 6\nmilter_default_action = tempfail\n",
    )
    postfix_milter_unix, postfix_milter_unix_port = start_postfix(
        processes, work, "postfix-milter-unix", sink_port,
        f"smtpd_milters = unix:{milter_socket}\n"
        "milter_protocol = 6\nmilter_default_action = tempfail\n",
    )

    rows = [
        Row("1", "smtp-source → smtp-sink", port=sink_port),
        Row("2", "sendguard proxy, scanners off", port=proxy_off_port, sendguard=proxy_off),
        Row("3", "sendguard proxy, clamd + rules", port=proxy_clamd_port, sendguard=proxy_clamd),
    ]
    if not options.no_rspamd:
        rspamd_port = free_port()
        rspamd = start_rspamd(processes, work, rspamd_port)
        scan_rspamd = f'[scan.spam]\nenabled = false\n[scan.rspamd]\naddress = "127.0.0.1:{rspamd_port}"\n'
        proxy_rspamd, proxy_rspamd_port = start_sendguard(processes, work, "proxy-rspamd", sink_port, scan_rspamd)
        rows.append(Row("3r", "sendguard proxy, rspamd only", port=proxy_rspamd_port, sendguard=proxy_rspamd))
    if not options.no_redis:
        redis_port = free_port()
        redis = start_redis(processes, work, redis_port)
        proxy_redis, proxy_redis_port = start_sendguard(
            processes, work, "proxy-redis", sink_port, scan_off,
            store_extra=f'backend = "redis"\nurl = "redis://127.0.0.1:{redis_port}"\n',
        )
        rows.append(Row("2R", "sendguard proxy, scanners off, Redis store", port=proxy_redis_port,
                        sendguard=proxy_redis))
    rows += [
        Row("4", "Postfix relaying, no milter", port=postfix_plain_port, postfix=postfix_plain),
        Row("5", "Postfix + sendguard milter (clamd + rules)", port=postfix_milter_port,
            postfix=postfix_milter, sendguard=milter),
        Row("5u", "the same, milter on a unix socket", port=postfix_milter_unix_port,
            postfix=postfix_milter_unix, sendguard=milter_unix),
    ]

    if options.rows:
        wanted = options.rows.split(",")
        rows = [row for row in rows if row.key in wanted]

    def roots():
        pids = [os.getpid()]
        for directory in (postfix_plain, postfix_milter, postfix_milter_unix):
            master = postfix_master_pid(directory)
            if master:
                pids.append(master)
        return pids

    services = {"smtp-sink": sink.pid, "clamd": clamd.pid, "proxy-off": proxy_off.pid,
                "proxy-clamd": proxy_clamd.pid, "milter": milter.pid,
                "milter-unix": milter_unix.pid}
    if not options.no_rspamd:
        services.update({"rspamd": rspamd.pid, "proxy-rspamd": proxy_rspamd.pid})
    if not options.no_redis:
        services.update({"redis": redis.pid, "proxy-redis": proxy_redis.pid})

    def service_roots():
        named = dict(services)
        for name, directory in (("postfix-plain", postfix_plain), ("postfix-milter", postfix_milter),
                                ("postfix-milter-unix", postfix_milter_unix)):
            master = postfix_master_pid(directory)
            if master:
                named[name] = master
        return named

    foreign = ForeignLoad(roots, service_roots)
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_description(),
        "load_at_start": load_at_start,
        "options": vars(options),
        "scenarios": [],
        "clamd_rate": {},
    }

    # clamd's own rate, once per message size.
    clamd_row = Row("6", "clamd INSTREAM, direct client", clamd_port=clamd_port)
    for size_name, message_file in messages.items():
        calibration = run_once(clamd_row, message_file, 500, False, foreign)
        count = max(200, min(50_000, int(calibration["rate"] * options.seconds)))
        runs = [run_once(clamd_row, message_file, count, False, foreign) for _ in range(options.reps)]
        results["clamd_rate"][size_name] = median(run["rate"] for run in runs)
        results[f"clamd_runs_{size_name}"] = runs
        log(f"clamd {size_name}: {results['clamd_rate'][size_name]:.0f} scans/s")

    for size_name, message_file in messages.items():
        for mode in options.modes.split(","):
            reuse = mode == "reused"
            title = f"{size_name.upper().replace('K', ' KiB')}, " + (
                "reused sessions" if reuse else "new session per message"
            )
            log(f"scenario: {title}")
            counts = {}
            for row in rows:
                try:
                    calibration = run_once(row, message_file, 200 if row.postfix else 500, reuse, foreign)
                except RuntimeError as error:
                    # A row that fails (smtp-source stops at the first
                    # unexpected reply) is reported empty; the others go on.
                    log(f"  row {row.key} failed its calibration run: {error}")
                    counts[row.key] = None
                    continue
                counts[row.key] = max(200, min(30_000, int(calibration["rate"] * options.seconds)))
            runs = {row.key: [] for row in rows}
            for repetition in range(options.reps):
                for row in rows:
                    if counts[row.key] is None:
                        continue
                    try:
                        figures = run_once(row, message_file, counts[row.key], reuse, foreign)
                    except RuntimeError as error:
                        log(f"  rep {repetition + 1} row {row.key} failed: {error}")
                        continue
                    runs[row.key].append(figures)
                    busiest = sorted(figures["cpu_by_service"].items(), key=lambda item: -item[1])[:4]
                    log(f"  rep {repetition + 1} row {row.key}: {figures['rate']:.0f} msg/s, "
                        f"other CPU {figures['foreign_cpu']:.0%}, CPU s by service {dict(busiest)}")
            scenario = {"title": title, "size_name": size_name, "reuse": reuse, "rows": {}, "runs": runs}
            for row in rows:
                row_runs = runs[row.key]
                if not row_runs:
                    scenario["rows"][row.key] = {"label": row.label + " (failed)"}
                    continue
                scenario["rows"][row.key] = {
                    "label": row.label,
                    "count": counts[row.key],
                    "rate": median(run["rate"] for run in row_runs),
                    "delivered_rate": median(run["delivered_rate"] for run in row_runs),
                    "cpu": median(run.get("cpu") for run in row_runs),
                    "peak_rss_kib": max((run.get("peak_rss_kib") or 0) for run in row_runs) or None,
                    "foreign_cpu": max(run["foreign_cpu"] for run in row_runs),
                }
            scenario["rows"]["6"] = {
                "label": "clamd INSTREAM, direct client (scans/s)",
                "rate": results["clamd_rate"][size_name],
                "foreign_cpu": max(run["foreign_cpu"] for run in results[f"clamd_runs_{size_name}"]),
            }

            if not reuse:
                proxy_rate = scenario["rows"].get("2", {}).get("rate")
                latency_rate = proxy_rate / 2 if proxy_rate else None
                scenario["latency_rate"] = latency_rate
                samples = {row.key: [] for row in rows}
                measured = [row for row in rows if scenario["rows"][row.key].get("rate")]
                for _ in range(options.reps):
                    for row in measured:
                        rate = scenario["rows"][row.key]["rate"] / 2
                        if latency_rate:
                            rate = min(latency_rate, rate)
                        samples[row.key].append(latency_once(row, message_file, rate, options.seconds))
                for row in measured:
                    failed = sum(sample["failed"] for sample in samples[row.key])
                    if failed:
                        log(f"  latency row {row.key}: {failed} transactions failed: "
                            f"{samples[row.key][0].get('first_failure')}")
                    scenario["rows"][row.key]["p50_ms"] = median(s["p50_ms"] for s in samples[row.key])
                    scenario["rows"][row.key]["p99_ms"] = median(s["p99_ms"] for s in samples[row.key])
                scenario["latency_samples"] = samples
                by_key = {row.key: row for row in measured}
                if latency_rate and "1" in by_key and "2" in by_key:
                    scenario["added_p99_ms"] = (
                        scenario["rows"]["2"]["p99_ms"] - scenario["rows"]["1"]["p99_ms"])
                    # The same at a quarter of row 2's rate shows how much of
                    # the added latency is waiting for a core.
                    quarter = {}
                    for key in ("1", "2"):
                        runs = [latency_once(by_key[key], message_file, latency_rate / 2, options.seconds)
                                for _ in range(options.reps)]
                        quarter[key] = {"p50_ms": median(run["p50_ms"] for run in runs),
                                        "p99_ms": median(run["p99_ms"] for run in runs)}
                    scenario["quarter_rate"] = {"rate": latency_rate / 2, "rows": quarter,
                                                "added_p99_ms": quarter["2"]["p99_ms"] - quarter["1"]["p99_ms"]}
            results["scenarios"].append(scenario)

        # clamd's rate again, after every scenario: a change shows drift in
    # clamd itself rather than in what the rows around it do.
    results["clamd_rate_end"] = {}
    for size_name, message_file in messages.items():
        runs = [run_once(clamd_row, message_file, 5_000, False, foreign) for _ in range(options.reps)]
        results["clamd_rate_end"][size_name] = median(run["rate"] for run in runs)
        results[f"clamd_runs_end_{size_name}"] = runs
        log(f"clamd {size_name} at the end: {results['clamd_rate_end'][size_name]:.0f} scans/s")

    if not options.no_memory:
        memory = {}
        outcome = loadgen("mailboxes", "--count", TRACKED_MAILBOXES, "--strikes", 1)
        memory["bytes_per_mailbox"] = outcome["bytes_per_mailbox"]
        log(f"memory: {outcome['bytes_per_mailbox']:.0f} bytes per tracked mailbox with a strike")
        # Five strikes (the default threshold) start a lockout, which the
        # cache keeps: the most a tracked mailbox costs.
        outcome = loadgen("mailboxes", "--count", TRACKED_MAILBOXES, "--strikes", 5)
        memory["bytes_per_locked_mailbox"] = outcome["bytes_per_mailbox"]
        idle_server, idle_port = start_sendguard(
            processes, work, "idle", sink_port, scan_off,
            smtp_extra=f"max_connections = {IDLE_CONNECTIONS + 100}\n"
            f"max_connections_per_client = {IDLE_CONNECTIONS + 100}\n",
        )
        rss_before = status_kib(idle_server.pid, "VmRSS")
        holder = subprocess.Popen(
            [str(LOADGEN), "idle", "--target", f"127.0.0.1:{idle_port}",
             "--connections", str(IDLE_CONNECTIONS), "--hold", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=raise_file_limit,
        )
        ready = holder.stderr.readline()
        if ready.startswith("ready"):
            time.sleep(1)
            rss = status_kib(idle_server.pid, "VmRSS")
            memory["idle_rss_mib"] = rss / 1024
            memory["idle_rss_before_mib"] = rss_before / 1024
            memory["idle_bytes_per_connection"] = (rss - rss_before) * 1024 / IDLE_CONNECTIONS
            log(f"memory: {rss / 1024:.1f} MiB RSS with {IDLE_CONNECTIONS} idle connections")
        else:
            log(f"idle connections failed: {ready.strip()} {holder.stderr.read()[:500]}")
        try:
            holder.wait(60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        processes.stop(idle_server)
        results["memory"] = memory

    results["load_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    text = table(results)
    target_text = targets(results)
    memory = results.get("memory", {})
    summary = (
        f"Run at {results['when']} on {results['machine']['cpu']}, {results['machine']['cores']} cores; "
        f"load average at start {' '.join(load_at_start)}, at end {' '.join(results['load_at_end'])}.\n"
        "'other CPU' is the largest share of the machine that processes outside this "
        "benchmark used during one run of the row.\n"
                + text
        + "\n\n"
        + "".join(
            f"clamd alone, {size_name}: {format_number(results['clamd_rate'][size_name])} scans/s "
            f"at the start, {format_number(rate)} at the end.\n"
            for size_name, rate in results.get("clamd_rate_end", {}).items()
        )
        + ("\n### Memory\n\n" if memory else "")
        + (f"- {format_number(memory.get('bytes_per_mailbox'))} bytes RSS per tracked mailbox "
           f"({TRACKED_MAILBOXES:,} mailboxes with one strike each; ".replace(",", " ")
           + f"{format_number(memory.get('bytes_per_locked_mailbox'))} when each is locked out)\n"
           if "bytes_per_mailbox" in memory else "")
        + (f"- {format_number(memory.get('idle_rss_mib'), 1)} MiB RSS with {IDLE_CONNECTIONS} idle connections "
           f"({format_number(memory.get('idle_rss_before_mib'), 1)} MiB before them, "
           f"{format_number(memory.get('idle_bytes_per_connection'))} bytes per connection)\n"
           if "idle_rss_mib" in memory else "")
        + "\n### Targets\n\n" + target_text + "\n"
    )
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "table.md").write_text(summary)
    print(summary, flush=True)
    write_chart(results, options.chart)


def write_chart(results, path):
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        chart(results, path)
        log(f"chart written to {path}")
    except ImportError:
        log("matplotlib is missing (Debian package python3-matplotlib); no chart written")


if __name__ == "__main__":
    main()
