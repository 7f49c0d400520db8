"""A small debuginfod client: GET /buildid/ID/debuginfo from each server in turn, with a
timeout, a size cap, downloads kept in the cache directory, and failures remembered for
a while so a down server is not asked again on every snapshot."""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import time
import urllib.error
import urllib.request

log = logging.getLogger(__name__)
BUILD_ID = re.compile(r"^[0-9a-f]{8,128}$")


class DebuginfodClient:
    """Fetches debug files by build-id; thread-safe enough for one capture thread."""

    def __init__(self, urls: tuple[str, ...], directory: str | None, timeout: float = 5.0,
                 max_bytes: int = 1 << 30, failure_ttl: float = 300.0) -> None:
        self.urls = tuple(u.rstrip("/") for u in urls)
        self.directory = directory
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.failure_ttl = failure_ttl
        self._failed_until: dict[str, float] = {}  # server or server+build-id -> time
        self._why: dict[str, str] = {}  # server or server+build-id -> what went wrong
        self._scratch: tempfile.TemporaryDirectory | None = None  # without a directory

    def close(self) -> None:
        """Remove the downloads kept in a temporary directory (there was no cache dir)."""
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def _download_dir(self) -> str:
        if self.directory is None and self._scratch is None:
            # removed by close(), or at the latest when the client is collected or at exit
            self._scratch = tempfile.TemporaryDirectory(prefix="ctprofd-debuginfod-")
        path = os.path.join(self.directory or self._scratch.name, "debuginfod")
        os.makedirs(path, exist_ok=True)
        return path

    def fetch(self, build_id: str) -> tuple[str, str] | None:
        """(path, source) of the debug file for `build_id`, or None; never raises."""
        if not self.urls or not BUILD_ID.match(build_id):
            return None
        try:
            target = os.path.join(self._download_dir(), build_id + ".debug")
        except OSError as exc:
            log.warning("debuginfod: cannot create download directory: %s", exc.strerror)
            return None
        for url in self.urls:
            if os.path.isfile(target):
                return target, f"debuginfod {url}"
            now = time.monotonic()
            if self._failed_until.get(url, 0) > now or self._failed_until.get(
                    f"{url} {build_id}", 0) > now:
                continue
            try:
                self._download(f"{url}/buildid/{build_id}/debuginfo", target)
                return target, f"debuginfod {url}"
            except urllib.error.HTTPError as exc:  # the server answered: this build only
                self._failed_until[f"{url} {build_id}"] = now + self.failure_ttl
                self._why[f"{url} {build_id}"] = (f"not on {url}" if exc.code == 404
                                                  else f"{url}: HTTP {exc.code}")
                log.debug("debuginfod %s: %s: HTTP %s", url, build_id, exc.code)
            except (OSError, ValueError) as exc:  # down, slow or oversized: the whole server
                self._failed_until[url] = now + self.failure_ttl
                self._why[url] = f"{url}: {describe_error(exc)}"
                log.warning("debuginfod %s; not asking it again for %.0f s", self._why[url],
                            self.failure_ttl)
        return None

    def why_not(self, build_id: str) -> str:
        """What each server said (or why it could not be asked) about `build_id`, after a
        fetch that found nothing."""
        reasons = [self._why.get(f"{url} {build_id}") or self._why.get(url)
                   or f"not asked: {url}" for url in self.urls]
        return "debuginfod: " + "; ".join(reasons)

    def _download(self, url: str, target: str) -> None:
        fd, partial = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=self.timeout) as response:
                copied = 0
                while chunk := response.read(1 << 20):
                    copied += len(chunk)
                    if copied > self.max_bytes:
                        raise ValueError(f"debug file over {self.max_bytes} bytes")
                    out.write(chunk)
            os.replace(partial, target)
        except BaseException:
            os.unlink(partial)
            raise

    def __repr__(self) -> str:
        return f"DebuginfodClient({' '.join(self.urls)})"


def describe_error(exc: BaseException) -> str:
    """A network failure as an operator reads it: name resolution, connection, timeout."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name ({reason.strerror})"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(reason, ConnectionError):
        return f"cannot connect ({reason.strerror or type(reason).__name__})"
    if isinstance(reason, OSError):
        return f"connection failed ({reason.strerror or reason})"
    return str(reason)


def urls_from_environment() -> tuple[str, ...]:
    """DEBUGINFOD_URLS, space separated, as elfutils reads it."""
    return tuple(os.environ.get("DEBUGINFOD_URLS", "").split())
