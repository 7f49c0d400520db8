"""The exporter-toolkit web configuration (`web_config_file`, `--web.config.file`): TLS,
HTTP headers, basic-auth users, paths without auth and a rate limit, validated with the same
one-line errors as the daemon's configuration. Certificate and key files are loaded while
validating, so their errors surface at start or reload, never at the first scrape; while
serving, they are read again on the next connection after they change on disk (as the
toolkit does), and a broken replacement keeps the last good one, with a warning."""

from __future__ import annotations

import logging
import os
import re
import ssl
from dataclasses import dataclass
from typing import Any

from ..export.server import RateLimit, WebConfig
from ..files.regular import read_regular
from .settings import ConfigError, Reader, load_yaml, read_text

log = logging.getLogger(__name__)

_BCRYPT_RE = re.compile(rb"\$2[aby]?\$\d\d\$[./A-Za-z0-9]{53}")
_CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
_UNSUPPORTED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                 "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_TLS_KEYS = ("cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type",
             "client_ca_file", "client_allowed_sans", "min_version", "max_version",
             "cipher_suites", "prefer_server_cipher_suites", "curve_preferences")
_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users",
             "basic_auth_excluded_paths", "rate_limit")
# Go's crypto/tls names of the TLS 1.2 suites, as OpenSSL names them. TLS 1.3 suites are not
# configurable in Go either (the toolkit applies the list up to TLS 1.2): accepted, no effect.
_CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
_TLS13_CIPHERS = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                  "TLS_CHACHA20_POLY1305_SHA256")
# Python's ssl sets one ECDH curve (SSL_CTX_set_tmp_ecdh), a NIST one: a list of one is honoured.
_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1"}
_UNSETTABLE_CURVES = ("X25519", "X25519MLKEM768")
# The toolkit's headers and, where it checks them, their values.
_HEADERS = {"Content-Security-Policy": None, "X-Frame-Options": ("deny", "sameorigin"),
            "X-Content-Type-Options": ("nosniff",), "X-XSS-Protection": None,
            "Strict-Transport-Security": None}


def load_web_config(path: str | None) -> WebConfig:
    """Read and validate an exporter-toolkit web config; None gives plain HTTP, no auth.
    Certificate and key files are loaded now, so their errors surface here."""
    if path is None:
        return WebConfig()
    return _WebValidator(path).web_config(load_yaml(read_text(path), path))


