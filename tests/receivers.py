"""Real local receivers for notifications: an SMTP server (aiosmtpd) and an HTTP server that records
every request (JSON webhooks, healthchecks pings)."""

from __future__ import annotations

import email
import threading
from email import policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller

from tests.support import free_port


class MailReceiver:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.port = free_port()
        receiver = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                receiver.messages.append(email.message_from_bytes(envelope.content, policy=policy.default))
                return "250 OK"

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def url(self, to: str = "dba@example.com") -> str:
        return f"mailto://127.0.0.1:{self.port}?smtp=127.0.0.1&mode=insecure&from=pgbeat@example.com&to={to}"

    def texts(self) -> list[tuple[str, str]]:
        return [(m["Subject"], m.get_body(preferencelist=("plain", "html")).get_content()) for m in self.messages]

    def stop(self) -> None:
        self.controller.stop()


class HttpReceiver:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                receiver.requests.append((self.command, self.path, self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")

            do_POST = do_GET = do_HEAD = handle_any

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.requests]

    def stop(self) -> None:
        self.server.shutdown()
