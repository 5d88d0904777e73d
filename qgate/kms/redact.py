"""Key material out of KME error texts: what an error summary must never show (sans-I/O).

A KME's error answer may echo what it was given or holds: keys as hex, Base64 (whole, in
pieces, padded or not), or byte arrays. :func:`redact` replaces every run that may be key
material with :data:`REDACTED` and keeps UUID key_IDs (ETSI GS QKD 014 section 6.3) and ISO 8601
times readable; JSON members named like a key show as :data:`HIDDEN` (:func:`secret_name`).
Used by :mod:`qgate.kms.etsi014` for every error summary, message and details entry.
"""

from __future__ import annotations

import itertools
import re
from typing import Final

_CUT_TAIL: Final = re.compile(r"[A-Za-z0-9+/_=\s:,\[-]+\Z")
"""What may be the start of key material where a scanned head is cut (see :func:`redact`)..."""
_CUT_TAIL_MAX: Final = 256
"""... looked for in this many last characters."""


def without_cut_tail(text: str) -> str:
    """Drop what may be the start of key material at the end of a text that was cut."""
    return text[:-_CUT_TAIL_MAX] + _CUT_TAIL.sub("", text[-_CUT_TAIL_MAX:])


REDACTED: Final = "<redacted>"
"""What an error summary shows where key material may have been."""
REDACT_HEX_MIN: Final = 16
"""Hex digits (any case; pieces joined by white space or colons) from which a run is taken for a key."""
REDACT_BASE64_MIN: Final = 12
"""Characters (white space inside removed) from which a Base64 run may be a key: 64 bits with padding."""
_REDACT_MARGIN: Final = 1024
"""Characters past a cut looked at when redacting (a Base64 key of up to 6144 bits is seen whole)."""
REDACT_NUMBERS_MIN: Final = 8
"""Numbers in a JSON array or a comma-separated list from which it is taken for key bytes (64 bits)."""
NOISE_PER_CHAR: Final = 0.3
"""Noise per character (see _noise) from which a Base64 run is taken for a key. Measured on random keys
(5000 per size and form): padded standard Base64 (the ETSI GS QKD 014 ``key`` form) of 64 to 256 bits,
whole or in pieces of 4 or 8, and unpadded keys of 128 bits and more stayed shown in fewer than 1 in
2000 cases; unpadded 72- to 120-bit keys in about 1 in 100 to 1 in 1000, and up to 1 in 10 in pieces
(72 bits as 8 + 4 characters). Identifiers (``max_key_per_request``, ``/api/v1/keys``) stay readable."""
_CHUNKS_NOISE_PER_CHAR: Final = 0.4
"""The same, for pieces of one length joined (higher: a sentence of words of one length is no key)."""
HIDDEN: Final = "<SECRET>"
"""What an error summary shows for the value of a JSON member named like a key."""
_SECRET_NAMES: Final = frozenset(
    {"key", "keymaterial", "keybytes", "keyvalue", "keydata", "rawkey", "secret"}
)
"""JSON member names (lower case, ``_`` and ``-`` removed) whose value is shown as ``<SECRET>``."""
_PROTECTED: Final = re.compile(
    r"(?<![A-Za-z0-9+/])(?:[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}"
    r"|\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:Z|[+-]\d\d:?\d\d)?)?)(?![A-Za-z0-9+/=])"
)
"""Kept readable: UUIDs (the key_IDs of ETSI GS QKD 014 section 6.3) and ISO 8601 dates and times."""
_NUMBER_LIST: Final = re.compile(rf"(?<![\w.])-?\d+(?:\s*,\s*-?\d+){{{REDACT_NUMBERS_MIN - 1},}}")
_HEX_RUN: Final = re.compile(
    r"(?<![A-Za-z0-9+/_-])(?:0[xX])?[0-9A-Fa-f]{2,}(?:[\s:]+[0-9A-Fa-f]{2,})*(?![A-Za-z0-9+/_-])"
)
_HEX_SEPARATORS, _HEX_DIGIT, _HEX_LETTER = re.compile(r"[\s:]"), re.compile(r"[0-9]"), re.compile(r"[A-Fa-f]")
"""Hex pieces joined must mix digits and letters: words of the letters a-f or a list of numbers are no key."""
_PIECE: Final = r"[A-Za-z0-9+/_-]+(?:={1,2}(?![A-Za-z0-9+/=_-]))?"
"""One Base64 piece: Base64 or base64url characters, then padding if nothing Base64 follows it."""
_WORDS: Final = re.compile(rf"(?<![A-Za-z0-9+/_-]){_PIECE}(?:\s+{_PIECE})*")
_SPACE_SPLIT: Final = re.compile(r"(\s+)")
_PARTS: Final = re.compile(r"[+/_-]+")
_ATOMS: Final = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")
_NUMBERED: Final = re.compile(r"[A-Za-z]+[0-9]+")
_VOWELS: Final = frozenset("aeiouyAEIOUY")
_ACRONYMS: Final = frozenset({
    "qkd", "kme", "kms", "sae", "tls", "ssl", "http", "https", "html", "xml", "pkcs", "rfc", "crl",
    "sha", "dns", "tcp", "udp", "pqc", "mtls", "cbc", "gcm", "rsa", "ecdh", "ecdhe", "hmac", "hkdf",
    "pki", "url", "msg", "std",
})  # fmt: skip
"""Atoms without a vowel that read as words."""


