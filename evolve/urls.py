"""Storage URLs without secrets: what may be printed or persisted, and what is used to connect.

A storage password is a secret. It is never written (the run directory's ``config.yaml``, the study's ``config``
attribute, the report) and never printed, in any URL form: ``user:pw@host`` (also a raw ``@`` or ``:`` in the
password, or an escaped ``%40``), and ``?password=...`` (any query key containing ``pass``, ``secret`` or
``token``). A URL may instead name an environment variable, ``postgresql://evo:${EVOMERGE_DB_PASSWORD}@db/evo``:
it is expanded only when the URL is used (:func:`expand_env`), and the reference itself is kept when persisting,
being no secret. A URL without a password leaves it to the driver (libpq reads ``PGPASSWORD`` and ``~/.pgpass``).
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote, unquote

from merge_core.errors import EvomergeError

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_URL_IN_TEXT = re.compile(_SCHEME + r"[^\s'\"<>]*")
_SECRET_KEY = re.compile(r"pass|secret|token", re.IGNORECASE)
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TEXT_PAIR = re.compile(r"\b((?:password|passwd|pwd)\s*=\s*)(?!\*\*\*)[^\s&'\",;)]+", re.IGNORECASE)
MASK = "***"


def _only_env_refs(value: str) -> bool:
    """``${VAR}`` references and nothing else: not a secret (the value lives in the environment)."""
    return bool(value) and not _ENV_REF.sub("", value)


def _split(url: str) -> tuple[str, str | None, str | None, str] | None:
    """(``scheme://``, user, password, the rest) or None for a string that is not a URL.

    The user info ends at the LAST ``@``: a raw ``@`` in a password is then hidden with it (a ``@`` further on, in
    a query value, over-redacts, which is the safe side)."""
    m = re.match(f"({_SCHEME})(.*)$", url, re.DOTALL)
    if m is None:
        return None
    prefix, rest = m.groups()
    at = rest.rfind("@")
    if rest.startswith("/") or at < 0:  # sqlite:///path (no user info), or no user info at all
        return prefix, None, None, rest
    user, colon, password = rest[:at].partition(":")
    return prefix, user, password if colon else None, rest[at + 1 :]


def _rewrite(url: str, secret: str | None) -> str:
    """The URL with each literal secret replaced by ``secret``, or dropped when ``secret`` is None."""
    parts = _split(url)
    if parts is None:
        return url
    prefix, user, password, rest = parts
    userinfo = ""
    if user is not None:
        if password is None or _only_env_refs(password):
            userinfo = user + (f":{password}" if password is not None else "") + "@"
        else:
            userinfo = user + (f":{secret}" if secret is not None else "") + "@"
    head, q, query = rest.partition("?")
    if q:
        kept = []
        for pair in query.split("&"):
            key, eq, value = pair.partition("=")
            if eq and _SECRET_KEY.search(unquote(key)) and not _only_env_refs(unquote(value)):
                if secret is not None:
                    kept.append(f"{key}={secret}")
            else:
                kept.append(pair)
        rest = head + ("?" + "&".join(kept) if kept else "")
    return prefix + userinfo + rest


def redact_url(text: str) -> str:
    """A URL, or a text holding URLs (an error message), safe to print: every password replaced by ``***``."""
    if re.fullmatch(_SCHEME + r"\S*", text):
        return _rewrite(text, MASK)
    text = _URL_IN_TEXT.sub(lambda m: _rewrite(m.group(0), MASK), text)
    return _TEXT_PAIR.sub(lambda m: m.group(1) + MASK, text)


def redact_text(text: str, url: str | None) -> str:
    """:func:`redact_url`, and the literal secrets of ``url`` removed wherever they appear (a driver's message)."""
    text = redact_url(text)
    for secret in sorted(secrets_of(url), key=len, reverse=True) if url else []:
        if len(secret) >= 4:  # a shorter one would mangle the text; the URL forms above already hide it
            text = text.replace(secret, MASK)
    return text


def secrets_of(url: str) -> set[str]:
    """The literal secrets a URL carries, as written and unescaped (empty when it has none), and the pieces of a
    password between raw '@' and ':' (a driver that split it there quotes a piece alone)."""
    parts = _split(url)
    if parts is None:
        return set()
    found = set()
    _, _, password, rest = parts
    if password and not _only_env_refs(password):
        found |= {password, unquote(password), *(p for p in re.split(r"[@:]", password) if p)}
    for pair in rest.partition("?")[2].split("&"):
        key, eq, value = pair.partition("=")
        if eq and value and _SECRET_KEY.search(unquote(key)) and not _only_env_refs(unquote(value)):
            found |= {value, unquote(value)}
    return found


def ambiguity(url: str) -> str | None:
    """Why the URL's user name or password cannot be read one way only, or None. The drivers (SQLAlchemy's
    `make_url`) end the password at its FIRST raw '@', the redaction here at the last: a URL on which the two
    disagree, or that the driver cannot parse at all, would leave part of its password outside what is masked.
    Checked before any library sees the URL (the config schema)."""
    parts = _split(url)
    if parts is None or parts[1] is None:  # no user info: nothing secret to misread
        return None
    _, user, password, _ = parts
    fix = "percent-encode each '@', ':' and '/' in the user name and password (e.g. p@ss as p%40ss)"
    from sqlalchemy.engine import make_url  # here: the config layer imports this module, --help stays fast

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - its message quotes pieces of the password: never shown
        return f"cannot be parsed (a raw '@' in the password, or a port that is not a number); {fix}"
    if password is None and parsed.password is None:
        return None
    if parsed.username != unquote(user) or parsed.password != (None if password is None else unquote(password)):
        return f"the user name or password holds a raw '@', so it can be read more than one way; {fix}"
    return None


def has_secret(url: str | None) -> bool:
    """Whether the URL carries a literal password (one that persisting it would write)."""
    return bool(url) and bool(secrets_of(url))


def persisted_url(url: str | None) -> str | None:
    """The URL as it may be written: literal secrets dropped, ``${VAR}`` references kept."""
    return url if url is None or not has_secret(url) else _rewrite(url, None)


def expand_env(url: str) -> str:
    """``${VAR}`` references replaced by the environment's values (escaped inside the user info); one-line error
    naming a variable that is not set."""
    if "${" not in url:
        return url

    def value(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise EvomergeError(
                f"storage: environment variable {name} is not set (the storage URL refers to ${{{name}}})"
            )
        return os.environ[name]

    parts = _split(url)
    if parts is None:
        return _ENV_REF.sub(value, url)
    prefix, user, password, rest = parts
    escaped = lambda s: _ENV_REF.sub(lambda m: quote(value(m), safe=""), s)  # noqa: E731
    userinfo = "" if user is None else escaped(user) + ("" if password is None else ":" + escaped(password)) + "@"
    head, q, query = rest.partition("?")
    if q:
        query = "&".join(
            k + e + _ENV_REF.sub(lambda m: quote(value(m), safe=""), v)
            for k, e, v in (pair.partition("=") for pair in query.split("&"))
        )
    return prefix + userinfo + _ENV_REF.sub(value, head) + (q + query if q else "")
