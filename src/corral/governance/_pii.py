"""PII redaction: find personal data and secrets in text before it leaves for a model or lands
in a trace or a log, and replace them.

What is found (entity types):

- ``EMAIL``; ``PHONE`` (E.164 and ``00`` international forms, NANP, trunk-0 national numbers
  with separators, a few national mobile shapes, and bare digits when a word such as "call" or
  "phone" comes just before: dates, versions, amounts and numbers after "order", "invoice",
  "#" and the like are not phones); ``CREDIT_CARD`` (13-19 digits, grouped or not, with a
  card network's prefix and length, and the Luhn checksum); ``IBAN`` (the country's length and
  the mod-97 checksum); ``US_SSN`` (no 000, 666 or 9xx area, no 00 group, no 0000 serial;
  bare 9 digits only after "SSN" or "social security"); ``IP_ADDRESS`` (v4 with octets up to
  255, v6 as the ``ipaddress`` module parses it); ``SECRET`` (AWS, GitHub, Slack, Stripe,
  OpenAI/Anthropic-style and Google keys, JWTs, PEM private keys, bearer and basic
  credentials, passwords in URLs, ``password=``/``api_key:``/``token=`` values, and
  high-entropy tokens: see `_random_like`).
- ``PERSON`` and ``ADDRESS`` through a named-entity recognizer only: ``ner="spacy"`` (the
  ``corral[ner]`` extra and a spaCy pipeline), ``ner="rules"`` (built-in patterns that find
  names after a title or "my name is" and street addresses: precise, but they miss most names),
  or any callable.

Each type has its own compiled regex, run only when the text holds what it needs (``@`` for
e-mail, a digit for numbers, ``::`` or seven colons for IPv6, a format's prefix for known
secrets: all found in one pass over the lowercased text). Candidates are then validated
(checksums, ranges, context words). Where two findings overlap, the higher priority wins
(known secret formats, IBAN, card, e-mail, SSN, IP, phone, high-entropy tokens, names and
addresses, in that order), then the longer. About 20 µs per sentence of bench/pii.py's
corpus on one core, every structured type on: some 30 times Presidio's pattern recognizers.

Three modes replace what is found:

- ``mask``: ``<EMAIL>``.
- ``hash``: ``<EMAIL:5f0c2a9e41d7>``, the first 12 hex digits of HMAC-SHA256 under a secret
  key of the entity type and the normalized value (e-mail lowercased; digits only for cards,
  SSNs and phones; IBAN without spaces), so the same value gives the same hash in every
  trace and log written with that key, and joins still work; without the key it cannot be
  reversed or confirmed by guessing.
- ``pseudonymize``: ``<EMAIL_1>``, numbered per conversation in a `Vault` that keeps the
  originals; the same value always gets the same placeholder in that vault.
  `Vault.restore` puts the originals back into the model's answer (and `StreamRestorer` does
  so chunk by chunk), so the provider sees placeholders only while the caller gets real
  values.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import ipaddress
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias

from .._errors import UsageError

EMAIL = "EMAIL"
PHONE = "PHONE"
CREDIT_CARD = "CREDIT_CARD"
IBAN = "IBAN"
US_SSN = "US_SSN"
IP_ADDRESS = "IP_ADDRESS"
SECRET = "SECRET"
PERSON = "PERSON"
ADDRESS = "ADDRESS"

STRUCTURED_ENTITIES: tuple[str, ...] = (EMAIL, PHONE, CREDIT_CARD, IBAN, US_SSN, IP_ADDRESS,
                                        SECRET)
"""What the built-in patterns find; the default set."""
NER_ENTITIES: tuple[str, ...] = (PERSON, ADDRESS)
"""What only a named-entity recognizer finds (``ner=``)."""
ENTITIES: tuple[str, ...] = STRUCTURED_ENTITIES + NER_ENTITIES

Mode: TypeAlias = Literal["mask", "hash", "pseudonymize"]
MODES: tuple[str, ...] = ("mask", "hash", "pseudonymize")
HASH_DIGITS = 12
"""Hex digits of the HMAC kept in ``hash`` mode: 48 bits, no collision expected below
millions of distinct values per entity type."""

# Which finding wins an overlap: higher first, then the longer span.
_PRIORITY = {SECRET: 100, IBAN: 90, CREDIT_CARD: 85, EMAIL: 80, US_SSN: 75, IP_ADDRESS: 70,
             PHONE: 60, PERSON: 20, ADDRESS: 20}
_ENTROPY_PRIORITY = 30  # a high-entropy token loses to every structured identifier


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """One piece of PII: where it is in the original text and what it is. It does not hold
    the value itself, so a list of findings can be logged."""

    entity: str
    start: int
    end: int
    kind: str
    """Which rule found it: ``"luhn"``, ``"e164"``, ``"aws_access_key"``, ``"entropy"``..."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Redacted:
    """A redacted text and what was replaced in it (offsets into the original)."""

    text: str
    findings: tuple[Finding, ...]


class NER(Protocol):
    """A named-entity recognizer: ``(entity, start, end)`` for each ``PERSON`` or ``ADDRESS``
    in the text. Other entity names are ignored."""

    def __call__(self, text: str) -> Iterable[tuple[str, int, int]]: ...


# --- validators ---------------------------------------------------------------------------


