"""Table-driven validation of YAML policy nodes: value kinds, sections, problems, field docs.

The policy tables in :mod:`qgate.policy` are built from the pieces here. Each :class:`Kind`
turns one YAML node (from ``yaml.compose()`` with :class:`PolicyYamlLoader`, which refuses
anchors and aliases, so every node is its own and carries its line number) into a
typed value or records a problem and returns :data:`BAD`. Apart from the loader, nothing here
raises on bad input: problems are collected in a :class:`Context` so a policy file reports all
of them at once.
The same tables produce the field documentation (:func:`field_docs`), so the docs are never
written twice.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import math
import re
import ssl
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Generic, Literal, TypeVar, cast
from urllib.parse import urlsplit

import yaml

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Problem = tuple[int | None, str, str]
"""One problem: 1-based line (or None), dotted YAML path, message."""

STR_TAG: Final = "tag:yaml.org,2002:str"
INT_TAG: Final = "tag:yaml.org,2002:int"
FLOAT_TAG: Final = "tag:yaml.org,2002:float"
BOOL_TAG: Final = "tag:yaml.org,2002:bool"
NULL_TAG: Final = "tag:yaml.org,2002:null"
MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_TAG_NAMES: Final = {
    STR_TAG: "a string",
    INT_TAG: "an integer",
    FLOAT_TAG: "a number",
    BOOL_TAG: "a boolean",
    NULL_TAG: "an empty value (null)",
    "tag:yaml.org,2002:timestamp": "a date/time",
}
_SCALARS: Final = yaml.constructor.SafeConstructor()
"""Used only for its stateless scalar converters (YAML 1.1 ints: 0x.., 1_000, 1:30; floats)."""


NO_ALIASES: Final = "YAML anchors and aliases are not allowed in a policy"
"""The message of a policy refused for an anchor or alias (see :class:`PolicyYamlLoader`)."""


class AliasRefused(yaml.YAMLError):
    """:class:`PolicyYamlLoader` met an anchor (``&x``) or alias (``*x``).

    Attributes:
        line: 1-based line of the anchor or alias.
    """

    def __init__(self, line: int) -> None:
        self.line = line
        super().__init__(f"line {line}: {NO_ALIASES}")


class PolicyYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors and aliases as soon as the parser yields one.

    An alias makes one node appear many times: a few hundred bytes of nested aliases ("billion
    laughs") expand to billions of nodes for any walk over the tree. A policy has no use for
    them, so the first node event carrying an anchor, and every alias, raises
    :class:`AliasRefused` before it joins the tree.
    """

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        """Compose the next node, unless its event is an alias or carries an anchor.

        Raises:
            AliasRefused: the next event is an alias or has an anchor.
        """
        event: object = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            mark = event.start_mark
            raise AliasRefused(int(mark.line) + 1 if mark is not None else 1)
        return super().compose_node(parent, index)


class Bad(enum.Enum):
    """Marker type of :data:`BAD`."""

    BAD = "bad"


BAD: Final = Bad.BAD
"""Returned by a kind whose node was invalid; the problem is already in the context."""


class Default(enum.Enum):
    """Special defaults of a :class:`Field`."""

    REQUIRED = "required"
    """The key must be present."""
    DERIVED = "derived"
    """Computed from other fields when absent (see ``Field.default_doc``)."""


class Incomplete(Exception):
    """A value a builder needs is missing or invalid; its problem is already recorded."""


def line_of(node: yaml.Node | None) -> int | None:
    """Return the 1-based line where ``node`` starts, or None when unknown."""
    if node is None or node.start_mark is None:
        return None
    return int(node.start_mark.line) + 1


def join(path: str, key: str) -> str:
    """Return the dotted path of ``key`` under ``path`` (``peers[0]`` + ``rekey``)."""
    return f"{path}.{key}" if path else key


def describe(node: yaml.Node) -> str:
    """Name the YAML type of ``node`` for messages (``a list``, ``an integer``)."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _TAG_NAMES.get(node.tag, f"a value tagged {node.tag!r}")


def shown(text: str) -> str:
    """Quote a user's value for a message, shortened to 60 characters."""
    return repr(text if len(text) <= 60 else text[:57] + "...")