def redact_cut(text: str, limit: int) -> str:
    """Redact ``text`` (see :func:`redact`) and cut it to ``limit`` characters.

    Only the first ``limit`` + _REDACT_MARGIN characters are looked at (a key reaching into the
    kept part is then seen whole, or over at least _REDACT_MARGIN characters), without what may be
    the start of a key where they end.
    """
    window = text[: limit + _REDACT_MARGIN]
    return redact(without_cut_tail(window) if len(window) < len(text) else window)[:limit]


def redact(text: str) -> str:
    """Replace what may be key material in ``text`` by REDACTED.

    Redacted: comma-separated lists of REDACT_NUMBERS_MIN or more integers (byte arrays); hex runs
    of REDACT_HEX_MIN or more digits, any case, pieces joined by white space or colons; Base64 or
    base64url runs of REDACT_BASE64_MIN or more characters, white space inside removed (a key
    printed in pieces), that end in canonical padding or read as noise rather than words
    (:func:`_noise`). UUIDs (key_IDs) and ISO 8601 times stay readable. A
    heuristic: a short unpadded key may read as a word (see NOISE_PER_CHAR) and stay.
    """
    pieces = _PROTECTED.split(text)
    kept = _PROTECTED.findall(text)
    out = [_redact_piece(pieces[0])]
    for protected, piece in zip(kept, pieces[1:], strict=True):
        out += [protected, _redact_piece(piece)]
    return "".join(out)


def _redact_piece(text: str) -> str:
    text = _NUMBER_LIST.sub(REDACTED, text)
    text = _HEX_RUN.sub(_redact_hex, text)
    return _WORDS.sub(_redact_words, text)


def _redact_hex(match: re.Match[str]) -> str:
    run = match.group()
    digits = _HEX_SEPARATORS.sub("", run[2:] if run[:2] in ("0x", "0X") else run)
    pieces = len(digits) != len(run.removeprefix("0x").removeprefix("0X"))
    mixed = _HEX_DIGIT.search(digits) is not None and _HEX_LETTER.search(digits) is not None
    return REDACTED if len(digits) >= REDACT_HEX_MIN and (mixed or not pieces) else run


def _redact_words(match: re.Match[str]) -> str:
    """Redact key material among white-space-separated Base64 pieces (one REDACTED per run of them)."""
    pieces = _SPACE_SPLIT.split(match.group())  # piece, space, piece, ..., piece
    words = pieces[::2]
    hidden = _chunk_runs(words)
    _noisy_runs(words, hidden)
    out = [REDACTED if hidden[0] else words[0]]
    for index in range(1, len(words)):
        if not (hidden[index] and hidden[index - 1]):
            out += [pieces[2 * index - 1], REDACTED if hidden[index] else words[index]]
    return "".join(out)


