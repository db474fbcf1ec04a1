"""The bearer token and TLS settings of a `paramd.Client`, named as
`paramctl`'s flags are and read from the same environment variables:

| Client argument | paramctl | environment |
| --- | --- | --- |
| `token_file=` | `--token-file` | `PARAMD_TOKEN_FILE` |
| `token=` | `--token` | `PARAMD_TOKEN` |
| `tls=paramd.TLS(ca_cert=...)` | `--ca-cert` | `PARAMD_CA_CERT` |
| `tls=paramd.TLS(cert=..., key=...)` | `--cert`, `--key` | `PARAMD_CERT`, `PARAMD_KEY` |

An argument given to the client wins over the environment. Files are read
once, when the client is made; a file that cannot be read, or a token that
cannot travel as `authorization: Bearer <token>`, is refused then with an
error naming the file (never the token).
"""

import os
from typing import Mapping, Optional, Tuple, Union

from .errors import InvalidArgument

__all__ = ["TLS", "resolve_token", "resolve_tls"]

PathOrPem = Union[str, "os.PathLike[str]", bytes]


def _read(what: str, source: PathOrPem) -> bytes:
    """PEM bytes as given, or the contents of the file `source` names."""
    if isinstance(source, bytes):
        return source
    try:
        with open(os.fspath(source), "rb") as f:
            return f.read()
    except (OSError, TypeError) as e:
        raise InvalidArgument("%s: cannot read %r: %s" % (what, source, e)) from None


class TLS:
    """TLS settings: `ca_cert`, the PEM CA that signed the server's
    certificate (paramctl's `--ca-cert`; None trusts the system's roots);
    `cert` and `key`, the PEM client certificate and its key, for servers
    that require mutual TLS (`--cert`, `--key`: both or neither). Each is a
    path or the PEM bytes themselves."""

    def __init__(
        self,
        ca_cert: Optional[PathOrPem] = None,
        cert: Optional[PathOrPem] = None,
        key: Optional[PathOrPem] = None,
    ):
        if (cert is None) != (key is None):
            given, missing = ("cert", "key") if key is None else ("key", "cert")
            raise InvalidArgument("TLS %s is given without %s: a client certificate needs both" % (given, missing))
        self.ca_cert = None if ca_cert is None else _read("TLS ca_cert", ca_cert)
        self.cert = None if cert is None else _read("TLS cert", cert)
        self.key = None if key is None else _read("TLS key", key)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> Optional["TLS"]:
        """The settings of PARAMD_CA_CERT, PARAMD_CERT and PARAMD_KEY (paths),
        or None when none is set."""
        env = os.environ if env is None else env
        names = ("PARAMD_CA_CERT", "PARAMD_CERT", "PARAMD_KEY")
        ca, cert, key = (env.get(n) or None for n in names)
        if ca is None and cert is None and key is None:
            return None
        if (cert is None) != (key is None):
            raise InvalidArgument("PARAMD_CERT and PARAMD_KEY go together: only one of them is set")
        return cls(ca_cert=ca, cert=cert, key=key)

    def __repr__(self) -> str:
        return "TLS(ca_cert=%s, client certificate=%s)" % (
            "given" if self.ca_cert else "system roots",
            "given" if self.cert else "none",
        )


def _check_token(token: str, source: str) -> str:
    """The token, if it can travel as a bearer token (visible ASCII, no
    spaces); `source` names where it came from. As the server's and
    paramctl's check, the message never holds the token."""
    if not isinstance(token, str):
        raise InvalidArgument("%s must be a string, got %s" % (source, type(token).__name__))
    if not token:
        raise InvalidArgument("%s holds an empty token" % source)
    bad = next((c for c in token if not ("!" <= c <= "~")), None)
    if bad is not None:
        raise InvalidArgument("%s: a token is visible ASCII without spaces, found %r" % (source, bad))
    return token


def _token_from_file(path: Union[str, "os.PathLike[str]"], source: str) -> str:
    raw = _read(source, path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument("%s %s is not UTF-8" % (source, os.fspath(path))) from None
    return _check_token(text.strip(), "%s %s" % (source, os.fspath(path)))


def resolve_token(
    token: Optional[str],
    token_file: Optional[Union[str, "os.PathLike[str]"]],
    env: Optional[Mapping[str, str]] = None,
) -> Optional[str]:
    """The bearer token: `token` or the contents of `token_file` (not both),
    else PARAMD_TOKEN_FILE's file or PARAMD_TOKEN, else None."""
    if token is not None and token_file is not None:
        raise InvalidArgument("give token or token_file, not both")
    if token is not None:
        return _check_token(token, "token")
    if token_file is not None:
        return _token_from_file(token_file, "token_file")
    env = os.environ if env is None else env
    from_file, inline = env.get("PARAMD_TOKEN_FILE") or None, env.get("PARAMD_TOKEN") or None
    if from_file is not None and inline is not None:
        raise InvalidArgument("PARAMD_TOKEN_FILE and PARAMD_TOKEN are both set: set one")
    if from_file is not None:
        return _token_from_file(from_file, "PARAMD_TOKEN_FILE")
    if inline is not None:
        return _check_token(inline, "PARAMD_TOKEN")
    return None


def resolve_tls(
    tls: Union[None, bool, TLS, PathOrPem],
    env: Optional[Mapping[str, str]] = None,
) -> Tuple[Optional[TLS], bool]:
    """The TLS settings for https:// URLs, and whether they were asked for
    explicitly. `tls` is a `TLS`, True (the system's roots), a CA's path or
    PEM bytes (short for `TLS(ca_cert=...)`), or None: PARAMD_CA_CERT,
    PARAMD_CERT and PARAMD_KEY when set, else the system's roots."""
    if tls is None:
        return TLS.from_env(env), False
    if tls is False:
        return None, False
    if tls is True:
        return TLS(), True
    if isinstance(tls, TLS):
        return tls, True
    if isinstance(tls, (str, bytes, os.PathLike)):
        return TLS(ca_cert=tls), True
    raise InvalidArgument("tls must be a paramd.TLS, True, or a CA certificate's path or PEM bytes, got %r" % (tls,))