def fmt_number(value: float) -> str:
    """Format a bound, default or user's number: ``0.1``, ``86400``, ``3``, ``86400.05``."""
    short = f"{value:g}"
    return short if float(short) == value or not math.isfinite(value) else repr(value)


class Context:
    """Problems found so far in one policy file, and where relative paths start.

    Attributes:
        base_dir: directory relative file paths are resolved against (the policy file's
            directory), or None to leave them as written.
        problems: every problem recorded, as ``(line, path, message)``.
    """

    def __init__(self, base_dir: Path | None) -> None:
        self.base_dir = base_dir
        self.problems: list[Problem] = []

    def add(self, node: yaml.Node | None, path: str, message: str) -> None:
        """Record a problem at ``node``'s line for the field at dotted ``path``."""
        self.problems.append((line_of(node), path, message))


class Kind(ABC, Generic[T_co]):
    """How one field's YAML node becomes a value.

    Attributes:
        type_name: the expected YAML type, for docs (``number``, ``string``).
        unit: unit of the value, for docs and messages (``seconds``, ``bytes``), or "".
        bounds: allowed values in words, for docs and messages, or "".
    """

    type_name: str = ""
    unit: str = ""
    bounds: str = ""

    @abstractmethod
    def convert(self, node: yaml.Node, path: str, ctx: Context) -> T_co | Literal[Bad.BAD]:
        """Return the value of ``node``, or record a problem in ``ctx`` and return BAD."""

    def children(self) -> tuple[str, Sequence[Field[object]]] | None:
        """Return (path suffix, fields) when this kind is a nested section, for docs."""
        return None


def scalar_text(node: yaml.Node, path: str, ctx: Context, what: str = "a string") -> str | None:
    """Return the text of a plain string scalar, or record "expected <what>" and return None."""
    if isinstance(node, yaml.ScalarNode) and node.tag == STR_TAG:
        return str(node.value)
    hint = " (put it in quotes)" if isinstance(node, yaml.ScalarNode) and node.tag != NULL_TAG else ""
    ctx.add(node, path, f"expected {what}, got {describe(node)}{hint}")
    return None


class Text(Kind[str]):
    """A string that must fully match a regular expression."""

    type_name = "string"

    def __init__(self, pattern: str, bounds: str) -> None:
        self._pattern = re.compile(pattern)
        self.bounds = bounds

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> str | Literal[Bad.BAD]:
        text = scalar_text(node, path, ctx)
        if text is None:
            return BAD
        if self._pattern.fullmatch(text) is None:
            ctx.add(node, path, f"must be {self.bounds}, got {shown(text)}")
            return BAD
        return text


class Choice(Kind[T_co]):
    """One string out of a fixed set; ``refused`` names values known but not allowed, with why."""

    type_name = "string"

    def __init__(self, values: Sequence[T_co], refused: dict[str, str] | None = None) -> None:
        self._values = tuple(values)
        self._refused = dict(refused or {})
        self.bounds = "one of: " + ", ".join(str(v) for v in self._values)
        if self._refused:
            self.bounds += f" ({', '.join(self._refused)}: not available)"

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> T_co | Literal[Bad.BAD]:
        text = scalar_text(node, path, ctx)
        if text is None:
            return BAD
        for value in self._values:
            if value == text:
                return value
        why = self._refused.get(text)
        ctx.add(node, path, f"{shown(text)} {why}" if why else f"must be {self.bounds}; got {shown(text)}")
        return BAD


class Boolean(Kind[bool]):
    """``true`` or ``false``."""

    type_name = "boolean"
    bounds = "true or false"

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> bool | Literal[Bad.BAD]:
        if isinstance(node, yaml.ScalarNode) and node.tag == BOOL_TAG:
            try:
                return bool(_SCALARS.construct_yaml_bool(node))
            except (KeyError, AttributeError, yaml.YAMLError):  # e.g. an explicit !!bool maybe
                pass
        ctx.add(node, path, f"expected true or false, got {describe(node)}")
        return BAD