def luhn(digits: str) -> bool:
    """The Luhn checksum of a string of digits (credit cards)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def card_network(digits: str) -> str | None:
    """The card network whose prefix and length ``digits`` has, or None."""
    n = len(digits)
    p2, p3, p4 = int(digits[:2]), int(digits[:3]), int(digits[:4])
    if digits[0] == "4" and n in (13, 16, 19):
        return "visa"
    if (51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16:
        return "mastercard"
    if p2 in (34, 37) and n == 15:
        return "amex"
    if (p4 == 6011 or 644 <= p3 <= 649 or p2 == 65) and 16 <= n <= 19:
        return "discover"
    if 3528 <= p4 <= 3589 and 16 <= n <= 19:
        return "jcb"
    if (300 <= p3 <= 305 or p2 in (36, 38, 39)) and 14 <= n <= 19:
        return "diners"
    if p2 == 62 and 16 <= n <= 19:
        return "unionpay"
    if (p2 == 50 or 56 <= p2 <= 69) and 12 <= n <= 19:
        return "maestro"
    return None


IBAN_LENGTHS: Mapping[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
"""IBAN length per country (the SWIFT IBAN registry)."""


def iban_valid(iban: str) -> bool:
    """An IBAN without spaces, uppercase: its country's length and the mod-97 checksum."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit():
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def ssn_valid(area: str, group: str, serial: str) -> bool:
    """The Social Security Administration's rules: no area 000, 666 or 900-999, no group 00,
    no serial 0000, and not the two numbers voided after they were printed in ads."""
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    return f"{area}{group}{serial}" not in ("078051120", "219099999")


# --- detection ----------------------------------------------------------------------------

_Hit: TypeAlias = tuple[int, int, str, str, int]  # start, end, entity, kind, priority
_Finder: TypeAlias = Callable[[str, list[_Hit]], None]

# Patterns start with the character class they need and check what precedes it afterwards
# (``x(?<!...x)``): the regex engine then skips ahead to candidate characters in C instead
# of trying a lookbehind at every position, which is 2-3x faster on ordinary prose.

_EMAIL = re.compile(  # Unicode letters too: jörg@müller.de
    r"[^\W_](?<![\w.%+\-][^\W_])[\w.%+\-']{0,63}"
    r"@[^\W_](?:[\w\-]{0,61}[^\W_])?(?:\.[^\W_](?:[\w\-]{0,61}[^\W_])?)*\.[^\W\d_]{2,24}"
    r"(?![\w\-@])")


def _find_emails(text: str, out: list[_Hit]) -> None:
    if "@" not in text:
        return
    for m in _EMAIL.finditer(text):
        local = m.group().split("@", 1)[0]
        if local.endswith(".") or ".." in local:
            continue
        out.append((m.start(), m.end(), EMAIL, "email", _PRIORITY[EMAIL]))


_CARD = re.compile(
    r"\d(?<![\w\-.]\d)(?:\d{3}([ \-]?)\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?"
    r"|\d{3}([ \-])\d{6}\2\d{4,5}|\d{12,18})(?![\w\-]|[.,]\d)")
_NON_DIGIT = re.compile(r"\D")


def _find_cards(text: str, out: list[_Hit]) -> None:
    for m in _CARD.finditer(text):
        digits = _NON_DIGIT.sub("", m.group())
        end = m.end()
        if len(digits) == 19 and m.group(1) and not (luhn(digits) and card_network(digits)):
            digits, end = digits[:16], end - 4  # a 16-digit card followed by 3 other digits
        if luhn(digits) and card_network(digits):
            out.append((m.start(), end, CREDIT_CARD, "luhn", _PRIORITY[CREDIT_CARD]))


# starts at the check digits (digits are rarer than letters, so the engine skips ahead faster)
# and looks back for the country code at a word's start
_IBAN = re.compile(r"\d(?<=(?<!\w)[A-Za-z]{2}\d)\d(?:[ ]?[A-Za-z0-9]){11,30}")


def _find_ibans(text: str, out: list[_Hit]) -> None:
    for m in _IBAN.finditer(text):
        begin = m.start() - 2
        raw = text[begin:m.end()].upper()
        length = IBAN_LENGTHS.get(raw[:2])
        if length is None:
            continue
        compact: list[str] = []
        used = 0  # take the country's length of characters, spaces skipped
        for ch in raw:
            if len(compact) == length:
                break
            used += 1
            if ch != " ":
                compact.append(ch)
        end = begin + used
        if (len(compact) == length and iban_valid("".join(compact))
                and not (end < len(text) and (text[end].isalnum() or text[end] == "_"))):
            out.append((begin, end, IBAN, "mod97", _PRIORITY[IBAN]))


_SSN = re.compile(r"\d(?<![\w\-.]\d)(\d{2})-(\d{2})-(\d{4})(?![\w\-]|[.,]\d)")
_SSN_CONTEXT = re.compile(
    r"(?i:\b(?:ssn|ss\#|social\s+security(?:\s+(?:number|no\.?|\#))?)\s{0,3}(?:is|:|=|\#)?\s{0,3})"
    r"(\d{3})[ ]?(\d{2})[ ]?(\d{4})(?![\w\-]|[.,]\d)")


def _find_ssns(text: str, out: list[_Hit]) -> None:
    for m in _SSN.finditer(text):
        start = m.start()
        if ssn_valid(text[start:start + 3], m.group(2), m.group(3)):
            out.append((start, m.end(), US_SSN, "ssn", _PRIORITY[US_SSN]))
    if "ss" in text or "SS" in text or "Social" in text or "social" in text:
        for m in _SSN_CONTEXT.finditer(text):
            if ssn_valid(m.group(1), m.group(2), m.group(3)):
                out.append((m.start(1), m.end(), US_SSN, "ssn_context", _PRIORITY[US_SSN]))


_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\w]|\.\d)")
_IPV4_NOT_AFTER = re.compile(
    r"(?i:\b(?:version|ver\.?|release|build|v|section|chapter|clause|§)\s*)$")
_IPV6 = re.compile(
    r"[0-9A-Fa-f:](?<![\w:.][0-9A-Fa-f:])[0-9A-Fa-f:]{1,38}"
    r"(?:(?<=:)\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})?(?:%[\w.\-]+)?(?![\w:]|\.\d)")


def _octets_ok(ip: str) -> bool:
    return all(len(p) == 1 or (p[0] != "0" and int(p) <= 255) for p in ip.split("."))


