"""A small TCP proxy for fault injection: put it between processes and Redis, then reset every connection
(RST, as a firewall or a restarted load balancer does), black-hole traffic (a partition: packets vanish, nothing
is refused), or refuse new connections.

Threads, one pair per connection: enough for tests (tens of connections), and nothing to install.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class _Pair:
    client: socket.socket
    upstream: socket.socket
    closed: bool = False

    def reset(self) -> None:
        """Close both sides with RST (SO_LINGER 0), as a middlebox that drops the connection does."""
        self.closed = True
        for sock in (self.client, self.upstream):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass


@dataclass
class TcpProxy:
    target_host: str
    target_port: int
    host: str = "127.0.0.1"
    port: int = 0
    _pairs: list[_Pair] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _flowing: threading.Event = field(default_factory=threading.Event)  # cleared: a black hole
    refusing: bool = False
    accepted: int = 0

    def start(self) -> TcpProxy:
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((self.host, self.port))
        self._server.listen(256)
        self.port = self._server.getsockname()[1]
        self._flowing.set()
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, scheme: str = "redis", db: int = 0) -> str:
        return f"{scheme}://{self.host}:{self.port}/{db}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.refusing:
                _Pair(client, socket.socket()).reset()
                continue
            try:
                upstream = socket.create_connection((self.target_host, self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _Pair(client, socket.socket()).reset()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
                self.accepted += 1
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    def _pump(self, pair: _Pair) -> None:
        socks = [pair.client, pair.upstream]
        try:
            while not pair.closed and not self._stop.is_set():
                if not self._flowing.is_set():  # a black hole: hold everything, answer nothing
                    self._flowing.wait(0.05)
                    continue
                readable, _, _ = select.select(socks, [], [], 0.05)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError
                    if not self._flowing.is_set():  # cut off mid-way: this data is lost, as on a partition
                        continue
                    (pair.upstream if sock is pair.client else pair.client).sendall(data)
        except (OSError, ValueError, ConnectionError):
            pass
        finally:
            if not pair.closed:
                pair.closed = True
                for sock in socks:
                    try:
                        sock.close()
                    except OSError:
                        pass
            with self._lock:
                if pair in self._pairs:
                    self._pairs.remove(pair)

    def reset_all(self) -> int:
        """RST every open connection; returns how many there were."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.reset()
        return len(pairs)

    def black_hole(self) -> None:
        """Stop delivering anything either way (connections stay open, as on a partition)."""
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    def stop(self) -> None:
        self._stop.set()
        self._flowing.set()
        try:
            self._server.close()
        except OSError:
            pass
        self.reset_all()
