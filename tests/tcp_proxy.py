"""A loopback TCP proxy in front of a real broker, to take it away from one client.

Tests point the app (and its workers) at the proxy's port instead of the
broker's, then :meth:`TCPProxy.stop` it ("the broker is down": new
connections are refused, open ones reset), :meth:`TCPProxy.start` it again on
the same port ("the broker is back"), or :meth:`TCPProxy.stall` it ("the
broker hangs": connections are accepted, nothing is forwarded until
:meth:`TCPProxy.resume`). The machine's shared Redis and RabbitMQ are never
touched.

Each connection has one thread that copies bytes both ways; every thread is
a daemon, and :meth:`TCPProxy.stop` joins them all.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import struct
import threading
import typing as t
from pathlib import Path

_CHUNK = 65536
_JOIN_TIMEOUT = 5.0


def _ephemeral_range() -> tuple[int, int]:
    """The range the kernel picks outgoing ports from (Linux), or IANA's."""
    path = Path("/proc/sys/net/ipv4/ip_local_port_range")
    try:
        low, high = path.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def _pick_port(host: str) -> int:
    """A free port outside the ephemeral range.

    While a proxy is stopped its port is free, and an ephemeral port could be
    handed to some outgoing connection in the meantime, so the proxy could
    not listen there again; ports below the range are never handed out.
    """
    low, _ = _ephemeral_range()
    candidates = list(range(20000, min(low, 32768)))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no luck: any free port will do
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _readable(
    sockets: t.Sequence[socket.socket], timeout: float | None
) -> list[socket.socket]:
    """The sockets of ``sockets`` that are readable (or closed by the peer).

    poll(), not select(): a test process may hold more than select()'s 1024
    file descriptors, and select() refuses a socket numbered above that.
    """
    if not hasattr(select, "poll"):  # Windows
        return select.select(list(sockets), [], [], timeout)[0]
    poller = select.poll()
    by_fd = {}
    for sock in sockets:
        poller.register(sock, select.POLLIN)
        by_fd[sock.fileno()] = sock
    events = poller.poll(None if timeout is None else timeout * 1000)
    return [by_fd[fd] for fd, _ in events]


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset, as a crashed peer would."""
    with contextlib.suppress(OSError):  # already closed by the peer
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Link:
    """One client connection and its upstream, served by one thread."""

    def __init__(self, proxy: TCPProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        # Written to by stop(), stall() and resume(), so the thread's select()
        # wakes up and looks at the proxy's mode again.
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.thread = threading.Thread(
            target=self._run, name=f"tcp-proxy-{proxy.port}-link", daemon=True
        )

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # the link has just ended
            self.wake_w.send(b"x")

    def _wait_for_wake(self, sockets: list[socket.socket]) -> list[socket.socket]:
        readable = _readable([*sockets, self.wake_r], 1.0)
        if self.wake_r in readable:
            with contextlib.suppress(BlockingIOError):  # another wake took it
                self.wake_r.recv(_CHUNK)
            return []
        return readable

    def _run(self) -> None:
        proxy = self.proxy
        graceful = False
        try:
            # A stalled proxy holds a new connection before it reaches the
            # broker, as a hung broker's kernel holds it in the backlog.
            while proxy._stalled and not proxy._stopping:
                self._wait_for_wake([])
            if proxy._stopping:
                return
            try:
                self.upstream = socket.create_connection(proxy.target, timeout=5)
            except OSError:
                return  # the broker itself is down: the client sees a reset
            # Bounds a sendall() to a peer that stopped reading, so that
            # stop() can always join this thread.
            self.client.settimeout(_JOIN_TIMEOUT / 2)
            self.upstream.settimeout(_JOIN_TIMEOUT / 2)
            peers = {self.client: self.upstream, self.upstream: self.client}
            while not proxy._stopping:
                if proxy._stalled:
                    self._wait_for_wake([])
                    continue
                for sock in self._wait_for_wake([self.client, self.upstream]):
                    data = sock.recv(_CHUNK)
                    if not data:
                        graceful = True  # one side closed: close the other
                        return
                    peers[sock].sendall(data)
        except OSError:
            return  # a side was reset or timed out under us: end the link
        finally:
            self.close(reset=not graceful)

    def close(self, reset: bool = True) -> None:
        """Close both sides, with a TCP reset unless ``reset`` is false."""
        end = _reset if reset else socket.socket.close
        end(self.client)
        if self.upstream is not None:
            end(self.upstream)
        self.wake_w.close()
        self.wake_r.close()
        with self.proxy._lock:
            self.proxy._links.discard(self)


class TCPProxy:
    """Forward connections from a loopback port to ``target_host:target_port``.

    :param target_host: the broker's host.
    :param target_port: the broker's port.
    :param host: the address to listen on.
    :param port: the port to listen on; by default a free one, picked at the
        first :meth:`start` and kept for every later one.

    ``connections`` counts the connections accepted since construction;
    ``active`` is how many are open now.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self._port = port
        self.connections = 0
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = False
        self._stalled = False

    @property
    def port(self) -> int:
        """The port clients connect to; the same across stop and start."""
        if self._port is None:
            self._port = _pick_port(self.host)
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def running(self) -> bool:
        return self._listener is not None

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._links)

    def start(self) -> TCPProxy:
        """Listen on :attr:`port` and forward; a stopped proxy comes back."""
        if self._listener is not None:
            raise RuntimeError(f"The proxy on port {self.port} is already running.")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._stopping = False
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept, name=f"tcp-proxy-{self.port}-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def _accept(self) -> None:
        listener, wake_r = self._listener, self._wake_r
        assert listener is not None and wake_r is not None
        while not self._stopping:
            readable = _readable([listener, wake_r], None)
            if wake_r in readable:
                return
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed by stop()
            link = _Link(self, client)
            with self._lock:
                if self._stopping:
                    _reset(client)
                    return
                self.connections += 1
                link.thread.name += f"-{self.connections}"
                self._links.add(link)
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(link.thread)
            link.thread.start()

    def stall(self) -> None:
        """Stop forwarding on every connection, open and new; accept new ones.

        Bytes wait in the kernel's buffers until :meth:`resume`, so the
        conversation goes on where it stopped, as with a broker that froze.
        """
        self._stalled = True
        for link in self._snapshot():
            link.wake()

    def resume(self) -> None:
        """Forward again after :meth:`stall`."""
        self._stalled = False
        for link in self._snapshot():
            link.wake()

    def stop(self) -> None:
        """Close the listener and reset every open connection; join all threads.

        New connections to :attr:`port` are then refused until :meth:`start`.
        A stalled proxy stops stalled: a later :meth:`start` forwards again.
        """
        if self._listener is None:
            return
        assert self._accept_thread is not None and self._wake_w is not None
        self._stopping = True
        self._wake_w.send(b"x")
        self._accept_thread.join(_JOIN_TIMEOUT)
        accept_alive = self._accept_thread.is_alive()
        self._listener.close()
        self._wake_w.close()
        assert self._wake_r is not None
        self._wake_r.close()
        self._listener = self._wake_r = self._wake_w = self._accept_thread = None
        # Each link resets its sockets itself as it ends.
        for link in self._snapshot():
            link.wake()
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(_JOIN_TIMEOUT)
        alive = [thread.name for thread in threads if thread.is_alive()]
        if accept_alive:
            alive.append("accept")
        self._stalled = False
        if alive:
            raise RuntimeError(f"Proxy threads did not end: {', '.join(alive)}.")

    def _snapshot(self) -> list[_Link]:
        with self._lock:
            return list(self._links)

    def __enter__(self) -> TCPProxy:
        return self.start()

    def __exit__(self, *exc_info: t.Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stalled" if self._stalled else "running" if self.running else "stopped"
        target = f"{self.target[0]}:{self.target[1]}"
        return f"<TCPProxy {self.host}:{self.port} -> {target} {state}>"
