"""Where an NBD server is and how to talk to it: the forms the ``nbd`` driver accepts.

- ``/path/to/socket`` (any name with a ``/``): a UNIX socket, default export;
- ``host:port`` or ``[v6addr]:port``: TCP, default export;
- ``nbd://host[:port][/export]``, ``nbds://...`` (TLS): TCP (port 10809 by default);
- ``nbd+unix:///export?socket=PATH``, ``nbds+unix:///export?socket=PATH``: a UNIX socket;
- ``NAME`` (neither a ``/`` nor a ``:``): a connected socket another process handed to
  this one under that name (:mod:`blktap.nbdclient.passed`), default export. It is taken
  when the driver connects: a reconnect waits for a new one passed under the same name.

URI query parameters, as libnbd names them: ``socket`` (the UNIX socket),
``tls-certificates=DIR`` (a directory in the layout qemu and nbdkit use: ``ca-cert.pem``
to verify the server, and ``client-cert.pem`` + ``client-key.pem`` if the server asks for
a client certificate), ``tls-verify-peer=false`` (encrypt, trust any certificate) and
``tls-hostname=NAME`` (the name the certificate must carry; by default the URI's host,
none over a UNIX socket, where only the CA is checked).
"""

from __future__ import annotations

import errno
import os
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from blktap.errors import NbdClientError, UsageError
from blktap.nbdclient.passed import check_name

DEFAULT_PORT = 10809
SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
_QUERY_KEYS = {"socket", "tls-certificates", "tls-verify-peer", "tls-hostname"}


@dataclass(frozen=True)
class Address:
    unix: str | None = None
    host: str = ""
    port: int = DEFAULT_PORT
    export: str = ""
    tls: bool = False
    tls_certificates: str | None = None
    tls_verify: bool = True
    tls_hostname: str | None = None
    passed: str | None = None  # the name of a socket handed over (nbdclient<pid>)

    def __str__(self) -> str:
        if self.passed is not None:
            return f"passed socket {self.passed!r}"
        where = self.unix if self.unix is not None else f"{self.host}:{self.port}"
        name = f" export {self.export!r}" if self.export else ""
        return f"{where}{name}{' (TLS)' if self.tls else ''}"

    def ssl_context(self) -> ssl.SSLContext:
        """The client context for STARTTLS (TLS 1.2 or later)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if not self.tls_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif self.tls_certificates:
                ctx.load_verify_locations(os.path.join(self.tls_certificates, "ca-cert.pem"))
            else:
                ctx.load_default_certs()
            if self.tls_verify:
                ctx.check_hostname = self.server_hostname is not None
            if self.tls_certificates:
                cert = os.path.join(self.tls_certificates, "client-cert.pem")
                key = os.path.join(self.tls_certificates, "client-key.pem")
                if os.path.exists(cert):
                    ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            code = getattr(exc, "errno", None)
            raise NbdClientError(f"nbd {self}: TLS certificates: {exc}",
                                 code if isinstance(code, int) and code > 0
                                 else errno.EINVAL) from None
        return ctx

    @property
    def server_hostname(self) -> str | None:
        """The name the server's certificate is checked against (None: CA only)."""
        if self.tls_hostname:
            return self.tls_hostname
        return self.host or None


def _split_host_port(text: str, spec: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"nbd:{spec}: bad address {text!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.rpartition(":")
    if not host:
        raise UsageError(f"nbd:{spec}: no host in {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"nbd:{spec}: bad port {port_text!r}") from None
    if not 0 < port < 65536:
        raise UsageError(f"nbd:{spec}: port {port} out of range")
    return host, port


def _parse_uri(spec: str) -> Address:
    try:
        url = urlsplit(spec)
        port = url.port
    except ValueError as exc:
        raise UsageError(f"nbd:{spec}: {exc}") from None
    scheme = url.scheme
    tls = scheme.startswith("nbds")
    query = parse_qs(url.query, keep_blank_values=True)
    unknown = set(query) - _QUERY_KEYS
    if unknown:
        raise UsageError(f"nbd:{spec}: unknown URI parameter(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(_QUERY_KEYS))})")

    def one(key: str) -> str | None:
        values = query.get(key)
        return values[-1] if values else None

    verify_text = (one("tls-verify-peer") or "true").lower()
    if verify_text not in ("true", "false", "1", "0", "yes", "no"):
        raise UsageError(f"nbd:{spec}: tls-verify-peer must be true or false")
    export = unquote(url.path[1:] if url.path.startswith("/") else url.path)
    common = {"export": export, "tls": tls, "tls_certificates": one("tls-certificates"),
              "tls_verify": verify_text in ("true", "1", "yes"),
              "tls_hostname": one("tls-hostname")}
    if scheme.endswith("+unix"):
        sock = one("socket")
        if not sock:
            raise UsageError(f"nbd:{spec}: {scheme} needs ?socket=PATH")
        if url.hostname:
            raise UsageError(f"nbd:{spec}: {scheme} takes no host")
        return Address(unix=sock, **common)  # type: ignore[arg-type]
    if one("socket") is not None:
        raise UsageError(f"nbd:{spec}: socket= is for nbd+unix:// URIs")
    if not url.hostname:
        raise UsageError(f"nbd:{spec}: no host")
    return Address(host=url.hostname, port=port or DEFAULT_PORT, **common)  # type: ignore[arg-type]


def parse(spec: str) -> Address:
    """The address an ``nbd:`` driver path names (see the module's doc); UsageError if
    it names none."""
    if not spec:
        raise UsageError("nbd: no server named")
    scheme, sep, _ = spec.partition("://")
    if sep and scheme in SCHEMES:
        return _parse_uri(spec)
    if sep:
        raise UsageError(f"nbd:{spec}: unknown URI scheme {scheme!r} "
                         f"(use {', '.join(s + '://' for s in SCHEMES)})")
    if "/" in spec:
        return Address(unix=spec)
    if ":" in spec:
        host, port = _split_host_port(spec, spec)
        return Address(host=host, port=port)
    why = check_name(spec)
    if why is not None:
        raise UsageError(f"nbd:{spec}: not a socket path (with a '/'), host:port, "
                         f"nbd:// URI or the name of a passed socket ({why})")
    return Address(passed=spec)


__all__ = ["DEFAULT_PORT", "SCHEMES", "Address", "parse"]
