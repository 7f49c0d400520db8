"""The exporter-toolkit web configuration (`web_config_file`, `--web.config.file`): TLS and
basic-auth users, validated with the same one-line errors as the daemon's configuration.
Certificate and key files are loaded while validating, so their errors surface at start or
reload, never at the first scrape."""

from __future__ import annotations

import os
import re
import ssl
from typing import Any

from ..export.server import WebConfig
from ..files.regular import read_regular
from .settings import Reader, load_yaml, read_text

_BCRYPT_RE = re.compile(rb"\$2[aby]?\$\d\d\$[./A-Za-z0-9]{53}")
_CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
_UNSUPPORTED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                 "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
             "max_version")




def load_web_config(path: str | None) -> WebConfig:
    """Read and validate an exporter-toolkit web config; None gives plain HTTP, no auth.
    Certificate and key files are loaded now, so their errors surface here."""
    if path is None:
        return WebConfig()
    return _WebValidator(path).web_config(load_yaml(read_text(path), path))


class _WebValidator(Reader):
    def web_config(self, raw: dict[str, Any]) -> WebConfig:
        raw = self.mapping(raw, "", ("tls_server_config", "basic_auth_users"))
        tls = raw.get("tls_server_config")
        users = raw.get("basic_auth_users")
        return WebConfig(tls=None if tls is None else self._tls(tls),
                         users={} if users is None else self._users(users),
                         source=self.source)

    def _file(self, raw: dict[str, Any], key: str) -> str | None:
        """A file path; relative paths are relative to the web config file, as in the toolkit."""
        value = self.string(raw.get(key), f"tls_server_config.{key}", nullable=True)
        if not value:
            return None
        path = os.path.join(os.path.dirname(os.path.abspath(self.source)), value)
        try:
            read_regular(path)  # OpenSSL reads by path: refuse a FIFO, device or huge file first
        except FileNotFoundError:
            raise self.fail(f"tls_server_config.{key}", f"no such file: {path}")
        except OSError as err:
            raise self.fail(f"tls_server_config.{key}", f"cannot read {path}: {err.strerror}")
        return path

    def _version(self, raw: dict[str, Any], key: str, default: str) -> ssl.TLSVersion:
        name = self.string(raw.get(key, default), f"tls_server_config.{key}")
        if name not in _TLS_VERSIONS:
            raise self.fail(f"tls_server_config.{key}",
                            f"must be one of {', '.join(_TLS_VERSIONS)}, got {name!r}")
        return _TLS_VERSIONS[name]

    def _tls(self, value: Any) -> ssl.SSLContext:
        raw = self.mapping(value, "tls_server_config", _TLS_KEYS)
        cert, key = self._file(raw, "cert_file"), self._file(raw, "key_file")
        if not cert or not key:
            raise self.fail("tls_server_config", "cert_file and key_file are both required")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = self._version(raw, "min_version", "TLS12")
        ctx.maximum_version = self._version(raw, "max_version", "TLS13")
        if ctx.minimum_version > ctx.maximum_version:
            raise self.fail("tls_server_config.min_version", "is above max_version")
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as err:
            raise self.fail("tls_server_config.cert_file",
                            f"cannot load {cert} with key {key}: {_ssl_reason(err)}")
        self._client_auth(raw, ctx)
        return ctx

    def _client_auth(self, raw: dict[str, Any], ctx: ssl.SSLContext) -> None:
        key = "tls_server_config.client_auth_type"
        mode = self.string(raw.get("client_auth_type", "NoClientCert"), key)
        if mode in _UNSUPPORTED_CLIENT_AUTH:
            raise self.fail(key, f"{mode} is not supported (client certificates are always "
                            "verified): use VerifyClientCertIfGiven or RequireAndVerifyClientCert")
        if mode not in _CLIENT_AUTH:
            raise self.fail(key, f"must be one of {', '.join(_CLIENT_AUTH)}, got {mode!r}")
        ca = self._file(raw, "client_ca_file")
        if mode != "NoClientCert" and not ca:
            raise self.fail("tls_server_config.client_ca_file", f"required by {mode}")
        if ca:
            try:
                ctx.load_verify_locations(cafile=ca)
            except (ssl.SSLError, OSError) as err:
                raise self.fail("tls_server_config.client_ca_file",
                                f"cannot load {ca}: {_ssl_reason(err)}")
        ctx.verify_mode = _CLIENT_AUTH[mode]

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


def _ssl_reason(err: Exception) -> str:
    return getattr(err, "reason", None) or getattr(err, "strerror", None) or str(err)