def _chunk_runs(words: list[str]) -> list[bool]:
    """Mark runs of pieces of one length (4 or more), 2 or more of them or 1 with a tail, that join into a
    key: a key printed in chunks of 4, 8, 64 or 76 characters. A tail is one shorter piece after them
    that is padded or reads as noise.
    """
    hidden = [False] * len(words)
    start = 0
    while start < len(words):
        size, end = len(words[start]), start + 1
        while end < len(words) and len(words[end]) == size:
            end += 1
        tail = end < len(words) and len(words[end]) < size and not words[end - 1].endswith("=")
        tail = tail and (words[end].endswith("=") or _looks_random(words[end]))
        chunks = size >= 4 and (end - start >= 2 or tail)
        for stop in (end + 1, end) if tail else (end,):
            if chunks and _key_like("".join(words[start:stop]), _CHUNKS_NOISE_PER_CHAR):
                hidden[start:stop] = [True] * (stop - start)
                end = stop
                break
        start = end
    return hidden


def _noisy_runs(words: list[str], hidden: list[bool]) -> None:
    """Mark runs of pieces that each read as noise and hold a key, alone or joined."""
    noisy = [_key_piece(word) for word in words]
    start = 0
    while start < len(words):
        end = start + 1
        while noisy[start] and end < len(words) and noisy[end]:
            end += 1
        group = words[start:end]
        if noisy[start] and (max(map(len, group)) >= REDACT_BASE64_MIN or _key_like("".join(group))):
            hidden[start:end] = [True] * (end - start)
        start = end


def _key_piece(token: str) -> bool:
    """Tell whether a white-space-separated piece may be key material or a part of it."""
    if len(token) >= REDACT_BASE64_MIN:
        return _key_like(token)
    return len(token) >= 4 and not token.isdigit() and _looks_random(token)


def _key_like(run: str, per_char: float = NOISE_PER_CHAR) -> bool:
    return len(run) >= REDACT_BASE64_MIN and _looks_random(run, per_char)


def _looks_random(run: str, per_char: float = NOISE_PER_CHAR) -> bool:
    """Tell whether a Base64 run is padded standard Base64 (RFC 4648 section 4) or reads as noise."""
    core = run.rstrip("=")
    if core != run and len(run) % 4 == 0 and "_" not in core and "-" not in core:
        return True  # ``name=`` of an identifier has ``_`` or ``-`` (base64url, never padded here)
    return _noise(core) >= per_char * len(core)


def _noise(core: str) -> float:
    """Score how little ``core`` reads as words: random Base64 scores about 0.6 per character, words 0.1.

    Per part between ``+/_-``: ½ per atom (a word, an acronym, a number), 1 per letter-digit or
    lower-upper change inside it (none for a name then a number: ``v1``, ``sha256``), 1 for a single
    consonant or lowercase letter, 2 for a longer atom without a vowel (known acronyms such as
    ``qkd`` or ``tls`` excepted).
    """
    noise = 0.0
    for part in _PARTS.split(core):
        atoms = _ATOMS.findall(part)
        noise += 0.5 * len(atoms) + sum(map(_atom_noise, atoms))
        if not _NUMBERED.fullmatch(part):
            noise += sum(
                a.isdigit() != b.isdigit() or (a.islower() and b.isupper())
                for a, b in itertools.pairwise(part)
            )
    return noise


def _atom_noise(atom: str) -> float:
    if atom.isdigit():
        return 0.0
    if not _VOWELS.isdisjoint(atom) or atom.lower() in _ACRONYMS:
        return 1.0 if len(atom) == 1 and atom.islower() else 0.0
    return 1.0 if len(atom) == 1 else 2.0


def secret_name(name: str) -> bool:
    return name.lower().replace("_", "").replace("-", "") in _SECRET_NAMES


def byte_array(value: list[object]) -> bool:
    numbers = [v for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
    return len(value) >= REDACT_NUMBERS_MIN and len(numbers) == len(value)
