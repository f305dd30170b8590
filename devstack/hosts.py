"""Several hosts on one machine, for the multi-host tests and benchmark: network namespaces on a
Linux bridge, each with its own address, its own view of the shared spool, and faults of its own
(a partition from a service, packet loss, a hung spool mount). Needs root, iproute2, iptables and
bindfs (scripts/setup.sh --test).

Redis and the broker listen on the bridge's address in the root namespace; a process runs on a
host under `ip netns exec`. A host's spool is a `bindfs --enable-lock-forwarding` view of one
directory, so a flock through one view excludes one through another, as on NFS; stopping a
view's bindfs process makes that host's spool I/O hang like a dead NFS server.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from devstack.local import Placement, wait_until

TOOLS = ("ip", "iptables", "bindfs", "fusermount")


def why_not(also: tuple[str, ...] = ()) -> str | None:
    """Why hosts cannot be made on this machine (not root, or a tool missing, of TOOLS and of
    `also`: "faketime" for hosts with clocks of their own), or None."""
    if os.geteuid() != 0:
        return "several hosts on one machine need network namespaces and mounts: run as root"
    missing = [tool for tool in (*TOOLS, *also) if shutil.which(tool) is None]
    if missing:
        return f"several hosts on one machine need {', '.join(missing)} (scripts/setup.sh --test installs them)"
    return None


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    name: str
    netns: str
    address: str
    spool: Path  # this host's view of the shared spool
    bindfs: subprocess.Popen[bytes] | None = None
    rules: list[list[str]] = field(default_factory=list)

    @property
    def wrap(self) -> list[str]:
        """What a command runs under to run on this host."""
        return ["ip", "netns", "exec", self.netns]

    def placement(self, clock: str | None = None) -> Placement:
        """A process on this host, with this host's spool view (and a clock off by `clock`,
        a faketime offset such as "+600s")."""
        skew = ["faketime", "-f", clock] if clock else []
        return Placement({"SLUICE_SPOOL_DIR": str(self.spool)}, self.wrap + skew)


class Hosts:
    """`names` hosts joined by a bridge; `close()` removes every namespace, rule and mount."""

    def __init__(self, workdir: Path, names: list[str]) -> None:
        self.tag = f"{random.randrange(16 ** 4):04x}"
        # Test processes running side by side (pytest-xdist) draw from ranges of their own.
        worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
        share = 234 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        self.subnet = random.randrange(16 + share * worker, 16 + share * (worker + 1))
        self.bridge = f"slbr{self.tag}"
        self.gateway = f"10.213.{self.subnet}.1"
        self.shared_spool = workdir / "spool"
        self.shared_spool.mkdir(parents=True, exist_ok=True)
        self.hosts: dict[str, Host] = {}
        try:
            run("ip", "link", "add", self.bridge, "type", "bridge")
            run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            run("ip", "link", "set", self.bridge, "up")
            for i, name in enumerate(names, start=11):
                self._add(workdir, name, i)
        except BaseException:
            self.close()
            raise

    def _add(self, workdir: Path, name: str, octet: int) -> None:
        netns, veth = f"sl{self.tag}{name}", f"v{self.tag}{octet}"
        host = Host(name, netns, f"10.213.{self.subnet}.{octet}", workdir / f"spool-{name}")
        self.hosts[name] = host
        run("ip", "netns", "add", netns)
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        run("ip", "link", "set", veth, "master", self.bridge, "up")
        run("ip", "-n", netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        run("ip", "-n", netns, "link", "set", "eth0", "up")
        run("ip", "-n", netns, "link", "set", "lo", "up")
        host.spool.mkdir(parents=True, exist_ok=True)
        # No attribute cache: NFS revalidates a file's attributes when it is opened (close-to-open),
        # so a writer that opens a slot file sees the size another host committed; FUSE's default
        # keeps them for a second, and a writer then took a stale size for a damaged file.
        host.bindfs = subprocess.Popen(["bindfs", "-f", "--enable-lock-forwarding", "--multithreaded",
                                        "-o", "attr_timeout=0,entry_timeout=0",
                                        str(self.shared_spool), str(host.spool)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: os.path.ismount(host.spool), 10, f"the spool view of {name}")

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def _rule(self, host: Host, rule: list[str]) -> None:
        run(*host.wrap, "iptables", "-A", *rule)
        host.rules.append(rule)

    def partition(self, name: str, port: int) -> None:
        """Cut the host off from the service on `port` (both directions)."""
        host = self.hosts[name]
        self._rule(host, ["OUTPUT", "-d", self.gateway, "-p", "tcp", "--dport", str(port), "-j", "DROP"])
        self._rule(host, ["INPUT", "-s", self.gateway, "-p", "tcp", "--sport", str(port), "-j", "DROP"])

    def lose(self, name: str, port: int, share: float) -> None:
        """Drop a random `share` of the packets between the host and the service on `port`."""
        host = self.hosts[name]
        for chain, direction in (("OUTPUT", ["-d", self.gateway, "--dport"]), ("INPUT", ["-s", self.gateway,
                                                                                         "--sport"])):
            self._rule(host, [chain, direction[0], direction[1], "-p", "tcp", direction[2], str(port), "-m",
                              "statistic", "--mode", "random", "--probability", str(share), "-j", "DROP"])

    def heal(self, name: str) -> None:
        host = self.hosts[name]
        for rule in reversed(host.rules):
            subprocess.run([*host.wrap, "iptables", "-D", *rule], capture_output=True, timeout=30)
        host.rules.clear()

    def connections(self, name: str, port: int) -> int:
        """How many TCP connections from the host to the service on `port` its kernel still holds
        open (a dead one goes once keepalive or a timeout finds it)."""
        out = subprocess.run([*self.hosts[name].wrap, "ss", "-Htn", "state", "established", "dst",
                              f"{self.gateway}:{port}"], capture_output=True, text=True, timeout=30, check=True)
        return len(out.stdout.splitlines())

    def hang_spool(self, name: str) -> None:
        """The host's spool mount stops answering, like a dead NFS server."""
        bindfs = self.hosts[name].bindfs
        assert bindfs is not None
        os.kill(bindfs.pid, signal.SIGSTOP)

    def resume_spool(self, name: str) -> None:
        bindfs = self.hosts[name].bindfs
        assert bindfs is not None
        os.kill(bindfs.pid, signal.SIGCONT)

    def kill_processes(self, name: str) -> None:
        """SIGKILL every process in the host's namespace: the host is lost for good."""
        out = subprocess.run(["ip", "netns", "pids", self.hosts[name].netns], capture_output=True, text=True)
        for pid in out.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                continue

    def close(self) -> None:
        for host in self.hosts.values():
            self.heal(host.name)
            if host.bindfs is not None:
                try:
                    os.kill(host.bindfs.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        for host in self.hosts.values():
            self.kill_processes(host.name)
            subprocess.run(["fusermount", "-u", "-z", str(host.spool)], capture_output=True, timeout=30)
            if host.bindfs is not None:
                host.bindfs.terminate()
                try:
                    host.bindfs.wait(10)
                except subprocess.TimeoutExpired:
                    host.bindfs.kill()
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)


def rate(count: Callable[[], int], seconds: float) -> float:
    """Records per second that `count()` grows by over `seconds` (a measurement window, not a wait)."""
    before, start = count(), time.monotonic()
    time.sleep(seconds)
    return (count() - before) / (time.monotonic() - start)
