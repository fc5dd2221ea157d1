"""``cipherfeed ui``: the feed page on loopback only, served by the device process (it holds the HE
secret key, so it cannot live in the gateway).

Other pages in the same browser and DNS-rebinding sites are kept out: the server binds a loopback
address only and answers only requests whose ``Host`` is that address and port; every API call
carries the per-run token (a custom header, which a cross-origin page can send only after a CORS
preflight this server never grants) that is printed in the URL's fragment (never sent to any
server, not in logs or Referer); an ``Origin`` or ``Sec-Fetch-Site`` that is not this page is
refused. Bodies are small JSON with a size cap.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cipherfeed.client.feedpage import FeedPage, PageError

log = logging.getLogger("cipherfeed.ui")
STATIC = Path(__file__).with_name("ui_static")
FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/feed.js": ("feed.js", "text/javascript; charset=utf-8"),
         "/style.css": ("style.css", "text/css; charset=utf-8")}  # fmt: skip
MAX_BODY_BYTES = 64 * 1024
TOKEN_HEADER = "X-Cipherfeed-Token"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")  # fmt: skip


def require_loopback(host: str) -> str:
    """``host`` if it names a loopback address; ValueError otherwise (the page holds a device's
    decrypted feed and its signing session: never on a network interface)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ValueError(f"the feed page listens on loopback only, not {host!r}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class FeedPageServer:
    def __init__(self, page: FeedPage, host: str = "127.0.0.1", port: int = 0) -> None:
        host = require_loopback(host)
        self.page = page
        self.token = secrets.token_urlsafe(32)
        handler = type("Handler", (_Handler,), {"app": self})
        family_v6 = ":" in host
        self.httpd = (_Server6 if family_v6 else _Server)((host, port), handler)
        self.port = int(self.httpd.server_address[1])
        shown = f"[{host}]" if family_v6 else host
        self.origin = f"http://{shown}:{self.port}"
        self.allowed_hosts = {f"{shown}:{self.port}"} | ({f"localhost:{self.port}"} if host == "127.0.0.1" else set())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address with the run's token in the fragment (the browser keeps it)."""
        return f"{self.origin}/#token={self.token}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="feed-page", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    app: FeedPageServer
    server_version = "cipherfeed-ui"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # --- checks ------------------------------------------------------------------------------

    def _host_ok(self) -> bool:
        return self.headers.get("Host", "") in self.app.allowed_hosts

    def _same_origin(self) -> bool:
        origin = self.headers.get("Origin")
        if origin is not None and origin != self.app.origin and urlsplit(origin).netloc not in self.app.allowed_hosts:
            return False
        site = self.headers.get("Sec-Fetch-Site")
        return site in (None, "same-origin", "none")

    def _token_ok(self) -> bool:
        return hmac.compare_digest(self.headers.get(TOKEN_HEADER, "").encode(), self.app.token.encode())

    # --- responses ---------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        self._json(status, {"error": message})

    def _read_json(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise PageError("bad Content-Length") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise PageError(f"a request body is at most {MAX_BODY_BYTES} bytes")
        if length and not self.headers.get("Content-Type", "").startswith("application/json"):
            raise PageError("bodies are application/json")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply
            raise PageError("the body is not JSON") from None
        if not isinstance(body, dict):
            raise PageError("the body is a JSON object")
        return body

    # --- routing -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        if not self._host_ok():  # DNS rebinding: another name resolving to loopback
            self._refuse(HTTPStatus.MISDIRECTED_REQUEST, "unexpected Host")
            return
        path = urlsplit(self.path).path
        if method == "GET" and path in FILES:
            name, content_type = FILES[path]
            self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), content_type)
            return
        if not path.startswith("/api/"):
            self._refuse(HTTPStatus.NOT_FOUND, "not found")
            return
        if not self._same_origin():
            self._refuse(HTTPStatus.FORBIDDEN, "cross-origin request")
            return
        if not self._token_ok():
            self._refuse(HTTPStatus.UNAUTHORIZED, "missing or wrong page token")
            return
        try:
            self._api(method, path)
        except PageError as exc:
            self._refuse(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception as exc:  # one line for the page; the server keeps serving
            log.warning("feed page %s %s failed: %s", method, path, type(exc).__name__)
            self._refuse(HTTPStatus.BAD_GATEWAY, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")

    def _api(self, method: str, path: str) -> None:
        page = self.app.page
        if method == "GET" and path == "/api/status":
            self._json(HTTPStatus.OK, page.status())
        elif method == "POST" and path == "/api/signin":
            self._json(HTTPStatus.ACCEPTED, page.sign_in(str(self._read_json().get("user", ""))).view())
        elif method == "POST" and path == "/api/wallet/challenge":
            body = self._read_json()
            self._json(HTTPStatus.OK, page.wallet_challenge(str(body.get("address", "")), str(body.get("user", ""))))
        elif method == "POST" and path == "/api/wallet/signin":
            self._json(HTTPStatus.ACCEPTED, page.wallet_sign_in(str(self._read_json().get("signature", ""))).view())
        elif method == "POST" and path == "/api/signout":
            self._read_json()
            page.sign_out()
            self._json(HTTPStatus.OK, page.status())
        elif method == "GET" and path == "/api/history":
            self._json(HTTPStatus.OK, {"user": page.user, "entries": page.history_view()})
        elif method == "POST" and path == "/api/feed":
            body = self._read_json()
            k, cap = body.get("k", 10), body.get("per_creator", 2)
            if type(k) is not int or type(cap) is not int:
                raise PageError("k and per_creator are integers")
            self._json(HTTPStatus.ACCEPTED, page.request_feed(k, cap).view())
        elif method == "GET" and path.startswith("/api/jobs/"):
            self._json(HTTPStatus.OK, page.job(path.removeprefix("/api/jobs/")).view())
        elif method == "POST" and path.startswith("/api/receipts/") and path.endswith("/verify"):
            self._read_json()
            self._json(HTTPStatus.OK, page.verify(path.removeprefix("/api/receipts/").removesuffix("/verify")))
        else:
            self._refuse(HTTPStatus.NOT_FOUND, "no such API")