def _find_ips(text: str, out: list[_Hit]) -> None:
    for m in _IPV4.finditer(text):
        if _octets_ok(m.group()) and not _IPV4_NOT_AFTER.search(text, max(0, m.start() - 10),
                                                                 m.start()):
            out.append((m.start(), m.end(), IP_ADDRESS, "ipv4", _PRIORITY[IP_ADDRESS]))
    if "::" not in text and text.count(":") < 7:
        return
    for m in _IPV6.finditer(text):
        cand = m.group()
        if cand.count(":") < 2 or not any(ch.isdigit() for ch in cand):
            continue
        try:
            ipaddress.IPv6Address(cand)
        except ValueError:
            continue
        out.append((m.start(), m.end(), IP_ADDRESS, "ipv6", _PRIORITY[IP_ADDRESS]))


# Phones: a run of digit groups, then the longest valid sub-run of groups, left to right.
_PHONE = re.compile(
    r"[+(\d](?<![\w+./\-@$€£#%][+(\d])(?<!\d:[+(\d])"
    r"(?:(?<=\+)[ ]?(?:\(\d{1,5}\)[ .\-]?)?\d{1,15}"
    r"|(?<=\()\d{1,5}\)[ .\-]?\d{1,15}|(?<=\d)\d{0,14})"
    r"(?:(?:[ ]?[.\-][ ]?|[ ])(?:\(\d{1,5}\)[ .\-]?)?\d{1,15}|[ ]?\(\d{1,5}\)[ .\-]?\d{1,15})*"
    r"(?![\w@]|[.\-/:]\d)")
_GROUP = re.compile(r"\d+")
# matched against lowercased text; a word may be part of a snake_case key (work_phone,
# phone_number, order_id) or plural
_PHONE_WORDS = re.compile(
    r"(?<![a-z])(?:phone|tel|telephone|mobile|mob|cell|cellphone|call|called|calling|fax|"
    r"whatsapp|sms|text|txt|reach|dial|ring|hotline|contact|landline)(?:e?s)?(?![a-z])")
_NOT_PHONE_WORDS = re.compile(
    r"(?<![a-z])(?:order|invoice|inv|ref|reference|ticket|tracking|account|acct|isbn|serial|"
    r"sku|case|id|po|receipt|transaction|confirmation|booking|policy|patient|member|shipment|"
    r"parcel|batch|lot|version|ver|build|zip|postcode|iban|bic|card|ssn)(?:e?s)?(?![a-z])"
    r"|\#|(?<![a-z])no\.")
_PHONE_LOOKBACK = 32
_KEEP_TRUNK_0 = frozenset({"39", "378", "379"})  # Italy, San Marino, the Vatican


def _phone_context(text: str, start: int) -> int:
    """+1 when a phone word is the nearest clue before ``start``, -1 when a not-a-phone word
    (order, invoice, #...) is, 0 when neither is within reach."""
    window = text[max(0, start - _PHONE_LOOKBACK):start].lower()
    pos = [m.end() for m in _PHONE_WORDS.finditer(window)]
    neg = [m.end() for m in _NOT_PHONE_WORDS.finditer(window)]
    if not pos and not neg:
        return 0
    if pos and (not neg or pos[-1] > neg[-1]):
        return 1
    return -1


def _date_like(sizes: list[int], seps: list[str], groups: list[str]) -> bool:
    if len(sizes) != 3 or len(set(seps)) != 1 or seps[0].strip() not in ("-", ".", "/"):
        return False
    a, b, c = (int(g) for g in groups)
    if sizes[0] == 4:
        return 1 <= b <= 12 and 1 <= c <= 31
    return sizes[2] in (2, 4) and 1 <= a <= 31 and 1 <= b <= 31


def _phone_kind(text: str, groups: list[re.Match[str]], plus: bool, inner: bool,
                whole: bool) -> str | None:
    """Whether this run of digit groups is a phone number, and which form. ``inner``: the run
    starts after other digit groups of the candidate, so only a national format set apart by
    its own separators counts; ``whole``: the run is the whole candidate (a bare number is a
    phone by context only then)."""
    digits = "".join(g.group() for g in groups)
    n = len(digits)
    if plus or (digits.startswith("00") and len(groups) > 1 and not inner):
        national = digits if plus else digits[2:]
        if not 8 <= len(national) <= 15 or national[0] == "0":
            return None
        if national[0] == "1" and len(national) != 11:
            return None
        country = groups[0].group() if plus else groups[0].group()[2:]
        if (len(groups) > 1 and groups[1].group()[0] == "0" and country not in _KEEP_TRUNK_0
                and text[groups[1].start() - 1] != "("):
            return None  # +44 0532...: after the country code the trunk 0 is dropped
        return "e164" if plus else "international"
    if n < 7 or n > 15:
        return None
    start = groups[0].start()
    lead = text[start - 1] if start else ""
    sizes = [len(g.group()) for g in groups]
    seps = [text[a.end():b.start()] for a, b in itertools.pairwise(groups)]
    if _date_like(sizes, seps, [g.group() for g in groups]):
        return None
    if len(sizes) == 4 and all(s.strip() == "." for s in seps) and max(sizes) <= 3:
        return None  # an IPv4 address or a version
    if sizes == [3, 2, 4] and seps == ["-", "-"]:
        return None  # the shape of an SSN, valid or not
    if inner and lead != "(" and any(lead in sep for sep in seps):
        return None
    kind = _national_kind(text, digits, sizes, lead, groups) if len(groups) > 1 else None
    if kind is None and (inner or not whole):
        return None
    context = _phone_context(text, start - 1 if lead == "(" else start)
    if context < 0:
        return None
    return kind if kind is not None else "context" if context > 0 else None


def _national_kind(text: str, digits: str, sizes: list[int], lead: str,
                   groups: list[re.Match[str]]) -> str | None:
    """The national format a run of 2+ digit groups (without + or 00) has, if any."""
    n = len(digits)
    nd = digits[-10:]
    if (sizes[-3:] == [3, 3, 4] and (len(sizes) == 3 or sizes[:-3] == [1])
            and (n == 10 or digits[0] == "1") and nd[0] not in "01" and nd[3] not in "01"):
        return "nanp"
    if (digits[0] == "0" and digits[1] != "0" and 9 <= n <= 12
            and (sizes[0] >= 2 or lead == "(") and min(sizes[1:]) >= 2):
        return "national"
    if sizes == [5, 5] and digits[0] in "6789":
        return "national_in"  # India
    if sizes == [3, 4, 4] and digits[0] == "1" and digits[1] in "3456789":
        return "national_cn"  # China
    if lead == "(" and text[groups[0].end()] == ")" and 10 <= n <= 11:
        return "national"  # (11) 91234-5678, (020) 7946 0958
    return None


