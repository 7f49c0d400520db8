"""A debuginfod-protocol server on loopback (http.server in a thread), for the client's
tests and the capture pass's."""

from __future__ import annotations

import http.server
import threading

WAIT = 30.0  # a hang guard, never a timing claim


class DebuginfodServer:
    """A debuginfod-protocol server on loopback: `files` by build-id are served, `codes` by
    build-id answered with that status, any other build-id 404; `hold` build-ids get
    half their file and then wait for `release`; `endless` build-ids get bytes until the
    client hangs up. `asked` lists the paths requested."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.codes: dict[str, int] = {}
        self.hold: set[str] = set()
        self.endless: set[str] = set()
        self.release = threading.Event()
        self.asked: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.asked.append(self.path)
                parts = self.path.split("/")
                build_id = parts[2] if len(parts) == 4 and parts[3] == "debuginfo" else ""
                if build_id in server.endless:
                    self.send_response(200)
                    self.end_headers()
                    try:
                        while True:
                            self.wfile.write(b"e" * 65536)
                    except OSError:
                        return
                body = server.files.get(build_id)
                code = server.codes.get(build_id, 200 if body is not None else 404)
                self.send_response(code)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                if build_id in server.hold:
                    half = len(body) // 2
                    self.wfile.write(body[:half])
                    self.wfile.flush()
                    server.release.wait(WAIT)
                    self.wfile.write(body[half:])
                else:
                    self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_port}"
        self.thread = threading.Thread(target=self.http.serve_forever, args=(0.01,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.http.shutdown()
        self.http.server_close()
