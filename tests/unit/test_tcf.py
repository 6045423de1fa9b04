"""The TCF v2 core-segment reader: published example strings, built strings, malformed input."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xsp_middleware.tcf import (
    MAX_TC_STRING_CHARS,
    InvalidTCString,
    TCString,
    decode_core,
    purpose_one_consent,
)

# --- A tiny encoder: (value, width) fields -> bits -> base64url without padding. ---------------


def b64url(bits: str) -> str:
    bits += "0" * (-len(bits) % 8)
    raw = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def field(value: int, width: int) -> str:
    assert 0 <= value < 1 << width
    return format(value, f"0{width}b")


def id_bits(ids: frozenset[int], width: int) -> str:
    return "".join("1" if i in ids else "0" for i in range(1, width + 1))


def core_bits(
    *,
    version: int = 2,
    created: int = 15_800_000_000,  # deciseconds: 2020-01-25T01:46:40Z
    last_updated: int = 15_800_000_010,
    cmp_id: int = 7,
    cmp_version: int = 3,
    consent_screen: int = 1,
    language: tuple[int, int] = (4, 13),  # "EN"
    vendor_list_version: int = 42,
    policy_version: int = 4,
    service_specific: bool = True,
    non_standard_texts: bool = False,
    special_features: frozenset[int] = frozenset(),
    purposes: frozenset[int] = frozenset(),
    li: frozenset[int] = frozenset(),
) -> str:
    """A whole, minimal core segment: empty vendor sections, no publisher restrictions."""
    return (
        field(version, 6)
        + field(created, 36)
        + field(last_updated, 36)
        + field(cmp_id, 12)
        + field(cmp_version, 12)
        + field(consent_screen, 6)
        + field(language[0], 6)
        + field(language[1], 6)
        + field(vendor_list_version, 12)
        + field(policy_version, 6)
        + field(int(service_specific), 1)
        + field(int(non_standard_texts), 1)
        + id_bits(special_features, 12)
        + id_bits(purposes, 24)
        + id_bits(li, 24)
        + field(0, 1)  # PurposeOneTreatment
        + field(0, 6)
        + field(0, 6)  # PublisherCC "AA"
        + (field(0, 16) + field(0, 1)) * 2  # vendor consents, vendor LI: MaxVendorId 0, bitfield
        + field(0, 12)  # NumPubRestrictions
    )


def core(**kwargs: Any) -> str:
    return b64url(core_bits(**kwargs))


GRANTED = core(purposes=frozenset({1, 2, 3}))
DENIED = core(purposes=frozenset({2, 3}))

# --- Published examples with documented decodings. ---------------------------------------------

# InteractiveAdvertisingBureau/iabtcf-java,
# iabtcf-decoder/src/test/java/com/iabtcf/decoder/TCStringV2Test.java
# testCanConstructTCModelFromBase64String
JAVA_FULL = "COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA"
JAVA_BITFIELDS = (  # testConstructConsentsFromBitFields
    "COrEAV4OrXx94ACABBENAHCIAD-AAAAAAACAAxAAAAgAIAwgAgAAAAEAgQAAAAAEAYQAQAAAACAAAABAAA"
)
JAVA_OOB = ".IBAgAAAgAIAwgAgAAAAEAAAACA.QAagAQAgAIAwgA"  # testCanParseDisclosedAndAllowedVendors
JAVA_PUB_TC = ".cAAAAAAAITg="  # testCanParseAllParts: a padded Publisher TC segment
JAVA_P1_P2 = "COwxsONOwxsONKpAAAENAdCAAMAAAAAAAAAAAAAAAAAA"  # testPurposesConsent: contains 1, 2
# InteractiveAdvertisingBureau/iabtcf-es, modules/cli/README.md (the `tcstring` CLI output)
ES_CLI = "COrVd1pOrVd1pACABCENAHCAAAAAAAAAAAiQAAAAAAAA"
# InteractiveAdvertisingBureau/iabtcf-es, modules/core/test/ReportedIssues.test.ts
ES_ISSUE_156_V1 = (  # "156 it should auto detect 1 version": a TCF v1.1 consent string
    "BOhwdphOxFC7tAHABBFRC--AAAAuhr_7__7-_9_-_f__9uj3Or_v_f__32ccL59v_h_7v-_7fi_20nV4u_1vft9yfk1"
    "-5ctDztp507iakivXmqdeb9v_nz3_5pxP78k89r7337Ew_v8_v-b7BCON_YxEiA"
)
ES_ISSUE_201 = (  # "201 unable to decode valid TCF2 String": version 2, publisher restrictions
    "CO4VGswO4VGswAfZCBDEAzCsAP_AAH_AAAigGUNf_X9fb2vj-_599_t0eY1f9_63t-wzjheMs-8NyZ-X_J4Wv2MyvB34"
    "JqQKGRgkunLBAQdtHGncTQgBwIlViTLMY02MjzNKJrJEilsbe2dYGH9vn8XT_ZKZ70-_v__7v3___33_5Ayhr_6_r7e18"
    "f3_Pvv9ujzGr_v_W9v2GccLxln3huTPy_5PC1-xmV4O_BNSBQyMEl05YICDto407iaEAOBEqsSZZjGmxkeZpRNZIkUtjb2"
    "zrAw_t8_i6f7JTPen39___d-___--__ICgKAOAAcAA4AFAAjgB6AEYALcGACAW0AtoJAHAAOAAcACgARwA9ACMAFuFABA"
    "LaAW0GgDgAHAAOABQAI4AegBGAC3DgAgFtALaEQBwADgAHAAoAEcAPQAjABbiQAQC2gFtCoA4ABwADgAUACOAHoARgAtx"
    "YAIBbQC2hkAcAA4ABwAKABHAD0AIwAW40AEAtoBbQ6AOAAcAA4AFAAjgB6AEYALceACAW0AtohAHAAOAAcACgARwA9ACM"
    "AFuRABALaAW0SgDgAHAAOABQAI4AegBGAC3JgAgFtALaKQBwADgAHAAoAEcAPQAjABblQAQC2gFtA"
)
# id5io/id5-api.js, test/spec/tcfUtils.spec.js (purpose consents 1..10 documented per string)
ID5_VENDORS = (
    ".II7Nd_X__bX9n-_7_6ft0eY1f9_r37uQzDhfNs-8F3L_W_LwX32E7NF36tq4KmR4ku1bBIQNtHMnUDUmxaolVrzHsak2"
    "cpyNKJ_JkknsZe2dYGF9Pn9lD-YKZ7_5_9_f52T_9_9_-39z3_9f___dv_-__-vjf_599n_v9fV_78_Kf9______-___"
    "_________8A"
)
ID5_CASES = [
    ("CPh7_cXPh7_cXKMAAAENCZCAAKqAAAAAAAAAAAAAAAAA", frozenset({1, 3, 5, 7, 9})),
    ("CPh8CeXPh8CeXMgAAAENCZCAAFVAAAAAAAAAAAAAAAAA", frozenset({2, 4, 6, 8, 10})),
    ("CPh8CoIPh8CoINYAAAENCZCAAP_AAAAAAAAAAAAAAAAA", frozenset(range(1, 11))),
    ("CPh8CjOPh8CjOEZAAAENCZCAAAAAAAAAAAAAAAAAAAAA", frozenset()),
]


def test_iabtcf_java_full_core_decoding() -> None:
    tc = decode_core(JAVA_FULL)
    assert tc == TCString(
        version=2,
        created=datetime(2020, 1, 26, 17, 1, tzinfo=UTC),
        last_updated=datetime(2021, 2, 2, 17, 1, tzinfo=UTC),
        cmp_id=675,
        cmp_version=2,
        consent_screen=1,
        consent_language="EN",
        vendor_list_version=15,
        tcf_policy_version=2,
        is_service_specific=False,
        use_non_standard_texts=False,
        special_feature_opt_ins=frozenset({1}),
        purposes_consent=frozenset({2, 10}),
        purposes_li_transparency=frozenset({2, 9}),
    )
    assert not purpose_one_consent(JAVA_FULL)


@pytest.mark.parametrize("tc_string", [JAVA_BITFIELDS, JAVA_BITFIELDS + JAVA_OOB])
def test_iabtcf_java_purposes_3_to_9(tc_string: str) -> None:
    tc = decode_core(tc_string)
    assert tc.version == 2
    assert tc.purposes_consent == frozenset(range(3, 10))
    assert not purpose_one_consent(tc_string)


def test_iabtcf_java_padded_segment_is_rejected() -> None:
    # iabtcf-java tolerates the '=' padding of its testCanParseAllParts string; we do not.
    assert decode_core(JAVA_BITFIELDS + JAVA_OOB).version == 2
    with pytest.raises(InvalidTCString):
        decode_core(JAVA_BITFIELDS + JAVA_OOB + JAVA_PUB_TC)
    assert not purpose_one_consent(JAVA_BITFIELDS + JAVA_OOB + JAVA_PUB_TC)


def test_iabtcf_java_purpose_one_granted() -> None:
    tc = decode_core(JAVA_P1_P2)
    assert tc.version == 2
    assert {1, 2} <= tc.purposes_consent
    assert purpose_one_consent(JAVA_P1_P2)


def test_iabtcf_es_cli_readme() -> None:
    tc = decode_core(ES_CLI)
    assert (tc.version, tc.cmp_id, tc.cmp_version, tc.consent_screen) == (2, 2, 1, 2)
    assert (tc.consent_language, tc.vendor_list_version, tc.tcf_policy_version) == ("EN", 7, 2)
    assert not tc.is_service_specific and not tc.use_non_standard_texts
    # "Mon Dec 09 2019 18:01:46 GMT-0800"; the seconds' tenths are not shown there.
    assert tc.created == tc.last_updated
    assert tc.created.replace(microsecond=0) == datetime(2019, 12, 10, 2, 1, 46, tzinfo=UTC)


def test_iabtcf_es_issue_201_decodes_as_version_2() -> None:
    tc = decode_core(ES_ISSUE_201)
    assert tc.version == 2
    assert purpose_one_consent(ES_ISSUE_201) is (1 in tc.purposes_consent)


def test_iabtcf_es_version_1_string() -> None:
    with pytest.raises(InvalidTCString, match="version 1"):
        decode_core(ES_ISSUE_156_V1)
    assert not purpose_one_consent(ES_ISSUE_156_V1)


@pytest.mark.parametrize(("core_segment", "purposes"), ID5_CASES)
def test_id5_purpose_consents(core_segment: str, purposes: frozenset[int]) -> None:
    for tc_string in (core_segment, core_segment + ID5_VENDORS):
        tc = decode_core(tc_string)
        assert tc.version == 2
        assert tc.purposes_consent == purposes
        assert purpose_one_consent(tc_string) is (1 in purposes)


# --- Strings built here. ------------------------------------------------------------------------


def test_built_purpose_one_granted_and_not() -> None:
    assert purpose_one_consent(GRANTED)
    assert not purpose_one_consent(DENIED)
    assert not purpose_one_consent(core())
    assert not purpose_one_consent(core(li=frozenset({1})))  # LI transparency is not consent
    assert purpose_one_consent(core(purposes=frozenset({1})))
    assert purpose_one_consent(core(purposes=frozenset(range(1, 25))))


def test_built_fields_round_trip() -> None:
    tc = decode_core(
        core(
            created=0,
            last_updated=(1 << 36) - 1,
            cmp_id=4095,
            cmp_version=1,
            consent_screen=63,
            language=(3, 4),
            vendor_list_version=4095,
            policy_version=5,
            service_specific=False,
            non_standard_texts=True,
            special_features=frozenset({1, 12}),
            purposes=frozenset({1, 24}),
            li=frozenset({2, 7, 10}),
        )
    )
    assert tc == TCString(
        version=2,
        created=datetime(1970, 1, 1, tzinfo=UTC),
        last_updated=datetime.fromtimestamp(6_871_947_673.5, UTC),  # (2**36 - 1) / 10 s
        cmp_id=4095,
        cmp_version=1,
        consent_screen=63,
        consent_language="DE",
        vendor_list_version=4095,
        tcf_policy_version=5,
        is_service_specific=False,
        use_non_standard_texts=True,
        special_feature_opt_ins=frozenset({1, 12}),
        purposes_consent=frozenset({1, 24}),
        purposes_li_transparency=frozenset({2, 7, 10}),
    )


def test_only_the_core_segment_counts() -> None:
    other = b64url("011" + "1" * 24 + "0" * 30)  # a Publisher TC segment granting every purpose
    assert purpose_one_consent(GRANTED + "." + other)
    assert purpose_one_consent(GRANTED + "." + DENIED + "." + other)
    assert not purpose_one_consent(DENIED + "." + other)
    assert not purpose_one_consent(DENIED + "." + GRANTED)


def test_length_limit_is_inclusive() -> None:
    filler = MAX_TC_STRING_CHARS - len(GRANTED) - 1
    assert purpose_one_consent(GRANTED + "." + "A" * filler)
    assert not purpose_one_consent(GRANTED + "." + "A" * (filler + 1))


@settings(max_examples=300, deadline=None)
@given(
    purposes=st.frozensets(st.integers(1, 24)),
    li=st.frozensets(st.integers(1, 24)),
    special=st.frozensets(st.integers(1, 12)),
    created=st.integers(0, (1 << 36) - 1),
    cmp_id=st.integers(0, 4095),
    letters=st.tuples(st.integers(0, 25), st.integers(0, 25)),
)
def test_built_strings_round_trip(
    purposes: frozenset[int],
    li: frozenset[int],
    special: frozenset[int],
    created: int,
    cmp_id: int,
    letters: tuple[int, int],
) -> None:
    tc_string = core(
        purposes=purposes,
        li=li,
        special_features=special,
        created=created,
        cmp_id=cmp_id,
        language=letters,
    )
    tc = decode_core(tc_string)
    assert (tc.purposes_consent, tc.purposes_li_transparency) == (purposes, li)
    assert (tc.special_feature_opt_ins, tc.cmp_id) == (special, cmp_id)
    assert int(tc.created.timestamp() * 10 + 0.5) == created
    assert tc.consent_language == "".join(chr(65 + n) for n in letters)
    assert purpose_one_consent(tc_string) is (1 in purposes)


# --- Malformed input: False from purpose_one_consent, InvalidTCString from decode_core. ---------

MALFORMED = [
    "",
    "!!!",
    "CO",
    "C",
    ".",
    GRANTED[:43],  # 256 bits: under the smallest core segment
    GRANTED[:41],  # 41 characters cannot be base64
    core(version=1, purposes=frozenset({1})),
    core(version=3, purposes=frozenset({1})),
    core(version=0, purposes=frozenset({1})),
    core(language=(26, 0), purposes=frozenset({1})),  # a language letter past 'z'
    GRANTED + "=",
    GRANTED + "==",
    GRANTED[:-2] + "==",
    GRANTED + "." + DENIED + "=",
    GRANTED.replace("A", "+").replace("_", "/"),  # standard base64's alphabet
    " " + GRANTED,
    GRANTED + " ",
    GRANTED + "\n",
    GRANTED[:10] + " " + GRANTED[10:],
    GRANTED[:10] + "\t" + GRANTED[10:],
    GRANTED + ".",
    "." + GRANTED,
    GRANTED + ".." + DENIED,
    GRANTED + "é",
    GRANTED[:-1] + "é",
    GRANTED.replace("A", "\uff21"),  # fullwidth A
    GRANTED[:5] + "\u0661" + GRANTED[6:],  # Arabic-Indic digit one
    GRANTED + "\x00",
    GRANTED + "." + "A" * (100 * 1024),  # 100 KiB
    "C" * (100 * 1024),
]


@pytest.mark.parametrize("tc_string", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_strings(tc_string: str) -> None:
    assert purpose_one_consent(tc_string) is False
    with pytest.raises(InvalidTCString):
        decode_core(tc_string)


@pytest.mark.parametrize("value", [None, 1, b"", GRANTED.encode(), [GRANTED], object()])
def test_non_strings(value: object) -> None:
    assert purpose_one_consent(value) is False  # type: ignore[arg-type]
    with pytest.raises(InvalidTCString):
        decode_core(value)  # type: ignore[arg-type]


def test_invalid_tc_string_is_a_value_error() -> None:
    assert issubclass(InvalidTCString, ValueError)


@settings(max_examples=1000, deadline=None)
@given(st.text())
def test_never_raises_on_text(text: str) -> None:
    assert isinstance(purpose_one_consent(text), bool)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.binary(max_size=80), min_size=1, max_size=4))
def test_never_raises_on_base64url_bytes(segments: list[bytes]) -> None:
    tc_string = ".".join(base64.urlsafe_b64encode(s).decode().rstrip("=") for s in segments)
    result = purpose_one_consent(tc_string)
    assert isinstance(result, bool)
    core_bytes = segments[0]
    if result:
        assert core_bytes[0] >> 2 == 2 and core_bytes[19] & 0x80


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, len(GRANTED) - 1), st.characters())
def test_never_raises_on_a_changed_character(index: int, char: str) -> None:
    tc_string = GRANTED[:index] + char + GRANTED[index + 1 :]
    assert isinstance(purpose_one_consent(tc_string), bool)