def _find_phones(text: str, out: list[_Hit]) -> None:
    # runs after the other number finders: a run inside a card, IBAN, SSN or IP found
    # already would lose to it anyway
    taken = [(h[0], h[1]) for h in out if h[4] > _PRIORITY[PHONE]]
    for m in _PHONE.finditer(text):
        plus0 = text[m.start()] == "+"
        if m.end() - m.start() < (8 if plus0 else 7):
            continue  # too few digits for any phone
        if taken and any(a <= m.start() and m.end() <= b for a, b in taken):
            continue
        groups = list(_GROUP.finditer(text, m.start(), m.end()))
        counts = [0]  # digits in groups[:k]
        for g in groups:
            counts.append(counts[-1] + g.end() - g.start())
        if len(groups) > 10 or counts[-1] < 7:
            continue
        i = 0
        emitted = False  # whether a phone ended right before groups[i]
        while i < len(groups):
            for j in range(len(groups), i, -1):
                if not 7 <= counts[j] - counts[i] <= 17:  # 17: a 00 prefix and 15 digits
                    continue
                kind = _phone_kind(text, groups[i:j], plus0 and i == 0, i > 0 and not emitted,
                                   i == 0 and j == len(groups))
                if kind is None:
                    continue
                start = m.start() if i == 0 else groups[i].start()
                if text[start] != "+" and start and text[start - 1] == "(":
                    start -= 1
                end = groups[j - 1].end()
                if end < m.end() and text[end] == ")":
                    end += 1
                out.append((start, end, PHONE, kind, _PRIORITY[PHONE]))
                i, emitted = j, True
                break
            else:
                i, emitted = i + 1, False


