"""Purpose 1 consent from an IAB TCF v2 TC string (``gdpr=1&gdpr_consent=<TC string>``).

A small, dependency-free reader of the core segment defined in IAB Tech Lab's
"Transparency and Consent String with Global Vendor & CMP List Formats" (TCF v2), sections
"TC String Format" and "The Core String":

* the TC string is one or more segments joined by ``.``; the first is the core segment
  (the later ones, Disclosed Vendors, Allowed Vendors and Publisher TC, are checked for
  their alphabet only);
* each segment is base64url without padding; its bits are read most significant first;
* the core segment starts with Version (6 bits, must be 2), Created and LastUpdated
  (36 bits each, epoch deciseconds), CmpId and CmpVersion (12 each), ConsentScreen (6),
  ConsentLanguage (12: two 6-bit letters, a=0..z=25), VendorListVersion (12),
  TcfPolicyVersion (6), IsServiceSpecific (1), UseNonStandardTexts (1; "UseNonStandardStacks"
  in v2.0), SpecialFeatureOptIns (12), PurposesConsent (24) and PurposesLITransparency (24),
  where bit i stands for id i+1.

A core segment shorter than the smallest one the spec allows (the fixed fields through
PublisherCC, two empty vendor sections and NumPubRestrictions: 259 bits) is malformed. The
vendor sections are not decoded: Purpose 1 ("Store and/or access information on a device")
is a purpose-level signal, and a vendor's own consent is another question.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = ["InvalidTCString", "TCString", "decode_core", "purpose_one_consent"]

MAX_TC_STRING_CHARS = 8 * 1024
"""Longer strings are rejected before any decoding."""

_SEGMENTS = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_FIXED_BITS = 200  # Version .. PurposesLITransparency
_MIN_CORE_BITS = 213 + 2 * 17 + 12  # .. PublisherCC, two empty vendor sections, pub restrictions
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class InvalidTCString(ValueError):
    """The text is not a well-formed TCF v2 TC string."""


@dataclass(frozen=True, slots=True)
class TCString:
    """The fixed-width fields at the start of a TCF v2 core segment."""

    version: int
    created: datetime
    last_updated: datetime
    cmp_id: int
    cmp_version: int
    consent_screen: int
    consent_language: str
    vendor_list_version: int
    tcf_policy_version: int
    is_service_specific: bool
    use_non_standard_texts: bool
    special_feature_opt_ins: frozenset[int]
    purposes_consent: frozenset[int]
    purposes_li_transparency: frozenset[int]


def _core_bytes(tc_string: str) -> bytes:
    if len(tc_string) > MAX_TC_STRING_CHARS:
        raise InvalidTCString(f"longer than {MAX_TC_STRING_CHARS} characters")
    if _SEGMENTS.fullmatch(tc_string) is None:
        raise InvalidTCString("not base64url segments joined by '.'")
    core = tc_string.split(".", 1)[0]
    try:
        data = base64.b64decode(core + "=" * (-len(core) % 4), altchars=b"-_", validate=True)
    except binascii.Error as exc:
        raise InvalidTCString(f"core segment is not base64url: {exc}") from None
    if len(data) * 8 < _MIN_CORE_BITS:
        raise InvalidTCString(f"core segment has {len(data) * 8} bits, under {_MIN_CORE_BITS}")
    return data


def decode_core(tc_string: str) -> TCString:
    """Decode the fixed fields of the core segment; raise ``InvalidTCString`` if malformed."""
    if not isinstance(tc_string, str):
        raise InvalidTCString(f"expected str, got {type(tc_string).__name__}")
    head = int.from_bytes(_core_bytes(tc_string)[: _FIXED_BITS // 8], "big")
    offset = 0

    def take(width: int) -> int:
        nonlocal offset
        offset += width
        return (head >> (_FIXED_BITS - offset)) & ((1 << width) - 1)

    def ids(width: int) -> frozenset[int]:
        bits = take(width)
        return frozenset(i + 1 for i in range(width) if bits >> (width - 1 - i) & 1)

    version = take(6)
    if version != 2:
        raise InvalidTCString(f"version {version}, expected 2")
    created = _EPOCH + timedelta(milliseconds=100 * take(36))
    last_updated = _EPOCH + timedelta(milliseconds=100 * take(36))
    cmp_id, cmp_version, consent_screen = take(12), take(12), take(6)
    letters = take(6), take(6)
    if max(letters) > 25:
        raise InvalidTCString("ConsentLanguage is not two letters a..z")
    return TCString(  # keyword arguments are evaluated left to right: the take() order
        version=version,
        created=created,
        last_updated=last_updated,
        cmp_id=cmp_id,
        cmp_version=cmp_version,
        consent_screen=consent_screen,
        consent_language="".join(chr(ord("A") + letter) for letter in letters),
        vendor_list_version=take(12),
        tcf_policy_version=take(6),
        is_service_specific=bool(take(1)),
        use_non_standard_texts=bool(take(1)),
        special_feature_opt_ins=ids(12),
        purposes_consent=ids(24),
        purposes_li_transparency=ids(24),
    )


def purpose_one_consent(tc_string: str) -> bool:
    """True only if `tc_string` is a well-formed TCF v2 TC string whose core segment grants
    Purpose 1 consent. Anything malformed (bad base64url, too short, version != 2, non-str,
    empty, absurdly long > 8 KiB) returns False -- never raises."""
    try:
        return 1 in decode_core(tc_string).purposes_consent
    except InvalidTCString:
        return False
