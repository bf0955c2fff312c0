"""Several hosts on one machine, for real: network namespaces the harness makes itself.

``Hosts(n)`` makes ``et-h0 … et-h<n-1>``, each a network namespace with its own address on a
private bridge (``et-br``, 10.213.7.0/24, the machine itself at .1). Nothing else is reachable from
them and they reach nothing else: the harness creates every address it uses. Each host has its own
``/etc/hosts`` (``ip netns exec`` mounts ``/etc/netns/<host>/hosts`` over it) in which the machine's
hostname is that host's address — what gloo, Ray and ``hostname --ip-address`` resolve — and the
other hosts are named. The filesystem is shared, like a cluster's shared storage.

``limit(rate)`` shapes every host's link both ways with ``tc`` (token bucket), e.g. ``"100mbit"``.
``close()`` kills every process left in the namespaces and removes all of it; it also runs first, so
a harness killed mid-run leaves nothing that breaks the next. Needs root (``ip netns``).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PREFIX = "et-h"  # the default set's host names


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def available() -> str | None:
    """Why the harness cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    return None


class Hosts:
    """``n`` hosts on subnet 10.213.<net>; another ``net`` gives a separate set (names ``et<net>-h…``)
    that can run beside this one."""

    def __init__(self, n: int, net: int = 7):
        tag = "et-" if net == 7 else f"et{net}-"
        self.prefix, self.bridge, self.veth = f"{tag}h", f"{tag}br", f"{tag}v"
        self.names = [f"{self.prefix}{i}" for i in range(n)]
        self.addrs = [f"10.213.{net}.{10 + i}" for i in range(n)]
        self.gateway = f"10.213.{net}.1"
        self.close()  # whatever an earlier, killed harness left
        try:
            self._up()
        except BaseException:
            self.close()
            raise

    def _up(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        me = socket.gethostname()
        for i, (name, addr) in enumerate(zip(self.names, self.addrs)):
            _ip("netns", "add", name)
            outer, inner = f"{self.veth}{i}", f"{self.veth}{i}i"
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", name)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", name, "link", "set", inner, "name", "eth0")
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / name
            etc.mkdir(parents=True, exist_ok=True)
            others = "".join(f"{a} {h}\n" for h, a in zip(self.names, self.addrs) if h != name)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{addr} {me} {name}\n{others}"
                                       f"{self.gateway} {self.prefix}gw\n")

    def argv(self, i: int, cmd: list[str]) -> list[str]:
        """``cmd`` as run on host ``i``."""
        return ["ip", "netns", "exec", self.names[i], *cmd]

    def popen(self, i: int, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(i, cmd), **kw)

    def run(self, i: int, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(i, cmd), **kw)

    def limit(self, rate: str | None) -> None:
        """Shape each host's link to ``rate`` in both directions (None: remove the shaping)."""
        for i, name in enumerate(self.names):
            for where in (["-n", name, "dev", "eth0"], ["dev", f"{self.veth}{i}"]):
                ns, dev = (where[:2], where[2:]) if where[0] == "-n" else ([], where)
                subprocess.run(["tc", *ns, "qdisc", "del", *dev, "root"], capture_output=True, timeout=30)
                if rate is not None:
                    subprocess.run(["tc", *ns, "qdisc", "add", *dev, "root", "tbf", "rate", rate,
                                    "burst", "512kb", "latency", "100ms"], check=True, capture_output=True, timeout=30)

    def pids(self, i: int | None = None) -> list[int]:
        """The processes running on host ``i`` (None: on every host)."""
        out = []
        for name in self.names if i is None else [self.names[i]]:
            r = _ip("netns", "pids", name, check=False)
            out += [int(p) for p in r.stdout.split()]
        return out

    def crash(self, i: int) -> int:
        """Host ``i`` fails: SIGKILL to everything running on it (how a node is lost). Returns how many."""
        pids = self.pids(i)
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def close(self) -> None:
        """Kill what runs on the hosts (TERM, then KILL), then remove namespaces, links and files."""
        existing = set(_ip("netns", "list", check=False).stdout.split())
        mine = [n for n in existing if n.startswith(self.prefix) and n[len(self.prefix):].isdigit()]
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = [int(p) for n in mine for p in _ip("netns", "pids", n, check=False).stdout.split()]
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + wait
            while pids and time.monotonic() < end:
                pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
                time.sleep(0.1)
        for n in mine:
            _ip("netns", "del", n, check=False)
            shutil.rmtree(Path("/etc/netns") / n, ignore_errors=True)
        for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
            dev = line.split(":")[1].strip().split("@")[0]
            if dev.startswith(self.veth):  # a veth whose namespace end went first is sometimes left
                _ip("link", "del", dev, check=False)
        _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False
