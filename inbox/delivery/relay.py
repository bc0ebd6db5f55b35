"""Smarthost settings for outbound delivery: parsing and checking "user:password@host:port".
Does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RelayConfig:
    """A smarthost: all mail goes there instead of the recipients' MX hosts.

    `starttls=True` makes STARTTLS mandatory (the relay's certificate is verified unless the
    transport was given a `tls_context_factory`); `False` never starts TLS.
    """

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = True

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("relay host is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"relay port {self.port} is not in 1..65535")
        if (self.username is None) != (self.password is None):
            raise ValueError("relay username and password go together")

    @classmethod
    def parse(cls, value: str, *, starttls: bool = True) -> RelayConfig:
        """Parse "host:port" or "user:password@host:port" ("[::1]:587" for IPv6).

        The password may contain ":" and "@" (the last "@" ends it); the user may not contain ":".
        Error messages never include the password.
        """
        userinfo, at, hostport = value.strip().rpartition("@")
        shown = f"<user>:<password>@{hostport}" if at else hostport
        expected = "expected host:port or user:password@host:port"
        username = password = None
        if at:
            username, colon, password = userinfo.partition(":")
            if not colon or not username:
                raise ValueError(f"relay {shown!r}: credentials must be user:password; {expected}")
        if hostport.startswith("["):
            host, bracket, rest = hostport[1:].partition("]")
            if not bracket or not rest.startswith(":"):
                raise ValueError(f"relay {shown!r}: {expected}")
            port_text = rest[1:]
        else:
            host, colon, port_text = hostport.rpartition(":")
            if not colon or ":" in host:
                raise ValueError(f"relay {shown!r}: {expected}")
        if not host:
            raise ValueError(f"relay {shown!r}: missing host; {expected}")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"relay {shown!r}: port must be a number in 1..65535")
        return cls(host, int(port_text), username, password, starttls)
