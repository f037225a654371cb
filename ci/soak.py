#!/usr/bin/env python3
"""Soak test of `ringpool echo` and `ringpool proxy` under hostile load.

Starts each server under a descriptor limit below the number of connections (`prlimit
--nofile`), then for DURATION seconds keeps up to CONNECTIONS client connections open at once,
each one of: a ping-pong client with random message sizes (every byte checked), a client that
resets mid-stream, one that half-closes and reads the rest, a slow reader that sends a lot and
reads a little at a time, and an idle holder. Connections the server cannot take (its limit)
may be refused or delayed; none may get wrong bytes.

Afterwards each server must still serve a new client correctly, and its descriptor count, RSS
and buffers in use must come back to where they started: descriptors exactly, RSS within a
bound, and at exit (SIGINT) every buffer back in the group (`in_user == 0`). Prints a table of
the figures and exits non-zero if a check failed.

Usage: ci/soak.py [--duration S] [--connections N] [--nofile N] [--servers echo,proxy,...]
                  [--binary target/release/ringpool] [--seed N]
Server names: echo, echo-rt, proxy, proxy-rt, proxy-splice.
"""

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / tick
    except OSError:
        return -1.0


class Server:
    """A ringpool server process, started under `prlimit --nofile=N`."""

    def __init__(self, binary, args, nofile, name):
        self.name = name
        cmd = ["prlimit", f"--nofile={nofile}:{nofile}", binary] + args
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.addr = None
        deadline = time.time() + 20
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("listening on "):
                host, port = line.split()[-1].rsplit(":", 1)
                self.addr = (host, int(port))
                break
        if self.addr is None:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise RuntimeError(f"{name}: did not start listening: {err.strip()}")
        # Drain both pipes all along: a server that logs a lot must never block on them.
        self.out_lines, self.err_lines, self.err_count = [], [], 0
        self.readers = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, False), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, True), daemon=True),
        ]
        for t in self.readers:
            t.start()

    def _drain(self, pipe, is_err):
        for line in pipe:
            if is_err:
                self.err_count += 1
                self.err_lines = (self.err_lines + [line.rstrip()])[-5:]
            else:
                self.out_lines.append(line.rstrip())

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        """SIGINT, then the `stats {json}` line of its exit summary (or None)."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for t in self.readers:
            t.join(timeout=5)
        for line in self.out_lines:
            if line.startswith("stats "):
                return json.loads(line[len("stats "):])
        return None


def payload(rng, n):
    return rng.randbytes(n)


async def open_conn(addr, timeout=5.0):
    return await asyncio.wait_for(asyncio.open_connection(*addr), timeout)


class Tally:
    def __init__(self):
        self.counts = {}
        self.bytes_checked = 0
        self.failures = []

    def add(self, what, n=1):
        self.counts[what] = self.counts.get(what, 0) + n

    def fail(self, what):
        self.add("wrong")
        if len(self.failures) < 20:
            self.failures.append(what)


async def exchange(reader, writer, data, timeout):
    """Writes `data`, reads the same number of bytes back; returns them."""
    writer.write(data)
    await asyncio.wait_for(writer.drain(), timeout)
    return await asyncio.wait_for(reader.readexactly(len(data)), timeout)


async def client_pingpong(addr, rng, tally, end):
    reader, writer = await open_conn(addr)
    try:
        while time.time() < end and rng.random() < 0.9:
            data = payload(rng, rng.choice([1, 64, 700, 4096, 20000, 100000]))
            got = await exchange(reader, writer, data, 10)
            if zlib.crc32(got) != zlib.crc32(data):
                tally.fail(f"ping-pong: {len(data)} bytes came back different")
                return
            tally.bytes_checked += len(data)
            await asyncio.sleep(rng.random() * 0.05)
        tally.add("pingpong")
    finally:
        writer.close()


async def client_reset(addr, rng, tally, end):
    reader, writer = await open_conn(addr)
    writer.write(payload(rng, rng.choice([10, 5000, 200000])))
    await asyncio.sleep(rng.random() * 0.05)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    tally.add("reset")


async def client_half_close(addr, rng, tally, end):
    reader, writer = await open_conn(addr)
    data = payload(rng, rng.choice([100, 30000, 300000]))
    writer.write(data)
    await asyncio.wait_for(writer.drain(), 20)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(-1), 20)
    writer.close()
    if got != data:
        tally.fail(f"half-close: sent {len(data)} got {len(got)} bytes")
        return
    tally.bytes_checked += len(data)
    tally.add("half_close")


async def client_slow_reader(addr, rng, tally, end):
    reader, writer = await open_conn(addr)
    data = payload(rng, 1 << 20)
    writer.write(data)
    got = bytearray()
    deadline = min(end, time.time() + 5)
    while len(got) < len(data) and time.time() < deadline:
        chunk = await asyncio.wait_for(reader.read(4096), 10)
        if not chunk:
            break
        got += chunk
        await asyncio.sleep(0.01)
    if bytes(got) != data[: len(got)]:
        tally.fail("slow reader: bytes out of order")
    else:
        tally.bytes_checked += len(got)
    writer.transport.abort()
    tally.add("slow_reader")


async def client_idle(addr, rng, tally, end):
    reader, writer = await open_conn(addr)
    await asyncio.sleep(min(max(0.0, end - time.time()), rng.random() * 10))
    writer.close()
    tally.add("idle")


KINDS = [
    (client_pingpong, 0.35),
    (client_reset, 0.15),
    (client_half_close, 0.15),
    (client_slow_reader, 0.05),
    (client_idle, 0.30),
]


async def load(addr, duration, connections, seed, tally):
    rng = random.Random(seed)
    end = time.time() + duration
    live = set()

    async def one(kind, r):
        try:
            await kind(addr, r, tally, end)
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError, OSError):
            # Refused, delayed past the timeout, or reset by a server at its limit: allowed.
            tally.add("refused_or_dropped")

    started = 0
    while time.time() < end:
        while len(live) < connections and time.time() < end:
            kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
            t = asyncio.ensure_future(one(kind, random.Random(rng.random())))
            live.add(t)
            t.add_done_callback(live.discard)
            started += 1
            if started % 200 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0.05)
    if live:
        await asyncio.wait(live, timeout=30)
    tally.add("started", started)


async def probe_client(addr):
    """A new client after the storm: 1 MiB in 4 KiB writes echoed back exactly."""
    reader, writer = await open_conn(addr, 10)
    data = random.Random(7).randbytes(1 << 20)
    got = bytearray()
    for i in range(0, len(data), 4096):
        got += await exchange(reader, writer, data[i : i + 4096], 10)
    writer.close()
    return bytes(got) == data


def settle(pid, want_fds, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fd_count(pid) <= want_fds:
            return True
        time.sleep(0.2)
    return False


def run_one(name, args, binary, upstream):
    server_args = {
        "echo": ["echo", "--listen", "127.0.0.1:0"],
        "echo-rt": ["echo", "--rt", "--listen", "127.0.0.1:0"],
        "proxy": ["proxy", "--listen", "127.0.0.1:0", "--upstream", upstream],
        "proxy-rt": ["proxy", "--rt", "--listen", "127.0.0.1:0", "--upstream", upstream],
        "proxy-splice": ["proxy", "--path", "splice", "--listen", "127.0.0.1:0",
                         "--upstream", upstream],
    }[name]
    srv = Server(binary, server_args, args.nofile, name)
    time.sleep(0.3)
    start = {"fds": fd_count(srv.pid), "rss": rss_kib(srv.pid), "cpu": cpu_seconds(srv.pid)}
    peak = dict(start)
    tally = Tally()

    async def main():
        task = asyncio.ensure_future(
            load(srv.addr, args.duration, args.connections, args.seed, tally)
        )
        while not task.done():
            peak["fds"] = max(peak["fds"], fd_count(srv.pid))
            peak["rss"] = max(peak["rss"], rss_kib(srv.pid))
            await asyncio.sleep(0.5)
        await task

    t0 = time.time()
    asyncio.run(main())
    elapsed = time.time() - t0
    alive_after_load = srv.alive()
    settled = alive_after_load and settle(srv.pid, start["fds"])
    end = {"fds": fd_count(srv.pid), "rss": rss_kib(srv.pid), "cpu": cpu_seconds(srv.pid)}
    probe_ok = alive_after_load and asyncio.run(probe_client(srv.addr))
    stats = srv.stop()
    checks = {
        "alive": alive_after_load,
        "no wrong bytes": tally.counts.get("wrong", 0) == 0,
        "new client served": bool(probe_ok),
        "descriptors back": settled,
        "rss back (<= start + 32 MiB)": end["rss"] >= 0 and end["rss"] <= start["rss"] + 32 * 1024,
        "buffers home at exit": bool(stats) and stats.get("in_user", 1) == 0,
        "pipes home at exit": bool(stats) and stats.get("pipes_in_use", 0) == 0,
        "served some": tally.counts.get("pingpong", 0) + tally.counts.get("half_close", 0) > 0,
    }
    return {
        "server": name,
        "seconds": round(elapsed, 1),
        "counts": tally.counts,
        "bytes_checked": tally.bytes_checked,
        "failures": tally.failures,
        "fds": [start["fds"], peak["fds"], end["fds"]],
        "rss_kib": [start["rss"], peak["rss"], end["rss"]],
        "cpu_s": round(end["cpu"] - start["cpu"], 2) if end["cpu"] >= 0 else None,
        "exit_stats": stats,
        "checks": checks,
        "stderr_lines": srv.err_count,
        "stderr_tail": srv.err_lines[-3:],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=180)
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--nofile", type=int, default=4096)
    ap.add_argument("--servers", default="echo,echo-rt,proxy,proxy-rt,proxy-splice")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/ringpool"))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, args.connections + 1000)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < args.connections + 100:
        print(f"soak: only {want} descriptors for {args.connections} connections", file=sys.stderr)
    # The proxies' upstream: an echo server of its own, without the limit.
    upstream = Server(args.binary, ["echo", "--listen", "127.0.0.1:0", "--bufs", "4096"], hard, "upstream")
    up = f"{upstream.addr[0]}:{upstream.addr[1]}"
    results = []
    try:
        for name in args.servers.split(","):
            print(f"soak: {name}: {args.connections} connections for {args.duration:.0f} s "
                  f"under --nofile={args.nofile}", flush=True)
            try:
                r = run_one(name, args, args.binary, up)
            except Exception as e:  # a server that cannot start fails its row
                import traceback; traceback.print_exc()
                r = {"server": name, "checks": {"started": False}, "error": str(e)}
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        upstream.stop()
    ok = True
    print("\nserver     conns started  ok-pingpong  half-close  resets  refused  wrong  "
          "fds start/peak/end   RSS MiB start/peak/end  checks")
    for r in results:
        failed = [k for k, v in r["checks"].items() if not v]
        ok &= not failed
        c = r.get("counts", {})
        fds = r.get("fds", ["-"] * 3)
        rss = [f"{x / 1024:.0f}" if isinstance(x, int) and x >= 0 else "-" for x in r.get("rss_kib", [-1] * 3)]
        print(f"{r['server']:<10} {c.get('started', 0):>13} {c.get('pingpong', 0):>12} "
              f"{c.get('half_close', 0):>11} {c.get('reset', 0):>7} {c.get('refused_or_dropped', 0):>8} "
              f"{c.get('wrong', 0):>6}  {'/'.join(map(str, fds)):>18}  {'/'.join(rss):>22}  "
              f"{'ok' if not failed else 'FAILED: ' + ', '.join(failed)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
