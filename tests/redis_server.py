"""A private redis-server process on a free loopback port, which a test may stop, kill or restart."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from services.stack import free_port


def redis_alive(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


class RedisServer:
    """`redis-server` keeping nothing on disk, always on the same port (so clients can reconnect)."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        self._process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "no", "--dir", str(self._directory)],
                                         stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not redis_alive(self.url):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None
