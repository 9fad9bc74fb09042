"""Who may use a served dashboard: the ``Host`` allow-list, the per-launch token and its cookie.

A served dashboard answers a request only when its ``Host`` (and its ``Origin``, when a browser
sends one) names this machine the way its user reaches it: a loopback name, the served address,
or a name the user added. That defeats DNS rebinding, where a page of ``evil.example`` points its
own name at 127.0.0.1 and then reads the dashboard as a same-origin page. Then, as Jupyter does,
the request needs the launch token: ``?token=`` on the first visit, which sets a cookie and
redirects to the same page without it, then the cookie (or an ``Authorization: token ...``
header for scripts). `install` puts one rule in front of every Tornado route (pages, the
websocket, static files), so nothing runs, not even a Bokeh session, before the check passes.

`Access.session_rights` repeats the check inside a Bokeh session, from the request the session
was created by; Stop and Resume act only when it grants ``control``. Must not import Panel,
``_launch``, ``_worker`` or ``_store.writer``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tornado.httputil import HTTPServerRequest
from tornado.routing import Matcher, Rule
from tornado.web import Application, RequestHandler

from nbbatch._errors import InvalidArgument

__all__ = ["ANY_ADDRESS", "LOOPBACK_NAMES", "TOKEN_ENV", "Access", "Answer", "Rights", "install", "resolve_token"]

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
#: Addresses that listen on every interface: the browser may reach the machine by any of its names.
ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})
TOKEN_ENV = "NBBATCH_DASHBOARD_TOKEN"
_HELP = "open the URL that `nbbatch dashboard` printed (it ends in `?token=...`)"


def resolve_token(token: str | None) -> str:
    """The token given, else ``$NBBATCH_DASHBOARD_TOKEN``, else a new random one.

    Raises:
        InvalidArgument: an empty token (it would let anyone in).
    """
    chosen = token if token is not None else os.environ.get(TOKEN_ENV)
    if chosen is None:
        return secrets.token_hex(24)  # 192 bits, as long as Jupyter's
    if not chosen.strip():
        raise InvalidArgument(f"the dashboard token is empty; pass a long random `--token` or unset `{TOKEN_ENV}`")
    return chosen


def hostname(netloc: str) -> str:
    """The host name of a ``Host`` header or URL netloc, lower case, without port or trailing dot."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):  # [::1]:5006
        end = netloc.find("]")
        return netloc[1:end] if end > 0 else ""
    if netloc.count(":") == 1:
        netloc = netloc.split(":", 1)[0]
    return netloc.rstrip(".")


def _machine_names() -> frozenset[str]:
    names = {socket.gethostname(), socket.getfqdn()}
    return frozenset(n.lower().rstrip(".") for n in names if n)


@dataclass(frozen=True)
class Answer:
    """What the gate says instead of the dashboard: a refusal, or a redirect that sets the cookie."""

    status: int
    text: str = ""
    location: str | None = None


@dataclass(frozen=True)
class Rights:
    """What one Bokeh session may do: see the runs, and press Stop/Resume; ``reason`` says why not."""

    view: bool
    control: bool
    reason: str = ""