# Known secret formats: (kind, substrings one of which the text must hold (any case), the
# pattern). The group ``v`` is the secret's span when the pattern also matches what introduces
# it. Finding the substrings first, in one pass, lets a text skip the patterns it cannot
# match: several times faster than one alternation tried at each position.
_SECRET_RULES: tuple[tuple[str, tuple[str, ...], re.Pattern[str]], ...] = tuple(
    (kind, triggers, re.compile(pattern)) for kind, triggers, pattern in (
        ("private_key", ("-----BEGIN",),
         r"-----BEGIN[A-Z ]{0,30}PRIVATE KEY(?: BLOCK)?-----[\s\S]{16,}?"
         r"-----END[A-Z ]{0,30}PRIVATE KEY(?: BLOCK)?-----"),
        ("aws_access_key", ("AKIA", "ASIA", "ABIA", "ACCA"),
         r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b"),
        ("github_token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
         r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"),
        ("slack_token", ("xox",), r"\bxox[abposr]-[A-Za-z0-9\-]{10,250}"),
        ("stripe_key", ("k_live_", "k_test_"),
         r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,247}\b"),
        ("api_key", ("sk-",), r"\bsk-(?:[a-z0-9]{2,10}-){0,3}[A-Za-z0-9_\-]{20,256}"),
        ("sendgrid_key", ("SG.",),
         r"\bSG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}(?![\w\-])"),
        ("google_api_key", ("AIza",), r"\bAIza[0-9A-Za-z_\-]{35}(?![\w\-])"),
        ("jwt", ("eyJ",),
         r"\beyJ[A-Za-z0-9_\-]{6,}\.eyJ[A-Za-z0-9_\-]{6,}\.[A-Za-z0-9_\-]{8,}"),
        ("bearer_token", ("bearer",), r"(?i:\bbearer\s+)(?P<v>[A-Za-z0-9\-._~+/]{16,512}=*)"),
        ("basic_auth", ("basic",),
         r"(?i:\bauthorization[\"']?\s*[:=]\s*[\"']?basic\s+)(?P<v>[A-Za-z0-9+/]{8,512}={0,2})"),
        ("url_password", ("://",),
         r"(?i:\b[a-z][a-z0-9+.\-]{1,15}://[^\s/:@]{0,64}:)(?P<v>[^\s/]{1,128})(?=@)"),
        ("assignment", ("pass", "secret", "key", "token"),
         r"(?i:(?<![A-Za-z0-9])(?P<key>password|passwd|passphrase|secret|api[_\-]?key|"
         r"access[_\-]?key|secret[_\-]?(?:access[_\-]?)?key|"
         r"(?:access|auth|refresh|api|session|bearer)[_\-]?token|client[_\-]?secret|"
         r"private[_\-]?key|token)(?:[\"']?\s{0,3}[:=]\s{0,3}[\"']?|(?P<said>\s+is)\s+[\"']?))"
         r"(?P<v>[^\s\"',;&<>]{4,256})"),
    ))
_PLACEHOLDER_VALUES = frozenset({
    "none", "null", "nil", "true", "false", "required", "optional", "string", "str", "empty",
    "undefined", "hidden", "redacted", "masked", "secret", "password", "changeit", "your_password",
    "example", "xxxx", "xxxxxxxx",
})
_PASSWORD_KEYS = ("password", "passwd", "passphrase")


def _assignment_ok(key: str, value: str, said: bool) -> bool:
    """Whether ``value`` after ``key=`` (or, ``said``, after "key is") is a real secret."""
    if value[0] in "$<{%*(#[" or value.lower().strip(".") in _PLACEHOLDER_VALUES:
        return False
    if len(set(value)) == 1 or (value.isdigit() and len(value) < 6):
        return False
    if key.lower() in _PASSWORD_KEYS and not said:
        return True
    # other keys ("secret", "token") say less: a plain word after them is prose, not a secret
    return not (value.isalpha() and (value.islower() or value.istitle()))


# one pass over the lowercased text finds which rules can match (re.I would be 7x slower)
_SECRET_TRIGGERS = re.compile(
    "|".join(re.escape(t.lower()) for _, triggers, _ in _SECRET_RULES for t in triggers))


def _find_known_secrets(text: str, out: list[_Hit]) -> None:
    found = set(_SECRET_TRIGGERS.findall(text.lower()))
    if not found:
        return
    for kind, triggers, pattern in _SECRET_RULES:
        if not any(t.lower() in found for t in triggers):
            continue
        for m in pattern.finditer(text):
            span = "v" if "v" in pattern.groupindex else 0
            value = m.group(span)
            if kind == "assignment" and not _assignment_ok(m.group("key"), value,
                                                           m.group("said") is not None):
                continue
            if kind in ("bearer_token", "api_key") and not (
                    any(c.isdigit() for c in value) and any(c.isalpha() for c in value)):
                continue
            out.append((m.start(span), m.end(span), SECRET, kind, _PRIORITY[SECRET]))


_DIGIT = re.compile(r"\d")
_TOKEN = re.compile(
    r"(?<![A-Za-z0-9+/_\-@\\])[A-Za-z0-9+/_\-]{20,}={0,2}(?![A-Za-z0-9+/_\-=@\\])")
_IBAN_SHAPED = re.compile(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}")
_HEX_OR_UUID = re.compile(r"[0-9a-fA-F\-]+")
_WORD_SEGMENT = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")
_CONSONANTS4 = re.compile(r"[^aeiouy]{4}")
_SEPARATORS = re.compile(r"[\-_./]")
ENTROPY_MIN_LENGTH = 20
ENTROPY_MIN_BITS = 3.5
ENTROPY_MAX_WORDINESS = 0.6


def _wordiness(token: str) -> float:
    """The share of letters in word-like segments (3+ letters of one camelCase word with a vowel
    and no 4 consonants in a row): identifiers, slugs and file names score high, random strings
    low (a 32-character random base62 string scores 0.25 at the median, 0.67 at the 99th
    percentile)."""
    letters = wordy = 0
    for seg in _WORD_SEGMENT.findall(token):
        letters += len(seg)
        low = seg.lower()
        if len(seg) >= 3 and any(v in low for v in "aeiouy") and not _CONSONANTS4.search(low):
            wordy += len(seg)
    return wordy / letters if letters else 1.0


def _shannon(token: str) -> float:
    n = len(token)
    return -sum(c / n * math.log2(c / n) for c in Counter(token).values())


def _random_like(token: str) -> bool:
    """Whether a token of 20+ characters looks like a generated secret: letters and digits,
    both cases unless it has 24+ characters, at least 3.5 bits of entropy per character, not
    made of words (`_wordiness` below 0.6), not a slug of short parts (``gpt-4o-mini-2024``).

    Hex strings and UUIDs are left alone on purpose: they are mostly commit ids, content
    hashes and record ids, and a hex-encoded secret usually comes with a name
    (``api_key=...``) that the assignment rule catches."""
    n = len(token)
    if _HEX_OR_UUID.fullmatch(token) or _IBAN_SHAPED.fullmatch(token):
        return False  # an IBAN with a wrong checksum is no secret either
    has_digit = _DIGIT.search(token) is not None
    has_lower = token != token.upper()
    has_upper = token != token.lower()
    if not has_digit or not (has_lower or has_upper):
        return False
    if not (has_lower and has_upper) and n < 24:
        return False
    seps = len(_SEPARATORS.findall(token))
    if seps >= 2 and (n - seps) / (seps + 1) <= 6:
        return False
    return _shannon(token) >= ENTROPY_MIN_BITS and _wordiness(token) < ENTROPY_MAX_WORDINESS


def _find_entropy(text: str, out: list[_Hit]) -> None:
    known = [(h[0], h[1]) for h in out if h[2] == SECRET]
    for m in _TOKEN.finditer(text):
        if known and any(a < m.end() and m.start() < b for a, b in known):
            continue  # part of a secret found by its format
        token = m.group()
        parts = token.split("/")
        if len(parts) > 1 and any(len(p) >= 3 and p.isalpha() and p.islower() for p in parts):
            pos = m.start()  # a path (com/document/d/<id>/edit): judge its parts
            for part in parts:
                if len(part) >= ENTROPY_MIN_LENGTH and _random_like(part):
                    out.append((pos, pos + len(part), SECRET, "entropy", _ENTROPY_PRIORITY))
                pos += len(part) + 1
        elif _random_like(token):
            out.append((m.start(), m.end(), SECRET, "entropy", _ENTROPY_PRIORITY))


def _find_secrets(text: str, out: list[_Hit]) -> None:
    _find_known_secrets(text, out)
    _find_entropy(text, out)


def _has_digit(text: str) -> bool:
    return _DIGIT.search(text) is not None

# entity -> (finder, needs a digit in the text), in the order they run (phones last)
_FINDERS: dict[str, tuple[_Finder, bool]] = {
    EMAIL: (_find_emails, False),
    SECRET: (_find_secrets, False),
    CREDIT_CARD: (_find_cards, True),
    IBAN: (_find_ibans, True),
    US_SSN: (_find_ssns, True),
    IP_ADDRESS: (_find_ips, True),  # an IPv6 address is only taken with a digit in it
    PHONE: (_find_phones, True),
}


def _resolve(hits: list[_Hit]) -> list[_Hit]:
    """Keep the best of overlapping hits: higher priority, then longer, then earlier."""
    if len(hits) < 2:
        return hits
    hits.sort(key=lambda h: (-h[4], h[0] - h[1], h[0]))
    kept: list[_Hit] = []
    for hit in hits:
        if all(hit[1] <= k[0] or hit[0] >= k[1] for k in kept):
            kept.append(hit)
    kept.sort()
    return kept


# --- named entities -----------------------------------------------------------------------

_NAME = r"[A-Z][a-z]+(?:[\-'][A-Z][a-z]+)?"
_RULE_PERSON = re.compile(
    r"\b(?:(?:Mr|Mrs|Ms|Mx|Dr|Prof)\.?|Miss|Sir|Dame)[ ]+"
    rf"(?P<a>{_NAME}(?:[ ]+(?:[A-Z]\.[ ]+)?{_NAME}){{0,2}})"
    r"|(?i:\b(?:my\s+name\s+is|my\s+name's|(?:full\s+)?name\s*:|signed\s*,?)\s*)"
    rf"(?P<b>{_NAME}(?:[ ]+(?:[A-Z]\.[ ]+)?{_NAME}){{0,2}})")
_STREET = (r"(?:Street|Avenue|Road|Boulevard|Lane|Drive|Court|Way|Place|Terrace|Parkway|"
           r"Highway|Circle|Square|Close|Crescent|Row)\b"
           r"|(?:St|Ave|Rd|Blvd|Ln|Dr|Ct|Pl|Pkwy|Hwy|Sq)\b\.?")
_RULE_ADDRESS = re.compile(
    rf"\b\d{{1,5}}[A-Z]?[ ]+(?:[NSEW]\.?[ ]+)?(?:{_NAME}[ ]+){{1,3}}(?:{_STREET})"
    r"(?:,?[ ]+(?:Apt|Apartment|Suite|Ste|Unit|Flat)\.?[ ]*\#?[\w\-]+)?"
    rf"(?:,[ ]*{_NAME}(?:[ ]+{_NAME}){{0,2}})?"
    r"(?:,?[ ]+[A-Z]{2}(?![a-z]))?(?:,?[ ]+\d{5}(?:-\d{4})?)?"
    r"(?:,?[ ]+[A-Z]{1,2}\d[A-Z\d]?[ ]\d[A-Z]{2})?"
    r"|\b[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|weg|gasse|platz|allee|ring|damm)[ ]+\d{1,4}[a-z]?"
    r"(?:,[ ]*\d{5}[ ]+[A-ZÄÖÜ][a-zäöüß]+)?"
    r"|\b\d{1,4}(?:[ ]?(?:bis|ter))?,?[ ]+(?:rue|avenue|boulevard|place|allée|impasse|chemin|quai)"
    r"[ ]+(?:(?:de|du|des|la|le)[ ]+|[dl]')*[A-ZÉ][\w\-']+(?:[ ]+[A-ZÉ][\w\-']+)*"
    r"(?:,[ ]*\d{5}[ ]+[A-ZÉ][\w\-]+)?")


class RulesNER:
    """Built-in patterns for names and addresses, for when no NER model can be installed:
    names after a title (Mr, Ms, Dr, Prof...), "my name is" or "Name:"; street addresses with a
    number and a street type (``221B Baker Street, London NW1 6XE``, ``1600 Pennsylvania Avenue
    NW, Washington, DC 20500``), German ``...straße 5`` and French ``12 rue de la Paix``.
    What they find is nearly always right; most names (those without a title) they miss."""

    def __call__(self, text: str) -> Iterator[tuple[str, int, int]]:
        for m in _RULE_PERSON.finditer(text):
            group = "a" if m.group("a") else "b"
            yield PERSON, m.start(group), m.end(group)
        if _has_digit(text):
            for m in _RULE_ADDRESS.finditer(text):
                yield ADDRESS, m.start(), m.end()


DEFAULT_SPACY_MODEL = "en_core_web_sm"
SPACY_LABELS: Mapping[str, str] = {"PERSON": PERSON, "FAC": ADDRESS, "LOC": ADDRESS}
"""spaCy's labels that count as names and addresses. GPE (cities, countries) is left out: a
city alone identifies nobody and the model needs it to answer."""
NER_INSTALL = ("pip install 'corral[ner]' && python -m spacy download en_core_web_sm")


class SpacyNER:
    """Names and addresses from a spaCy pipeline (the ``corral[ner]`` extra).

    ``model`` is a pipeline's package name or a loaded ``Language``. Street addresses are
    found by the built-in rules as well, since spaCy's models have no label for them."""

    def __init__(self, model: str | Any = DEFAULT_SPACY_MODEL, *,
                 labels: Mapping[str, str] = SPACY_LABELS) -> None:
        if isinstance(model, str):
            try:
                spacy = importlib.import_module("spacy")
            except ImportError as exc:
                raise ImportError(f"names and addresses need spaCy, which is not installed: "
                                  f"{NER_INSTALL}, or use ner='rules'") from exc
            try:
                model = spacy.load(model)
            except OSError as exc:
                raise ImportError(f"the spaCy pipeline {model!r} is not installed: "
                                  f"python -m spacy download {model}") from exc
        self._nlp = model
        self._labels = dict(labels)
        self._rules = RulesNER()

    def __call__(self, text: str) -> Iterator[tuple[str, int, int]]:
        for ent in self._nlp(text).ents:
            entity = self._labels.get(ent.label_)
            if entity is not None:
                yield entity, ent.start_char, ent.end_char
        for entity, start, end in self._rules(text):
            if entity == ADDRESS:
                yield entity, start, end


# --- replacement --------------------------------------------------------------------------


def normalize(entity: str, value: str) -> str:
    """The form two spellings of one value share: what ``hash`` mode hashes and what a
    `Vault` compares."""
    if entity in (CREDIT_CARD, US_SSN):
        return _NON_DIGIT.sub("", value)
    if entity == PHONE:
        digits = _NON_DIGIT.sub("", value)
        if value.lstrip().startswith("+"):
            return "+" + digits
        return "+" + digits[2:] if digits.startswith("00") else digits
    if entity == EMAIL:
        return value.lower()
    if entity == IBAN:
        return value.replace(" ", "").upper()
    if entity == IP_ADDRESS:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value
    if entity in (PERSON, ADDRESS):
        return " ".join(value.split()).casefold()
    return value


_PLACEHOLDER = re.compile(
    r"(?:<|&lt;|\\<|\[)[ ]?([A-Za-z]+(?:_[A-Za-z]+)*_\d+)[ ]?(?:>|&gt;|\\>|\])")
# a text that may still grow into a placeholder: an opener, then a prefix of the rest
_PARTIAL = re.compile(
    r"&(?:lt?)?|\\|(?:<|&lt;|\\<|\[)[ ]?[A-Za-z_]*\d*[ ]?(?:&(?:gt?)?|\\)?")
_OPENERS = frozenset("<&\\[")
MAX_PLACEHOLDER = 48
"""Longest placeholder form `StreamRestorer` holds back (``&lt; CREDIT_CARD_12345 &gt;``)."""


class Vault:
    """One conversation's pseudonyms: placeholder <-> original, kept in memory and never sent.

    The same value (after `normalize`) always gets the same placeholder, numbered per entity
    type in order of first appearance: ``<EMAIL_1>``, ``<EMAIL_2>``, ``<PHONE_1>``. Use one
    vault per conversation: the numbers mean nothing across vaults. Not thread-safe."""

    def __init__(self) -> None:
        self._placeholders: dict[tuple[str, str], str] = {}
        self._originals: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._originals)

    def placeholder(self, entity: str, value: str) -> str:
        """The placeholder for ``value``, allocating the next number on first sight."""
        key = (entity, normalize(entity, value))
        name = self._placeholders.get(key)
        if name is None:
            count = self._counts.get(entity, 0) + 1
            self._counts[entity] = count
            name = f"{entity}_{count}"
            self._placeholders[key] = name
            self._originals[name] = value
        return f"<{name}>"

    def original(self, placeholder: str) -> str | None:
        """The value behind ``<EMAIL_1>`` (or ``EMAIL_1``), or None if this vault has none."""
        return self._originals.get(placeholder.strip("<>[] ").upper())

    def restore(self, text: str) -> str:
        """``text`` with every placeholder of this vault replaced by its original.

        Tolerates what models do to placeholders: any case (``<email_1>``), a space inside the
        brackets, HTML-escaped (``&lt;EMAIL_1&gt;``), backslash-escaped (``\\<EMAIL_1\\>``) or
        square brackets (``[EMAIL_1]``), in the middle of other text. Placeholders this vault
        did not hand out are left as they are; a bare ``EMAIL_1`` without brackets is too."""
        if not self._originals or not any(ch in text for ch in "<&\\["):
            return text
        originals = self._originals
        return _PLACEHOLDER.sub(
            lambda m: originals.get(m.group(1).upper(), m.group()), text)

    def stream(self) -> StreamRestorer:
        """A `StreamRestorer` for one streamed answer."""
        return StreamRestorer(self)

    def to_dict(self) -> dict[str, Any]:
        """The vault as JSON-able data, to keep it with the conversation (it holds the
        originals: store it where the conversation itself is stored, never in a trace)."""
        return {"originals": dict(self._originals), "counts": dict(self._counts),
                "keys": [[e, v, name] for (e, v), name in self._placeholders.items()]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vault:
        vault = cls()
        vault._originals = dict(data["originals"])
        vault._counts = dict(data["counts"])
        vault._placeholders = {(e, v): name for e, v, name in data["keys"]}
        return vault


class StreamRestorer:
    """Restores placeholders in a streamed answer, chunk by chunk.

    A placeholder may be split across chunks (``"<EMA"`` then ``"IL_1> wrote"``): `feed`
    returns what is safe to emit now and holds back a tail that may still become a
    placeholder (at most `MAX_PLACEHOLDER` characters, until the next chunk); `flush` returns
    the rest when the stream ends. The concatenated output equals ``vault.restore`` of the
    whole answer."""

    def __init__(self, vault: Vault) -> None:
        self._vault = vault
        self._pending = ""

    def feed(self, chunk: str) -> str:
        if not isinstance(chunk, str):
            raise TypeError(f"StreamRestorer.feed takes str, got {type(chunk).__name__}")
        text = self._pending + chunk
        cut = _hold_from(text)
        self._pending = text[cut:]
        return self._vault.restore(text[:cut])

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return self._vault.restore(text)


def _hold_from(text: str) -> int:
    """Where the earliest tail of ``text`` that may grow into a placeholder starts."""
    n = len(text)
    for i in range(max(0, n - MAX_PLACEHOLDER), n):
        if text[i] in _OPENERS and _PARTIAL.fullmatch(text, i):
            return i
    return n


# --- the redactor -------------------------------------------------------------------------


class Redactor:
    """Finds and replaces PII. Build one per configuration and share it: it holds no state
    per text (pseudonyms live in the `Vault` passed to each call).

    ``entities``: what to find, from `ENTITIES` (default: `STRUCTURED_ENTITIES`). ``PERSON``
    and ``ADDRESS`` need ``ner``: ``"spacy"`` (`SpacyNER`), ``"rules"`` (`RulesNER`) or a
    callable. ``mode``: ``"mask"``, ``"hash"`` (needs ``key``, the HMAC secret: at least 16
    bytes, kept out of the traces it protects) or ``"pseudonymize"`` (each call takes a
    ``vault``)."""

    def __init__(self, entities: Iterable[str] | None = None, *, mode: Mode = "mask",
                 key: bytes | str | None = None, ner: NER | Literal["spacy", "rules"] | None = None,
                 ) -> None:
        if isinstance(entities, str):
            raise TypeError(f"entities takes a collection of names, got the string {entities!r}:"
                            f" write [{entities!r}]")
        wanted = tuple(STRUCTURED_ENTITIES if entities is None else dict.fromkeys(entities))
        unknown = [e for e in wanted if e not in ENTITIES]
        if unknown:
            raise UsageError(f"unknown PII entity type {', '.join(map(repr, unknown))}: "
                             f"the types are {', '.join(ENTITIES)}", unknown=unknown)
        if mode not in MODES:
            raise UsageError(f"unknown redaction mode {mode!r}: the modes are "
                             f"{', '.join(MODES)}", mode=mode)
        if mode == "hash":
            if key is None:
                raise UsageError("mode='hash' needs key=, a secret of at least 16 bytes (for "
                                 "example secrets.token_bytes(32)), so hashes cannot be "
                                 "reversed by guessing values")
            key = key.encode() if isinstance(key, str) else key
            if len(key) < 16:
                raise UsageError(f"the hash key has {len(key)} bytes; use at least 16")
        self.entities = wanted
        self.mode: Mode = mode
        self._key = key if isinstance(key, bytes) else None
        named = [e for e in wanted if e in NER_ENTITIES]
        self._ner: NER | None = None
        if named:
            if ner is None:
                raise UsageError(
                    f"{' and '.join(named)} need a named-entity recognizer: pass ner='spacy' "
                    f"({NER_INSTALL}), ner='rules' (built-in patterns: names after a title or "
                    f"'my name is', street addresses; precise but they miss most names), or "
                    f"a callable", entities=named)
            if ner == "spacy":
                self._ner = SpacyNER()
            elif ner == "rules":
                self._ner = RulesNER()
            elif callable(ner):
                self._ner = ner
            else:
                raise UsageError(f"unknown ner {ner!r}: use 'spacy', 'rules' or a callable")
        self._named = frozenset(named)
        finders = [f for e, f in _FINDERS.items() if e in wanted]
        self._any = [f for f, needs_digit in finders if not needs_digit]
        self._numeric = [f for f, needs_digit in finders if needs_digit]

    def detect(self, text: str) -> list[Finding]:
        """What `redact` would replace, in order."""
        _check_text(text, "detect")
        return [Finding(entity=e, start=s, end=t, kind=k) for s, t, e, k, _ in self._hits(text)]

    def redact(self, text: str, *, vault: Vault | None = None) -> Redacted:
        """``text`` with every finding replaced; ``vault`` is required in ``pseudonymize``
        mode (one per conversation) and ignored otherwise."""
        _check_text(text, "redact")
        if self.mode == "pseudonymize" and vault is None:
            raise UsageError("mode='pseudonymize' needs a Vault per conversation: "
                             "redactor.redact(text, vault=vault)")
        return self._apply(text, self._hits(text), vault)

    def redact_json(self, obj: Any, *, vault: Vault | None = None) -> Any:
        """A copy of a JSON-like value (dict, list, tuple, str, int, float, bool, None) with
        every string redacted, keys included (a key that redacts to one already present gets
        ``#2``, ``#3``... so nothing is lost). A value is read with its key as context, so
        ``{"phone": "4155552671"}`` and ``{"password": "hunter2"}`` are found though the value
        alone says nothing. An int whose digits are one finding (a phone or card stored as a
        number) becomes the redacted string. For traces, logs and tool arguments."""
        if self.mode == "pseudonymize" and vault is None:
            raise UsageError("mode='pseudonymize' needs a Vault per conversation: "
                             "redactor.redact_json(obj, vault=vault)")
        return self._json(obj, vault, "$", None)

    def _json(self, obj: Any, vault: Vault | None, path: str, key: str | None) -> Any:
        if isinstance(obj, str):
            return self._value(obj, vault, key).text
        if obj is None or isinstance(obj, bool | float):
            return obj
        if isinstance(obj, int):
            digits = str(obj)
            if len(digits) < 7:
                return obj
            done = self._value(digits, vault, key)
            whole = [f for f in done.findings if f.end - f.start == len(digits)]
            return done.text if whole else obj
        if isinstance(obj, dict):
            out: dict[Any, Any] = {}
            for k, v in obj.items():
                name = self._apply(k, self._hits(k), vault).text if isinstance(k, str) else k
                if name in out:
                    n = 2
                    while f"{name}#{n}" in out:
                        n += 1
                    name = f"{name}#{n}"
                out[name] = self._json(v, vault, f"{path}.{name}",
                                       k if isinstance(k, str) else None)
            return out
        if isinstance(obj, list | tuple):
            items = [self._json(v, vault, f"{path}[{i}]", key) for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        raise TypeError(f"redact_json takes JSON-like values (dict, list, tuple, str, int, "
                        f"float, bool, None), got {type(obj).__name__} at {path}")

    def _value(self, text: str, vault: Vault | None, key: str | None) -> Redacted:
        """Redact ``text`` read after ``key: `` (what is found in the key itself is dropped)."""
        if not key:
            return self._apply(text, self._hits(text), vault)
        skip = len(key) + 2
        hits = [(s - skip, e - skip, entity, kind, p)
                for s, e, entity, kind, p in self._hits(f"{key}: {text}") if s >= skip]
        return self._apply(text, hits, vault)

    def _apply(self, text: str, hits: list[_Hit], vault: Vault | None) -> Redacted:
        if not hits:
            return Redacted(text=text, findings=())
        parts: list[str] = []
        pos = 0
        for start, end, entity, _, _ in hits:
            parts.append(text[pos:start])
            parts.append(self._replacement(entity, text[start:end], vault))
            pos = end
        parts.append(text[pos:])
        return Redacted(text="".join(parts), findings=tuple(
            Finding(entity=e, start=s, end=t, kind=k) for s, t, e, k, _ in hits))

    def _hits(self, text: str) -> list[_Hit]:
        hits: list[_Hit] = []
        for find in self._any:
            find(text, hits)
        if self._numeric and _has_digit(text):
            for find in self._numeric:
                find(text, hits)
        if self._ner is not None:
            for entity, start, end in self._ner(text):
                if entity in self._named and 0 <= start < end <= len(text):
                    hits.append((start, end, entity, "ner", _PRIORITY[entity]))
        return _resolve(hits)

    def _replacement(self, entity: str, value: str, vault: Vault | None) -> str:
        if self.mode == "mask":
            return f"<{entity}>"
        if self.mode == "hash":
            assert self._key is not None
            digest = hmac.new(self._key, f"{entity}\0{normalize(entity, value)}".encode(),
                              hashlib.sha256).hexdigest()
            return f"<{entity}:{digest[:HASH_DIGITS]}>"
        assert vault is not None
        return vault.placeholder(entity, value)


def _check_text(text: object, verb: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"Redactor.{verb} takes str, got {type(text).__name__}"
                        + ("; decode it first" if isinstance(text, bytes | bytearray) else "")
                        + ("; use redact_json for structures" if isinstance(
                            text, dict | list | tuple) else ""))