@dataclass(frozen=True)
class TlsOptions:
    """A validated tls_server_config: files (absolute paths) or inline PEM, and the
    handshake settings."""

    source: str
    cert_file: str | None
    key_file: str | None
    client_ca_file: str | None
    cert: str | None
    key: str | None
    client_ca: str | None
    client_auth: str
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion
    ciphers: tuple[str, ...]
    prefer_server_ciphers: bool
    curve: str | None
    allowed_sans: tuple[str, ...]

    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.cert_file, self.key_file, self.client_ca_file) if f)

    def build(self) -> ssl.SSLContext:
        """A server context from the files as they are now; one-line ConfigError if not."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version, ctx.maximum_version = self.min_version, self.max_version
        try:
            if self.ciphers:
                ctx.set_ciphers(":".join(self.ciphers))
            if self.curve:
                ctx.set_ecdh_curve(self.curve)
        except (ssl.SSLError, ValueError) as err:
            raise ConfigError(self.source, "tls_server_config",
                              f"OpenSSL refuses it: {_ssl_reason(err)}")
        if self.prefer_server_ciphers:
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        else:
            ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        for key, path in (("cert_file", self.cert_file), ("key_file", self.key_file)):
            if path:
                _regular(self.source, key, path)
        with _Pem(self.cert, self.cert_file) as cert, _Pem(self.key, self.key_file) as key:
            try:  # without a password callback, OpenSSL prompts on the terminal
                ctx.load_cert_chain(cert, key, password=self._no_password)
            except (ssl.SSLError, OSError) as err:
                inline = "(inline PEM)"
                raise ConfigError(self.source, "tls_server_config.cert" if self.cert else
                                  "tls_server_config.cert_file",
                                  f"cannot load the certificate {self.cert_file or inline} "
                                  f"with the key {self.key_file or inline}: {_ssl_reason(err)}")
        try:
            if self.client_ca is not None:
                ctx.load_verify_locations(cadata=self.client_ca)
            elif self.client_ca_file:
                _regular(self.source, "client_ca_file", self.client_ca_file)
                ctx.load_verify_locations(cafile=self.client_ca_file)
        except (ssl.SSLError, OSError, ValueError) as err:
            raise ConfigError(self.source, "tls_server_config.client_ca" if self.client_ca else
                              "tls_server_config.client_ca_file",
                              f"cannot load {self.client_ca_file or 'the inline PEM'}: "
                              f"{_ssl_reason(err)}")
        ctx.verify_mode = _CLIENT_AUTH[self.client_auth]
        return ctx


    def _no_password(self) -> str:
        if self.key is not None:
            raise ConfigError(self.source, "tls_server_config.key", "the inline PEM is "
                              "encrypted: encrypted private keys are not supported")
        raise ConfigError(self.source, "tls_server_config.key_file", f"{self.key_file} is "
                          "encrypted: encrypted private keys are not supported")


class ReloadingTls:
    """The TLS context of a web config, built again on the next connection after one of
    its files changed (identity, size or modification time); until a replacement loads, the
    last good context is served and the failure is logged once per change."""

    def __init__(self, options: TlsOptions) -> None:
        self.options = options
        self.allowed_sans = options.allowed_sans
        self._stamp = self._stamps()
        self._context = options.build()
        self._failed: tuple | None = None

    def _stamps(self) -> tuple:
        stamps = []
        for path in self.options.files():
            try:
                st = os.stat(path)
                stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            except OSError as err:
                stamps.append(err.errno)
        return tuple(stamps)

    def context(self) -> ssl.SSLContext:
        """Called by the event loop alone (for each new connection): no lock."""
        stamp = self._stamps()
        if stamp == self._stamp or stamp == self._failed:
            return self._context
        try:
            self._context = self.options.build()
        except ConfigError as err:
            self._failed = stamp
            log.warning("TLS files changed but cannot be loaded; serving the previous "
                        "certificate: %s", err)
            return self._context
        self._stamp, self._failed = stamp, None
        log.info("TLS files changed: loaded %s", ", ".join(self.options.files()))
        return self._context


class _Pem:
    """A path OpenSSL can read: the file itself, or inline PEM in an anonymous memory file."""

    def __init__(self, inline: str | None, path: str | None) -> None:
        self.inline, self.path, self._fd = inline, path, -1

    def __enter__(self) -> str:
        if self.inline is None:
            assert self.path
            return self.path
        self._fd = os.memfd_create("ctprofd-pem", os.MFD_CLOEXEC)
        os.write(self._fd, self.inline.encode())
        return f"/proc/self/fd/{self._fd}"

    def __exit__(self, *_: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)


def _regular(source: str, key: str, path: str) -> None:
    """OpenSSL reads by path: refuse a FIFO, a device or a huge file first."""
    try:
        read_regular(path)
    except FileNotFoundError:
        raise ConfigError(source, f"tls_server_config.{key}", f"no such file: {path}")
    except OSError as err:
        raise ConfigError(source, f"tls_server_config.{key}",
                          f"cannot read {path}: {err.strerror}")


class _WebValidator(Reader):
    def web_config(self, raw: dict[str, Any]) -> WebConfig:
        raw = self.mapping(raw, "", _TOP_KEYS)
        tls = raw.get("tls_server_config")
        users = raw.get("basic_auth_users")
        return WebConfig(tls=None if tls is None else ReloadingTls(self._tls(tls)),
                         users={} if users is None else self._users(users),
                         excluded_paths=self._paths(raw.get("basic_auth_excluded_paths")),
                         headers=self._http(raw.get("http_server_config")),
                         rate_limit=self._rate_limit(raw.get("rate_limit")),
                         source=self.source)

    def _file(self, raw: dict[str, Any], key: str) -> str | None:
        """A file path; relative paths are relative to the web config file, as in the toolkit."""
        value = self.string(raw.get(key), f"tls_server_config.{key}", nullable=True)
        if not value:
            return None
        path = os.path.join(os.path.dirname(os.path.abspath(self.source)), value)
        _regular(self.source, key, path)
        return path

    def _pem(self, raw: dict[str, Any], key: str, file_key: str) -> str | None:
        value = self.string(raw.get(key), f"tls_server_config.{key}", nullable=True)
        if value and raw.get(file_key):
            raise self.fail(f"tls_server_config.{key}", f"give {key} or {file_key}, not both")
        return value or None

    def _version(self, raw: dict[str, Any], key: str, default: str) -> ssl.TLSVersion:
        name = self.string(raw.get(key, default), f"tls_server_config.{key}")
        if name not in _TLS_VERSIONS:
            raise self.fail(f"tls_server_config.{key}",
                            f"must be one of {', '.join(_TLS_VERSIONS)}, got {name!r}")
        return _TLS_VERSIONS[name]

    def _tls(self, value: Any) -> TlsOptions:
        raw = self.mapping(value, "tls_server_config", _TLS_KEYS)
        cert, key = self._pem(raw, "cert", "cert_file"), self._pem(raw, "key", "key_file")
        cert_file, key_file = self._file(raw, "cert_file"), self._file(raw, "key_file")
        if not (cert or cert_file) or not (key or key_file):
            raise self.fail("tls_server_config", "cert_file and key_file are both required "
                            "(or cert and key inline)")
        minimum = self._version(raw, "min_version", "TLS12")
        maximum = self._version(raw, "max_version", "TLS13")
        if minimum > maximum:
            raise self.fail("tls_server_config.min_version", "is above max_version")
        mode, client_ca_file, client_ca = self._client_auth(raw)
        options = TlsOptions(
            source=self.source, cert_file=cert_file, key_file=key_file,
            client_ca_file=client_ca_file, cert=cert, key=key, client_ca=client_ca,
            client_auth=mode, min_version=minimum, max_version=maximum,
            ciphers=self._ciphers(raw.get("cipher_suites")),
            prefer_server_ciphers=self._bool(raw.get("prefer_server_cipher_suites", True),
                                             "tls_server_config.prefer_server_cipher_suites"),
            curve=self._curve(raw.get("curve_preferences")),
            allowed_sans=self._sans(raw.get("client_allowed_sans"), mode))
        return options

    def _client_auth(self, raw: dict[str, Any]) -> tuple[str, str | None, str | None]:
        key = "tls_server_config.client_auth_type"
        mode = self.string(raw.get("client_auth_type", "NoClientCert"), key)
        if mode in _UNSUPPORTED_CLIENT_AUTH:
            raise self.fail(key, f"{mode} is not supported (Python's ssl verifies every client "
                            "certificate it accepts): use VerifyClientCertIfGiven or "
                            "RequireAndVerifyClientCert")
        if mode not in _CLIENT_AUTH:
            raise self.fail(key, f"must be one of {', '.join(_CLIENT_AUTH)}, got {mode!r}")
        ca = self._pem(raw, "client_ca", "client_ca_file")
        ca_file = self._file(raw, "client_ca_file")
        if mode != "NoClientCert" and not (ca or ca_file):
            raise self.fail("tls_server_config.client_ca_file", f"required by {mode}")
        return mode, ca_file, ca

    def _ciphers(self, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        names = []
        for path, item in self.items(value, "tls_server_config.cipher_suites"):
            name = self.string(item, path)
            if name in _TLS13_CIPHERS:
                continue
            if name not in _CIPHERS:
                raise self.fail(path, f"unknown or insecure cipher suite {name!r} (known: "
                                f"{', '.join((*_CIPHERS, *_TLS13_CIPHERS))})")
            names.append(_CIPHERS[name])
        return tuple(names)

    def _curve(self, value: Any) -> str | None:
        key = "tls_server_config.curve_preferences"
        if value is None:
            return None
        names = [self.string(item, path) for path, item in self.items(value, key)]
        if not names:
            return None
        if len(names) > 1 or names[0] in _UNSETTABLE_CURVES:
            raise self.fail(key, "Python's ssl module can restrict the handshake to one NIST "
                            f"curve only: list one of {', '.join(_CURVES)}, or none for "
                            "OpenSSL's defaults (X25519 first)")
        if names[0] not in _CURVES:
            raise self.fail(key, f"unknown curve {names[0]!r} (known: {', '.join(_CURVES)}, "
                            f"{', '.join(_UNSETTABLE_CURVES)})")
        return _CURVES[names[0]]

    def _sans(self, value: Any, mode: str) -> tuple[str, ...]:
        if value is None:
            return ()
        sans = self.strings(value, "tls_server_config.client_allowed_sans")
        if sans and mode != "RequireAndVerifyClientCert":
            raise self.fail("tls_server_config.client_allowed_sans",
                            "needs client_auth_type: RequireAndVerifyClientCert")
        return sans

    def _bool(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "expected true or false")
        return value

    def _http(self, value: Any) -> tuple[tuple[str, str], ...]:
        """Headers to send; `http2` is accepted (HTTP/2 is negotiated by ALPN, and ctprofd
        offers HTTP/1 only, which every client falls back to)."""
        if value is None:
            return ()
        raw = self.mapping(value, "http_server_config", ("http2", "headers"))
        if "http2" in raw:
            self._bool(raw["http2"], "http_server_config.http2")
        headers = raw.get("headers")
        if headers is None:
            return ()
        headers = self.mapping(headers, "http_server_config.headers", tuple(_HEADERS))
        sent = []
        for name, text in headers.items():
            key = f"http_server_config.headers.{name}"
            text = self.string(text, key, nullable=True) or ""
            allowed = _HEADERS[name]
            if any(c in text for c in "\r\n\0"):
                raise self.fail(key, "a header value is one line")
            if bad := [c for c in text if ord(c) > 0xFF]:
                raise self.fail(key, f"{bad[0]!r} cannot be sent: a header value is "
                                "latin-1 text")
            if text and allowed and text.lower() not in allowed:
                raise self.fail(key, f"must be one of {', '.join(allowed)}, got {text!r}")
            if text:  # blank: unset, as in the toolkit
                sent.append((name, text))
        return tuple(sent)

    def _paths(self, value: Any) -> tuple[str, ...]:
        return () if value is None else self.strings(value, "basic_auth_excluded_paths")

    def _rate_limit(self, value: Any) -> RateLimit | None:
        if value is None:
            return None
        raw = self.mapping(value, "rate_limit", ("interval", "burst"))
        interval = _duration(self, raw.get("interval", "0s"), "rate_limit.interval")
        burst = self.integer(raw.get("burst", 0), "rate_limit.burst", 0)
        if interval == 0:
            return None  # the toolkit's "0 disables"
        return RateLimit(interval, max(1, burst))

    def _users(self, value: Any) -> dict[str, bytes]:
        if not isinstance(value, dict):
            raise self.fail("basic_auth_users", "expected a mapping of user name to bcrypt hash")
        users = {}
        for name, hashed in value.items():
            key = f"basic_auth_users.{name}"
            if not isinstance(name, str) or ":" in name:
                raise self.fail(key, "user names are strings without ':'")
            text = self.string(hashed, key).encode()
            if not _BCRYPT_RE.fullmatch(text):
                raise self.fail(key, "not a bcrypt hash ($2b$<cost>$ followed by 53 characters)")
            users[name] = text
        return users


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(reader: Reader, value: Any, key: str) -> float:
    """A Prometheus duration (`1s`, `500ms`, `1m30s`) in seconds, or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return reader.number(value, key, 0)
    text = reader.string(value, key)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise reader.fail(key, f"not a duration such as 1s or 500ms: {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _ssl_reason(err: Exception) -> str:
    return getattr(err, "reason", None) or getattr(err, "strerror", None) or str(err)