@dataclass(frozen=True)
class Access:
    """The access policy of one served dashboard.

    Args:
        address: the address served (``0.0.0.0``/``::`` allow this machine's names and IP literals).
        token: the launch token, or None where Panel's basic auth or OAuth signs users in instead.
        allow_hosts: more host names the browser may use (a reverse proxy's name; ``*`` allows any).
    """

    address: str = "127.0.0.1"
    token: str | None = None
    allow_hosts: frozenset[str] = frozenset()
    machine_names: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def make(cls, address: str, token: str | None, allow_hosts: Iterable[str] = ()) -> Access:
        """An `Access` for ``address``; looks up this machine's names when it listens everywhere."""
        extra = frozenset(hostname(h) if h != "*" else "*" for h in allow_hosts if h.strip())
        names = _machine_names() if address in ANY_ADDRESS else frozenset()
        return cls(address=address, token=token, allow_hosts=extra, machine_names=names)

    @property
    def cookie(self) -> str:
        """The cookie's name: one per token, so two dashboards on one host keep their own."""
        digest = hashlib.sha256((self.token or "").encode()).hexdigest()[:12]
        return f"nbbatch-token-{digest}"

    def url(self, port: int, path: str = "/") -> str:
        """The URL to open: the served address (or 127.0.0.1 for every interface) with the token."""
        host = "127.0.0.1" if self.address in ANY_ADDRESS else self.address
        host = f"[{host}]" if ":" in host else host
        query = f"?token={urllib.parse.quote(self.token)}" if self.token else ""
        return f"http://{host}:{port}{path}{query}"

    def websocket_origins(self, port: int) -> list[str]:
        """Bokeh's own origin list; the gate already checked ``Origin`` by the same rule."""
        if self.address in ANY_ADDRESS or "*" in self.allow_hosts:
            return [f"*:{port}"]  # IP literals cannot be listed; `host_allowed` decides
        names = LOOPBACK_NAMES | {hostname(self.address)} | self.allow_hosts
        return sorted(f"[{n}]:{port}" if ":" in n else f"{n}:{port}" for n in names)

    def host_allowed(self, netloc: str) -> bool:
        """Whether a ``Host`` (or ``Origin``) names this dashboard rather than someone else's site."""
        name = hostname(netloc)
        if not name:
            return False
        if name in LOOPBACK_NAMES or name in self.allow_hosts or "*" in self.allow_hosts:
            return True
        if name == hostname(self.address):
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return self.address in ANY_ADDRESS and name in self.machine_names
        # A page at http://IP:PORT/ belongs to that IP: no DNS name for an attacker to rebind.
        return ip.is_loopback or self.address in ANY_ADDRESS

    def token_matches(self, candidate: str | bytes | None) -> bool:
        """Constant-time comparison with the launch token."""
        if self.token is None or candidate is None:
            return False
        given = candidate.encode() if isinstance(candidate, str) else candidate
        return hmac.compare_digest(given, self.token.encode())

    def check(self, request: HTTPServerRequest) -> Answer | None:
        """None when ``request`` may reach the dashboard; otherwise what to answer instead."""
        host = request.headers.get("Host", "")
        if not self.host_allowed(host):
            return Answer(403, f"nbbatch dashboard: Host {host!r} is not allowed (DNS rebinding protection); "
                               f"if this is how you reach this machine, serve with `--allow-host {hostname(host)}`")
        origin = request.headers.get("Origin")
        if origin is not None and not self.host_allowed(urllib.parse.urlsplit(origin).netloc):
            return Answer(403, f"nbbatch dashboard: Origin {origin!r} is not allowed")
        if self.token is None:
            return None  # Panel's basic auth or OAuth provider signs users in
        cookie = request.cookies.get(self.cookie)
        if (cookie is not None and self.token_matches(cookie.value)) or self._header_ok(request):
            return None
        if any(self.token_matches(v) for v in request.query_arguments.get("token", [])):
            if request.method == "GET" and "upgrade" not in request.headers.get("Connection", "").lower():
                return Answer(302, location=_without_token(request))
            return None
        return Answer(403, f"nbbatch dashboard: this page needs its access token; {_HELP}")

    def _header_ok(self, request: HTTPServerRequest) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() in ("token", "bearer") and self.token_matches(value.strip())

    def session_rights(self, headers: Mapping[str, Any], cookies: Mapping[str, Any],
                       arguments: Mapping[str, Any], user: str | None) -> Rights:
        """What a Bokeh session created by this request may do (the same rules as `check`)."""
        host = str(headers.get("Host", headers.get("host", "")))
        if not self.host_allowed(host):
            return Rights(False, False, f"Host {host!r} is not allowed; add it with `--allow-host`")
        if user:
            return Rights(True, True)
        if self.token is not None:
            given = [cookies.get(self.cookie), *(arguments.get("token") or [])]
            if any(self.token_matches(v) for v in given if isinstance(v, (str, bytes))):
                return Rights(True, True)
            return Rights(False, False, f"this page needs its access token; {_HELP}")
        return Rights(True, False, "Stop and Resume need the dashboard's token or a signed-in user "
                                   "(`nbbatch dashboard` prints a URL with the token)")


def _without_token(request: HTTPServerRequest) -> str:
    """The same path and query minus ``token``; never ``//host`` (that would leave this site)."""
    query = [(k, v) for k, v in urllib.parse.parse_qsl(request.query, keep_blank_values=True) if k != "token"]
    path = "/" + request.path.lstrip("/")
    return path + ("?" + urllib.parse.urlencode(query) if query else "")


class _Gate(Matcher):
    """Matches the requests `Access.check` turns away, so they never reach Bokeh's routes."""

    def __init__(self, access: Access) -> None:
        self.access = access

    def match(self, request: HTTPServerRequest) -> dict[str, Any] | None:
        return {} if self.access.check(request) is not None else None


class _GateHandler(RequestHandler):
    """Answers what `Access.check` decided: 403 with a one-line reason, or the cookie and a redirect."""

    def initialize(self, access: Access) -> None:
        self.access = access

    def prepare(self) -> None:
        answer = self.access.check(self.request)
        if answer is None:  # cannot happen: the gate matched this request
            answer = Answer(403, "nbbatch dashboard: refused")
        if answer.location is not None:
            self.set_cookie(self.access.cookie, self.access.token or "", path="/", httponly=True, samesite="Lax")
            self.redirect(answer.location)
            return
        self.set_status(answer.status)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(answer.text + "\n")


def install(app: Application, access: Access) -> None:
    """Put the gate in front of every route of the Tornado ``app`` (call before it serves)."""
    router = app.default_router
    router.rules.insert(0, router.process_rule(Rule(_Gate(access), _GateHandler, {"access": access})))