def _number(node: yaml.Node, tags: tuple[str, ...]) -> float | int | None:
    """Return the int or float of a scalar whose tag is in ``tags``, or None."""
    if not isinstance(node, yaml.ScalarNode) or node.tag not in tags:
        return None
    try:
        if node.tag == INT_TAG:
            return int(_SCALARS.construct_yaml_int(node))
        return float(_SCALARS.construct_yaml_float(node))
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, yaml.YAMLError):
        return None  # IndexError: PyYAML reads value[0] of an explicit empty !!int "" or !!float ""


class _Bounded(Kind[T_co]):
    """Shared range check of :class:`Integer` and :class:`Real`."""

    def __init__(self, low: float, high: float, unit: str) -> None:
        self.low, self.high, self.unit = low, high, unit
        self.bounds = f"{fmt_number(low)}-{fmt_number(high)}" + (f" {unit}" if unit else "")

    def _in_range(self, value: float, node: yaml.Node, path: str, ctx: Context) -> bool:
        if math.isfinite(value) and self.low <= value <= self.high:
            return True
        ctx.add(node, path, f"must be {self.bounds}, got {fmt_number(value)}")
        return False


class Integer(_Bounded[int]):
    """A whole number in ``low..high`` (inclusive), optionally a multiple of ``step``."""

    type_name = "integer"

    def __init__(self, low: int, high: int, unit: str = "", step: int = 1) -> None:
        super().__init__(low, high, unit)
        self.step = step
        if step != 1:
            self.bounds += f", a multiple of {step}"

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> int | Literal[Bad.BAD]:
        value = _number(node, (INT_TAG,))
        if not isinstance(value, int):
            ctx.add(node, path, f"expected an integer ({self.bounds}), got {describe(node)}")
            return BAD
        if not self._in_range(value, node, path, ctx):
            return BAD
        if value % self.step:
            ctx.add(node, path, f"must be a multiple of {self.step}, got {value}")
            return BAD
        return value


class Real(_Bounded[float]):
    """A finite number (integer or decimal in YAML) in ``low..high`` (inclusive)."""

    type_name = "number"

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> float | Literal[Bad.BAD]:
        value = _number(node, (INT_TAG, FLOAT_TAG))
        if value is None:
            ctx.add(node, path, f"expected a number ({self.bounds}), got {describe(node)}")
            return BAD
        if not self._in_range(value, node, path, ctx):
            return BAD
        return float(value)


