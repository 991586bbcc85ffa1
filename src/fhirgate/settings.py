"""Node settings (Kong's `kong.conf` equivalent): one typed model.

Precedence (DECISIONS.md): CLI flags, then `FHIRGATE_*` environment variables, then a
`fhirgate.toml` file (``--settings FILE`` or ``./fhirgate.toml``), then defaults. Entities
(services, routes, consumers, plugins) never live here: they come from the declarative file or
the store. `docs/settings.md` is generated from this model (`python -m fhirgate.settings`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fhirgate.errors import ConfigError, ConfigIssue

_TOML_FILE: list[Path] = [Path("fhirgate.toml")]


def _default_workers() -> int:
    return os.cpu_count() or 1


class Settings(BaseSettings):
    """Every node setting, with its default."""

    model_config = SettingsConfigDict(
        env_prefix="FHIRGATE_",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    # --- listeners -------------------------------------------------------------------------
    listen: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["0.0.0.0:8000"],
        description="Proxy listeners, HOST:PORT (Kong's proxy_listen).",
    )
    listen_ssl: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="TLS proxy listeners, HOST:PORT. Defaults to 0.0.0.0:8443 when ssl_cert is set.",
    )
    ssl_cert: Path | None = Field(None, description="PEM certificate (chain) for the TLS listeners.")
    ssl_cert_key: Path | None = Field(None, description="PEM private key for ssl_cert.")
    status_listen: str | None = Field(
        None, description="Status listener HOST:PORT serving /status and /metrics; off when unset."
    )
    workers: int = Field(
        default_factory=_default_workers,
        ge=1,
        le=256,
        description="Worker processes sharing the listeners (SO_REUSEPORT). Default: number of cores.",
    )

    # --- client side limits and timeouts ---------------------------------------------------
    max_request_line: int = Field(
        8192, ge=256, description="Longest request line in bytes; longer is refused with 414."
    )
    max_header_size: int = Field(
        32768, ge=1024, description="Largest total size of request headers in bytes; more is 431."
    )
    max_headers: int = Field(100, ge=8, description="Most request header fields; more is 431.")
    client_header_timeout: int = Field(
        60000, ge=1, description="ms to receive a whole request head (request line and headers)."
    )
    client_body_timeout: int = Field(
        60000, ge=1, description="ms allowed between two reads of a request body."
    )
    keepalive_timeout: int = Field(
        60000, ge=0, description="ms an idle client keep-alive connection stays open (0: no keep-alive)."
    )
    keepalive_requests: int = Field(
        10000, ge=1, description="Requests served on one client connection before it is closed."
    )
    client_max_buffer: int = Field(
        1048576,
        ge=65536,
        description="Bytes of request body held while the upstream is not yet writable (backpressure).",
    )

    # --- upstream side ---------------------------------------------------------------------
    upstream_keepalive_pool_size: int = Field(
        512, ge=0, description="Idle upstream connections kept per upstream host (0: no reuse)."
    )
    upstream_keepalive_idle_timeout: int = Field(
        60, ge=0, description="Seconds an idle upstream connection is kept."
    )
    upstream_keepalive_max_requests: int = Field(
        10000, ge=0, description="Requests per upstream connection before it is closed (0: no limit)."
    )
    ssl_trusted_certificate: Path | None = Field(
        None, description="PEM CA bundle to verify HTTPS upstreams; default: the system's trust store."
    )

    # --- forwarding ------------------------------------------------------------------------
    trusted_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="IPs/CIDRs whose X-Forwarded-* headers are believed (Kong's trusted_ips).",
    )
    real_ip_header: str = Field(
        "X-Real-IP",
        description="Header giving the client's address when the peer is trusted (or X-Forwarded-For).",
    )
    headers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["server_tokens", "latency_tokens", "request_id"],
        description=(
            "Headers the gateway adds (Kong's `headers`): server_tokens (Via, Server), latency_tokens "
            "(X-Fhirgate-Upstream-Latency, X-Fhirgate-Proxy-Latency), request_id "
            "(X-Fhirgate-Request-Id), or off."
        ),
    )

    # --- logs ------------------------------------------------------------------------------
    log_level: Literal["debug", "info", "notice", "warn", "error", "crit"] = Field(
        "notice", description="Error log level."
    )
    log_format: Literal["text", "json"] = Field("text", description="Access and error log format.")
    proxy_access_log: str = Field("off", description="Access log: a file path, `stdout`, `stderr` or `off`.")
    proxy_error_log: str = Field("stderr", description="Error log: a file path, `stdout` or `stderr`.")

    # --- lifecycle -------------------------------------------------------------------------
    shutdown_timeout: float = Field(
        10.0, ge=0, description="Seconds in-flight requests get to finish after SIGTERM."
    )

    # --- storage (later parts) -------------------------------------------------------------
    data_dir: Path = Field(Path(".fhirgate"), description="Where local state (SQLite, keys) lives.")
    database_url: str | None = Field(None, description="PostgreSQL URL for shared state; SQLite if unset.")
    redis_url: str | None = Field(None, description="Redis URL for cross-node counters and caches.")

    # --- built-in FHIR server (`fhirgate fhir-server`) ------------------------------------
    fhir_listen: str = Field(
        "127.0.0.1:8080",
        description="FHIR server listener HOST:PORT (loopback: the gateway decides who gets in).",
    )
    fhir_database_url: str | None = Field(
        None,
        description="FHIR store: `sqlite:///path/fhir.db[?synchronous=full]` or `postgresql://user@host/db`; "
        "default `database_url` if set, else SQLite `fhir.db` under `data_dir`.",
    )
    fhir_base_url: str | None = Field(
        None,
        description="Absolute base URL clients see (fullUrl, Location, paging links); default "
        "`http://` + fhir_listen. Behind the gateway: the gateway's `/fhir` URL.",
    )
    fhir_workers: int = Field(
        default_factory=_default_workers, ge=1, le=64, description="FHIR server worker processes."
    )
    fhir_default_count: int = Field(
        20, ge=1, le=1000, description="Search page size when `_count` is absent."
    )
    fhir_max_count: int = Field(
        1000,
        ge=1,
        le=10000,
        description="Largest `_count`; larger values are clamped (the self link says so).",
    )
    fhir_auth_issuer: str | None = Field(
        None,
        description="Issuer URL of the fhirgate authorization server that protects this FHIR server "
        "(e.g. `http://localhost:8000/auth`): `/metadata` then declares SMART-on-FHIR security with "
        "its authorize, token, register, manage, introspect and revoke URLs. Unset: no security section.",
    )
    fhir_max_body: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Largest request body (bytes) the FHIR server accepts; more is 413.",
    )

    # --- built-in authorization server (`fhirgate auth-server`) --------------------------
    auth_listen: str = Field(
        "127.0.0.1:9081",
        description="Authorization server listener HOST:PORT (loopback: the gateway routes `/auth` to it).",
    )
    auth_issuer: str = Field(
        "http://localhost:8000/auth",
        description="The issuer (`iss`) and public URL of the authorization server: every endpoint URL in "
        "its metadata is this plus a path. Behind the gateway: the gateway's `/auth` URL.",
    )
    auth_fhir_base: str = Field(
        "http://localhost:8000/fhir",
        description="The FHIR base the tokens are for: the only `aud` accepted at `/authorize` and the "
        "`aud` of every access token.",
    )
    auth_workers: int = Field(
        default_factory=_default_workers, ge=1, le=64, description="Authorization server worker processes."
    )
    auth_signing_alg: Literal["RS256", "RS384", "ES256", "ES384"] = Field(
        "RS256", description="Algorithm of the access tokens' signing key (ID tokens are always RS256)."
    )
    auth_code_lifetime: int = Field(
        60, ge=5, le=600, description="Authorization code lifetime in seconds (single use)."
    )
    auth_refresh_token_lifetime: int = Field(
        90 * 24 * 3600,
        ge=60,
        description="Lifetime of an `offline_access` refresh token in seconds (rotated at each use).",
    )
    auth_login_lifetime: int = Field(
        8 * 3600,
        ge=60,
        description="Browser login session lifetime in seconds; `online_access` refresh tokens end with it.",
    )
    auth_patient_search_url: str | None = Field(
        None,
        description="FHIR base the patient picker searches for Patients (the FHIR server as the "
        "authorization server reaches it, e.g. `http://127.0.0.1:9080`), with a short-lived system "
        "token of its own; unset: the picker offers the patients linked to users.",
    )
    auth_registration_token: str | None = Field(
        None,
        description="Initial access token that opens `/register` (RFC 7591 dynamic registration); "
        "`/register` is closed while unset. Set it through FHIRGATE_AUTH_REGISTRATION_TOKEN.",
    )
    auth_rate_limit: int = Field(
        10,
        ge=1,
        description="Failed logins per username and failed client authentications per client_id "
        "allowed per minute (counted in each worker process) before 429 with Retry-After; "
        "successes are not counted.",
    )
    auth_database_url: str | None = Field(
        None,
        description="Authorization server store (clients, users, codes, tokens, signing keys): "
        "`sqlite:///path/auth.db` or `postgresql://user@host/db`; default `database_url` if set, else "
        "SQLite `auth.db` under `data_dir`.",
    )
    auth_access_token_lifetime: int = Field(
        3600,
        ge=1,
        le=3600,
        description="Access token lifetime in seconds (at most one hour); a retired signing key stays "
        "in the JWKS this long after `fhirgate keys rotate`.",
    )

    def fhir_database(self) -> str:
        if self.fhir_database_url:
            return self.fhir_database_url
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fhir.db').resolve()}"

    def auth_database(self) -> str:
        if self.auth_database_url:
            return self.auth_database_url
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'auth.db').resolve()}"

    def fhir_base(self) -> str:
        if self.fhir_base_url:
            return self.fhir_base_url.rstrip("/")
        host, port = parse_hostport(self.fhir_listen, "127.0.0.1")
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{port}"

    @field_validator("listen", "listen_ssl", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @field_validator("trusted_ips", "headers", mode="before")
    @classmethod
    def _split_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=_TOML_FILE[0]),
        )

    @property
    def ssl_listeners(self) -> list[str]:
        if self.listen_ssl:
            return self.listen_ssl
        return ["0.0.0.0:8443"] if self.ssl_cert else []


def load_settings(settings_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the node settings: `overrides` (CLI flags; None values ignored), environment,
    `settings_file` (or ./fhirgate.toml), defaults. Raises ConfigError naming each bad setting."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    _TOML_FILE[0] = settings_file or Path("fhirgate.toml")
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        issues = [ConfigIssue(".".join(str(p) for p in err["loc"]), err["msg"]) for err in exc.errors()]
        raise ConfigError(issues, source="settings") from None
    except SettingsError as exc:
        raise ConfigError([ConfigIssue("", str(exc))], source="settings") from None


def parse_hostport(value: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """`HOST:PORT`, `:PORT`, `PORT` or `[v6]:PORT` -> (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    elif value.isdigit():
        host, port = "", value
    else:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid port in {value!r}")
    return (host or default_host), int(port)


def settings_reference() -> str:
    """Markdown table of every setting, its environment variable, default and description."""
    lines = [
        "| setting | environment | default | description |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default: Any = "cores" if name == "workers" else field.default_factory()  # type: ignore[call-arg]
        else:
            default = field.default
        lines.append(f"| `{name}` | `FHIRGATE_{name.upper()}` | `{default}` | {field.description or ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_reference())