def _ip_port(text: str) -> tuple[str, str | None]:
    """Split ``1.2.3.4:5``, ``[::1]:5``, ``1.2.3.4`` or ``[::1]`` into host and port text."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError("an IPv6 address in brackets must be followed by :port or nothing")
        return host, rest[1:] if rest else None
    if text.count(":") > 1:
        raise ValueError('write an IPv6 address in brackets, "[2001:db8::1]:51820"')
    host, sep, port = text.partition(":")
    return host, port if sep else None


class SocketAddress(Kind[tuple[IPAddress, int]]):
    """A literal IP address with a UDP port: ``10.99.0.1:51820`` or ``"[2001:db8::1]:51820"``.

    Host names are refused (no DNS at start-up). ``default_port`` applies when the port is
    left out. ``remote`` refuses addresses that cannot be a peer (unspecified, multicast).
    """

    type_name = "string"

    def __init__(self, default_port: int, *, remote: bool) -> None:
        self.default_port = default_port
        self.remote = remote
        self.bounds = f"IP:port with a literal IPv4 or [IPv6] address, port 1-65535 (default {default_port})"

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> tuple[IPAddress, int] | Literal[Bad.BAD]:
        text = scalar_text(node, path, ctx, 'a string like 10.99.0.1:51820 or "[2001:db8::1]:51820"')
        if text is None:
            return BAD
        try:
            host, port_text = _ip_port(text.strip())
            address = ipaddress.ip_address(host)
        except ValueError as exc:
            ctx.add(node, path, f"{shown(text)} is not a literal IP address with optional :port ({exc})")
            return BAD
        port = self.default_port if port_text is None else _port(port_text)
        if port is None:
            ctx.add(node, path, f"{shown(text)}: port must be 1-65535, got {shown(port_text or '')}")
            return BAD
        problem = _address_problem(address, remote=self.remote)
        if problem:
            ctx.add(node, path, f"{shown(text)}: {problem}")
            return BAD
        return address, port


def _port(text: str) -> int | None:
    """Return the port number in ``text`` when it is 1-65535 written in decimal digits."""
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def _address_problem(address: IPAddress, *, remote: bool) -> str:
    """Say why ``address`` cannot be used (multicast; unspecified for a peer), or ""."""
    if address.is_multicast:
        return "a multicast address cannot be a tunnel endpoint"
    if remote and address.is_unspecified:
        return "the unspecified address cannot be a peer endpoint"
    if remote and address == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address cannot be a peer endpoint"
    return ""


class Networks(Kind[tuple[IPNetwork, ...]]):
    """A non-empty list of networks in CIDR form (``10.2.0.0/24``), host bits zero."""

    type_name = "list of string"
    bounds = "one or more IPv4/IPv6 networks in CIDR form, host bits zero"

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> tuple[IPNetwork, ...] | Literal[Bad.BAD]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            got = "an empty list" if isinstance(node, yaml.SequenceNode) else describe(node)
            ctx.add(node, path, f"expected a list of {self.bounds}, got {got}")
            return BAD
        networks: list[IPNetwork] = []
        for index, item in enumerate(node.value):
            item_path = f"{path}[{index}]"
            text = scalar_text(item, item_path, ctx, "a network like 10.2.0.0/24")
            if text is None:
                continue
            try:
                networks.append(ipaddress.ip_network(text.strip(), strict=True))
            except ValueError as exc:
                ctx.add(item, item_path, f"{shown(text)} is not a network in CIDR form ({exc})")
        return tuple(networks) if len(networks) == len(node.value) else BAD


class Interface(Kind[IPInterface]):
    """An address with its prefix length, ``10.255.0.1/30``."""

    type_name = "string"
    bounds = "IPv4/IPv6 address with /prefix"

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> IPInterface | Literal[Bad.BAD]:
        text = scalar_text(node, path, ctx, "an address with prefix like 10.255.0.1/30")
        if text is None:
            return BAD
        try:
            if "/" not in text:
                raise ValueError("the /prefix length is missing")
            return ipaddress.ip_interface(text.strip())
        except ValueError as exc:
            ctx.add(node, path, f"{shown(text)} is not an address with /prefix ({exc})")
            return BAD


class FilePath(Kind[Path]):
    """A file name, relative to the policy file's directory unless absolute (not checked to exist)."""

    type_name = "string"
    bounds = "file path, relative to the policy file's directory"

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> Path | Literal[Bad.BAD]:
        text = scalar_text(node, path, ctx, "a file path")
        if text is None:
            return BAD
        if not text.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            ctx.add(
                node, path, f"must be a non-empty file path without control characters, got {shown(text)}"
            )
            return BAD
        value = Path(text)
        if ctx.base_dir is not None and not value.is_absolute():
            value = ctx.base_dir / value
        return value


_HOST_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
"""One DNS label (RFC 1123); names are checked label by label, so no regex can backtrack."""
_URL_PATH: Final = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@-]*)*")


class HttpsUrl(Kind[str]):
    """An ``https://host[:port][/prefix]`` base URL; returned without a trailing ``/``."""

    type_name = "string"
    bounds = "https://host[:port] base URL (no query, fragment or user name)"

    def __init__(self, api_prefix: str) -> None:
        self.api_prefix = api_prefix

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> str | Literal[Bad.BAD]:
        text = scalar_text(node, path, ctx, "a URL like https://127.0.0.1:8443")
        if text is None:
            return BAD
        problem = self._problem(text)
        if problem:
            ctx.add(node, path, f"{shown(text)}: {problem}")
            return BAD
        return text.rstrip("/")

    def _problem(self, text: str) -> str:
        try:
            parts = urlsplit(text)
            host, _port = parts.hostname or "", parts.port
        except ValueError as exc:
            return f"not a valid URL ({exc})"
        if parts.scheme != "https":
            return "must start with https:// (the KME is reached over TLS only)"
        if parts.username is not None or parts.query or parts.fragment or text.endswith(("?", "#")):
            return "must not contain a user name, query or fragment"
        if not _is_host(host, bracketed=parts.netloc.rpartition("@")[2].startswith("[")):
            return "the host must be a literal IP address or a DNS name"
        if _URL_PATH.fullmatch(parts.path) is None:
            return "the path contains characters that need escaping"
        if parts.path.rstrip("/").endswith(self.api_prefix):
            return f"give the base URL only; qgate appends {self.api_prefix}"
        return ""


def _is_dns_name(host: str) -> bool:
    """Tell whether ``host`` is a DNS name of 1-253 characters (a trailing dot allowed)."""
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return 0 < len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def _is_host(host: str, *, bracketed: bool) -> bool:
    """Tell whether ``host`` (from a URL) is an IP literal or a syntactically valid DNS name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return not bracketed and _is_dns_name(host)
    return bracketed == (address.version == 6)


# --- Kinds of the kme: TLS settings ------------------------------------------------------------

_SHA256_HEX: Final = re.compile(r"[0-9A-Fa-f]{64}|(?:[0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}")
_CIPHER_TEXT: Final = re.compile(r"[A-Za-z0-9+!@=._:,-]{1,1024}")


def normalize_sha256(text: str) -> str | None:
    """Return a SHA-256 fingerprint as 64 lowercase hex digits, or None when ``text`` is not one.

    Accepts 64 hex digits, or 32 hex bytes joined by colons (``AB:CD:...``), in any case.
    """
    text = text.strip()
    return text.replace(":", "").lower() if _SHA256_HEX.fullmatch(text) else None


def cipher_list_problem(text: str) -> str:
    """Say why ``text`` is not a usable OpenSSL cipher list for TLS 1.2, or return "".

    Every name in it must be one OpenSSL knows (OpenSSL itself skips unknown ones silently),
    the whole must select at least one TLS 1.2 suite, and none without encryption or
    authentication (eNULL, aNULL).
    """
    if not _CIPHER_TEXT.fullmatch(text):
        return "must be 1-1024 characters of A-Z a-z 0-9 + - ! @ = . _ : ,"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for token in re.split(r"[:,]", text):
        name = token.lstrip("!-+")
        try:
            if name and not name.startswith("@"):
                context.set_ciphers(name)
        except ssl.SSLError:
            return f"{shown(token)} names no cipher or rule OpenSSL knows"
    try:
        context.set_ciphers(text)
    except ssl.SSLError:
        return "selects no cipher"
    suites = [c for c in context.get_ciphers() if c["protocol"] != "TLSv1.3"]
    if not suites:
        return "selects no TLS 1.2 cipher suite"
    bare = [c["name"] for c in suites if c["symmetric"] is None or c["auth"] == "auth-null"]
    if bare:
        return f"selects suites without encryption or authentication: {bare[0]}; add !eNULL:!aNULL"
    return ""


class CipherList(Kind[str]):
    """An OpenSSL cipher list for TLS 1.2 (``ECDHE+AESGCM:ECDHE-ECDSA-AES256-SHA``)."""

    type_name = "string"
    bounds = "OpenSSL cipher list selecting TLS 1.2 suites, none without encryption or authentication"

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> str | Literal[Bad.BAD]:
        text = scalar_text(node, path, ctx, 'an OpenSSL cipher list like "ECDHE+AESGCM"')
        if text is None:
            return BAD
        problem = cipher_list_problem(text.strip())
        if problem:
            ctx.add(node, path, f"{shown(text)}: {problem}")
            return BAD
        return text.strip()


class Sha256Fingerprint(Kind[str]):
    """A SHA-256 fingerprint, returned as 64 lowercase hex digits (see :func:`normalize_sha256`)."""

    type_name = "string"
    unit = "hex"
    bounds = "SHA-256: 64 hex digits, or 32 hex bytes joined by colons; any case"

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> str | Literal[Bad.BAD]:
        # Unquoted, ``12:34:...`` is a YAML 1.1 sexagesimal integer: its source text is what counts.
        if not isinstance(node, yaml.ScalarNode) or node.tag not in (STR_TAG, INT_TAG, FLOAT_TAG):
            ctx.add(node, path, f"expected a SHA-256 fingerprint, got {describe(node)}")
            return BAD
        digest = normalize_sha256(str(node.value))
        if digest is None:
            ctx.add(node, path, f"must be {self.bounds}, got {shown(str(node.value))}")
            return BAD
        return digest


class HostName(Kind[str]):
    """A DNS name or a literal IP address (no brackets, no port)."""

    type_name = "string"
    bounds = "DNS name or literal IP address"

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> str | Literal[Bad.BAD]:
        text = scalar_text(node, path, ctx, "a DNS name or IP address")
        if text is None:
            return BAD
        try:
            ipaddress.ip_address(text)
        except ValueError:
            if not _is_dns_name(text):
                ctx.add(node, path, f"must be a {self.bounds}, got {shown(text)}")
                return BAD
        return text


class NumberedChoice(Choice[T_co]):
    """A :class:`Choice` of version-like strings that may also be written unquoted (``1.3``)."""

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> T_co | Literal[Bad.BAD]:
        if isinstance(node, yaml.ScalarNode) and node.tag in (INT_TAG, FLOAT_TAG):
            node = yaml.ScalarNode(STR_TAG, node.value, node.start_mark, node.end_mark)
        return super().convert(node, path, ctx)


class Field(Generic[T_co]):
    """One key of a section: its kind, documentation and default.

    Attributes:
        key: the YAML key.
        kind: how its value is read.
        doc: one line for operators.
        default: the value when absent, or ``Default.REQUIRED`` / ``Default.DERIVED``.
        default_doc: how the default reads in docs, when not simply the value.
        rule: a constraint involving other fields, in words (``>= interval``), or "".
    """

    def __init__(
        self,
        key: str,
        kind: Kind[T_co],
        doc: str,
        default: T_co | Default = Default.REQUIRED,
        default_doc: str = "",
        rule: str = "",
    ) -> None:
        self.key = key
        self.kind = kind
        self.doc = doc
        self.default = default
        self.default_doc = default_doc or _render_default(default)
        self.rule = rule


def _render_default(value: object) -> str:
    """Write a default the way it would appear in YAML."""
    if isinstance(value, Default):
        return value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return fmt_number(value)
    return "none" if value is None else str(value)


class Values:
    """The checked values of one YAML mapping, read back by field.

    Attributes:
        path: dotted path of the mapping (``peers[0]``).
        node: the mapping node.
    """

    def __init__(self, path: str, node: yaml.Node) -> None:
        self.path = path
        self.node = node
        self._values: dict[str, object] = {}
        self._nodes: dict[str, yaml.Node] = {}

    def put(self, key: str, value: object, node: yaml.Node) -> None:
        """Store a checked value (or BAD) for ``key`` with its node."""
        self._values[key] = value
        self._nodes[key] = node

    def value(self, field: Field[T], *, derived: T | None = None) -> T:
        """Return the field's value, its default, or ``derived`` for a DERIVED default.

        Raises:
            Incomplete: the value is invalid, or required and absent.
        """
        if field.key in self._values:
            found = self._values[field.key]
            if found is BAD:
                raise Incomplete(self.path_of(field))
            return cast("T", found)  # stored by field.kind, a Kind[T]
        if isinstance(field.default, Default):
            if field.default is Default.DERIVED and derived is not None:
                return derived
            raise Incomplete(self.path_of(field))
        return field.default

    def has(self, field: Field[object]) -> bool:
        """Tell whether the key of ``field`` was given (valid or not)."""
        return field.key in self._values

    def optional(self, field: Field[T]) -> T | None:
        """Return the value when present (raising Incomplete when invalid), else None."""
        return self.value(field) if field.key in self._values else None

    def peek(self, field: Field[T]) -> T | None:
        """Return the value when present and valid, else None (never raises)."""
        try:
            return self.optional(field)
        except Incomplete:
            return None

    def node_of(self, field: Field[object]) -> yaml.Node:
        """Return the value node of ``field``, or the mapping node when it is absent."""
        return self._nodes.get(field.key, self.node)

    def path_of(self, field: Field[object]) -> str:
        """Return the dotted path of ``field`` in this mapping."""
        return join(self.path, field.key)


class Section(Kind[Values]):
    """A mapping with a fixed set of keys; unknown, duplicate and missing keys are problems."""

    type_name = "mapping"

    def __init__(self, fields: Sequence[Field[object]]) -> None:
        self.fields = tuple(fields)
        self._by_key = {f.key: f for f in self.fields}

    def children(self) -> tuple[str, Sequence[Field[object]]] | None:
        return ".", self.fields

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> Values | Literal[Bad.BAD]:
        if not isinstance(node, yaml.MappingNode):
            keys = ", ".join(self._by_key)
            ctx.add(node, path, f"expected a mapping with keys {keys}; got {describe(node)}")
            return BAD
        values = Values(path, node)
        seen: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, path, seen, ctx)
            if key is not None:
                seen[key] = key_node
                field = self._by_key[key]
                if value_node.tag == NULL_TAG and field.default is None:
                    values.put(key, None, value_node)
                else:
                    values.put(key, field.kind.convert(value_node, join(path, key), ctx), value_node)
        for field in self.fields:
            if field.default is Default.REQUIRED and field.key not in seen:
                ctx.add(node, join(path, field.key), f"missing required key {field.key!r} ({field.doc})")
        return values

    def _key(self, node: yaml.Node, path: str, seen: dict[str, yaml.Node], ctx: Context) -> str | None:
        """Return a valid, new, known key, or record why not and return None."""
        if isinstance(node, yaml.ScalarNode) and node.tag == MERGE_TAG:
            ctx.add(node, path, "merge keys (<<) are not supported; write the keys out")
            return None
        if not isinstance(node, yaml.ScalarNode) or node.tag != STR_TAG:
            ctx.add(node, path, f"keys must be strings, got {describe(node)}")
            return None
        key = str(node.value)
        if key in seen:
            ctx.add(
                node, join(path, key), f"duplicate key {key!r} (first given on line {line_of(seen[key])})"
            )
            return None
        if key not in self._by_key:
            ctx.add(node, join(path, key), _unknown_key_message(key, list(self._by_key)))
            return None
        return key


def _unknown_key_message(key: str, allowed: list[str]) -> str:
    """Say that ``key`` is unknown, with the closest allowed key and the full list."""
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (allowed: {', '.join(allowed)})"


class SectionList(Kind[tuple[Values, ...]]):
    """A non-empty list of mappings, each with the keys of ``fields``."""

    type_name = "list of mapping"
    bounds = "one or more entries"

    def __init__(self, fields: Sequence[Field[object]]) -> None:
        self.section = Section(fields)

    def children(self) -> tuple[str, Sequence[Field[object]]] | None:
        return "[].", self.section.fields

    def convert(self, node: yaml.Node, path: str, ctx: Context) -> tuple[Values, ...] | Literal[Bad.BAD]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            got = "an empty list" if isinstance(node, yaml.SequenceNode) else describe(node)
            ctx.add(node, path, f"expected a list of one or more mappings, got {got}")
            return BAD
        items = [self.section.convert(item, f"{path}[{i}]", ctx) for i, item in enumerate(node.value)]
        return tuple(item for item in items if item is not BAD)


@dataclass(frozen=True)
class FieldDoc:
    """Documentation of one policy field, generated from the validator's tables.

    Attributes:
        path: dotted path, list entries as ``[]`` (``peers[].rekey.interval``).
        type: YAML type (``number``, ``string``, ``mapping``, ``list of string``).
        unit: unit of the value (``seconds``, ``bytes``, ``bits``) or "".
        default: the default as written in YAML, ``required``, or a rule (``3 x interval``).
        range: allowed values in words, or "".
        description: what the field does.
        required: True when the key must be present.
    """

    path: str
    type: str
    unit: str
    default: str
    range: str
    description: str
    required: bool


def field_docs(fields: Sequence[Field[object]], prefix: str = "") -> list[FieldDoc]:
    """Return the docs of ``fields`` and of every nested section, depth first, in table order."""
    docs: list[FieldDoc] = []
    for field in fields:
        kind = field.kind
        required = field.default is Default.REQUIRED
        docs.append(
            FieldDoc(
                prefix + field.key,
                kind.type_name,
                kind.unit,
                field.default_doc,
                ", ".join(part for part in (kind.bounds, field.rule) if part),
                field.doc,
                required,
            )
        )
        nested = kind.children()
        if nested is not None:
            docs.extend(field_docs(nested[1], prefix + field.key + nested[0]))
    return docs
