"""PII redaction: each entity type and its near misses, the three modes, pseudonyms restored
in whole answers and in streams split anywhere, nested structures, and misuse."""

from __future__ import annotations

import importlib.util
import json
import pickle
import random
import re
from typing import Any

import pytest

from corral import UsageError
from corral.governance._pii import (
    ENTITIES,
    MAX_PLACEHOLDER,
    STRUCTURED_ENTITIES,
    Redactor,
    RulesNER,
    SpacyNER,
    Vault,
    card_network,
    iban_valid,
    luhn,
    normalize,
    ssn_valid,
)

KEY = b"k" * 32


def found(text: str, redactor: Redactor | None = None) -> list[tuple[str, str]]:
    return [(f.entity, text[f.start:f.end]) for f in (redactor or Redactor()).detect(text)]


# --- each type: positives and near misses ---------------------------------------------------

POSITIVES = [
    ("EMAIL", "Send it to {} by Friday.", "jane.doe@example.com"),
    ("EMAIL", "reply-to: <{}>", "ben_smith99@mail.example.co.uk"),
    ("EMAIL", "mailto:{}", "first+tag@acme-corp.io"),
    ("EMAIL", "{} wrote", "jörg.müller@beispiel.de"),
    ("EMAIL", "Contact {}.", "o'brien@example.ie"),
    ("PHONE", "Call me at {} after 5pm.", "(415) 555-0132"),
    ("PHONE", "Call me at {}.", "415-555-2671"),
    ("PHONE", "Call me at {}.", "415.555.2671"),
    ("PHONE", "Dial {} now", "+1 (415) 555-2671"),
    ("PHONE", "E.164: {}", "+14155552671"),
    ("PHONE", "London {}", "+44 20 7946 0958"),
    ("PHONE", "London {}", "020 7946 0958"),
    ("PHONE", "Berlin {}", "+49 (0)30 1234 5678"),
    ("PHONE", "Paris {}", "01 23 45 67 89"),
    ("PHONE", "Rome {}", "+39 06 2538 6075"),
    ("PHONE", "via {}", "0044 20 7946 0958"),
    ("PHONE", "Tokyo {}", "03-1234-5678"),
    ("PHONE", "São Paulo {}", "(11) 91234-5678"),
    ("PHONE", "Mumbai {}", "98765 43210"),
    ("PHONE", "tel:{}", "+1-415-555-2671"),
    ("PHONE", "please call {} today", "4155552671"),
    ("PHONE", "name,phone\nann,{},x", "+44 7700 900123"),
    ("CREDIT_CARD", "card {} exp 09/27", "4111 1111 1111 1111"),
    ("CREDIT_CARD", "card {} exp 09/27", "4111-1111-1111-1111"),
    ("CREDIT_CARD", "card {}", "5555555555554444"),
    ("CREDIT_CARD", "amex {}", "3782 822463 10005"),
    ("CREDIT_CARD", "diners {}", "3056 930902 5904"),
    ("CREDIT_CARD", "\"card\": \"{}\"", "2223 0031 2200 3222"),
    ("IBAN", "IBAN {} please", "DE89 3704 0044 0532 0130 00"),
    ("IBAN", "IBAN: {}", "GB82WEST12345698765432"),
    ("IBAN", "to {}, BIC X", "FR76 3000 6000 0112 3456 7890 189"),
    ("IBAN", "iban={}", "NL91ABNA0417164300"),
    ("IBAN", "lower {} too", "de89 3704 0044 0532 0130 00"),
    ("US_SSN", "My SSN is {}.", "219-09-9990"),
    ("US_SSN", "ssn={}", "536-22-8841"),
    ("US_SSN", "SSN {} on file", "536228841"),
    ("US_SSN", "social security number: {}", "536 22 8841"),
    ("IP_ADDRESS", "login from {} at 3am", "203.0.113.77"),
    ("IP_ADDRESS", "curl http://{}:8080/", "10.0.0.5"),
    ("IP_ADDRESS", "allow {}/32", "192.168.1.10"),
    ("IP_ADDRESS", "nameserver {}", "2001:4860:4860::8888"),
    ("IP_ADDRESS", "ping {} please", "::1"),
    ("IP_ADDRESS", "link-local {}", "fe80::1%eth0"),
    ("IP_ADDRESS", "mapped {}", "::ffff:192.0.2.1"),
    ("IP_ADDRESS", "full {}", "2001:0db8:0000:0000:0000:ff00:0042:8329"),
    ("SECRET", "key {}", "AKIAIOSFODNN7EXAMPLE"),
    ("SECRET", "token {}", "ghp_R7s9Tq2Lm4Nw8Xy1Zb3Vc5Kd6Jf0Hg2Pa4Qe"),
    ("SECRET", "SLACK={}", "xoxb-2048-4096-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("SECRET", "stripe {}", "sk_live_51HcQ2pLkT8vN3rX7yZ0aB4cD"),
    ("SECRET", "rk {}", "rk_live_51HcQ2pLkT8vN3rX7yZ0aB4cD"),
    ("SECRET", "OPENAI_API_KEY={}", "sk-proj-Xk29sLq0vB7nR4tY8uW1zA3cD5eF6gH7iJ9kL0mN2oP4q"),
    ("SECRET", "google {}", "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW"),
    ("SECRET", "jwt {}", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
                         "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    ("SECRET", "Authorization: Bearer {}", "abcDEF1234567890xyzXYZ"),
    ("SECRET", "Authorization: Basic {}", "YWxhZGRpbjpvcGVuc2VzYW1l"),
    ("SECRET", "password={}", "hunter22"),
    ("SECRET", "\"api_key\": \"{}\"", "a8f3k2m9x7q1"),
    ("SECRET", "the wifi password is {}", "Sunflower2024"),
    ("SECRET", "postgres://app:{}@db.internal:5432/prod", "p@ssw0rd123"),
    ("SECRET", "redis://:{}@cache:6379", "Xq7pL2mN9vB4"),
    ("SECRET", "session={}", "x7Gh2kLp9QzR4vT1mN8sQ2"),
    ("SECRET", "aws_secret_access_key={}", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("SECRET", "{}", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq3\n"
                     "-----END RSA PRIVATE KEY-----"),
]


@pytest.mark.parametrize(("entity", "template", "value"), POSITIVES,
                         ids=[f"{e}-{v[:24]}" for e, _, v in POSITIVES])
def test_each_type_is_found_with_its_exact_span(entity: str, template: str, value: str) -> None:
    assert found(template.format(value)) == [(entity, value)]


NEAR_MISSES = [
    "card 4111 1111 1111 1112 fails Luhn",
    "number 1234 5678 9012 3452 passes Luhn but no network starts with 1",
    "IBAN DE89 3704 0044 0532 0130 01 has a wrong checksum",
    "IBAN DE89 3704 0044 0532 0130 0 is one digit short",
    "IBAN XX89 3704 0044 0532 0130 00 names no country",
    "SSN 000-12-3456 has area 000",
    "SSN 666-12-3456 has area 666",
    "SSN 912-12-3456 has a 9xx area",
    "SSN 123-00-4567 has group 00",
    "SSN 123-45-0000 has serial 0000",
    "SSN 078-05-1120 was voided",
    "The meeting is on 2024-01-15 at 10am.",
    "Deadline 15/01/2024, or 15.01.2024, or 01-15-2025.",
    "Upgrade to version 10.15.7 or v2.14.3 today.",
    "The kernel is 5.15.0-1057 and the build 2024.06.11.1",
    "Order #1234567890 has shipped.",
    "Order 4155552671 has shipped.",
    "Invoice INV-2024-000123 is overdue.",
    "ISBN 978-3-16-148410-0",
    "The total came to $1,234,567.89 or 1 234 567 EUR.",
    "It ran for 10:30:45 today.",
    "Mail it to ZIP 94105-1234.",
    "Coordinates 48.8566, 2.3522",
    "Device MAC 00:1A:2B:3C:4D:5E joined.",
    "256.1.2.3 and 1.2.3.4.5 are not addresses",
    "see section 4.5.6.7 of the spec",
    "std::vector and a::b are C++",
    "follow @jane_doe99 or write to john@localhost",
    "john at example dot com",
    "Tracking number 91484960890 is in transit.",
    "getUserAccountBalanceForTenant2 and MyDocument_Final_v2_2024",
    "gpt-4o-mini-2024-07-18 and claude-3-5-sonnet-20241022",
    "commit 9fceb02d0ae598e95dc970b74767f19372d61af8",
    "request 550e8400-e29b-41d4-a716-446655440000",
    "password=******** and api_key=${API_KEY} and token: <redacted>",
    "password: required, secret: optional",
    "the password is incorrect and the token is expired",
    "Use the --password flag; tokens are counted per request.",
    "Bearer tokens must be sent in the Authorization header.",
    "Set max_tokens to 4096 and temperature to 0.2.",
]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_are_left_alone(text: str) -> None:
    assert found(text) == []


def test_validators() -> None:
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    assert card_network("4111111111111111") == "visa"
    assert card_network("378282246310005") == "amex"
    assert card_network("1234567890123452") is None
    assert iban_valid("DE89370400440532013000") and not iban_valid("DE89370400440532013001")
    assert not iban_valid("DE8937040044053201300")  # Germany's length is 22
    assert ssn_valid("536", "22", "8841") and not ssn_valid("666", "22", "8841")


def test_overlaps_go_to_the_stronger_type() -> None:
    # the digits of an IBAN, a card and an IP could also read as phone numbers
    text = "IBAN DE89 3704 0044 0532 0130 00, card 4111 1111 1111 1111, ip 192.168.100.200"
    assert [e for e, _ in found(text)] == ["IBAN", "CREDIT_CARD", "IP_ADDRESS"]
    # a password in a URL is a secret, not the start of an e-mail address
    assert found("https://admin:s3cret99@db.example.com/x") == [("SECRET", "s3cret99")]


def test_two_phones_in_a_row_and_a_phone_after_a_date() -> None:
    assert found("415-555-2671 415-555-2672") == [("PHONE", "415-555-2671"),
                                                  ("PHONE", "415-555-2672")]
    assert found("On 2024-01-15 415-234-5678 called") == [("PHONE", "415-234-5678")]
    assert found("Call +1 415 555 2671 24 hours a day") == [("PHONE", "+1 415 555 2671")]


def test_entities_choose_what_is_found() -> None:
    text = "mail a@example.com from 10.0.0.1"
    assert found(text, Redactor(["IP_ADDRESS"])) == [("IP_ADDRESS", "10.0.0.1")]
    assert Redactor().entities == STRUCTURED_ENTITIES


# --- modes --------------------------------------------------------------------------------

TEXT = ("Hi, I'm locked out. Mail jane.doe@example.com or call +44 20 7946 0958; "
        "card 4111 1111 1111 1111, key AKIAIOSFODNN7EXAMPLE.")
VALUES = ["jane.doe@example.com", "+44 20 7946 0958", "4111 1111 1111 1111",
          "AKIAIOSFODNN7EXAMPLE"]


def test_mask() -> None:
    done = Redactor().redact(TEXT)
    assert done.text == ("Hi, I'm locked out. Mail <EMAIL> or call <PHONE>; "
                         "card <CREDIT_CARD>, key <SECRET>.")
    assert [(f.entity, f.kind) for f in done.findings] == [
        ("EMAIL", "email"), ("PHONE", "e164"), ("CREDIT_CARD", "luhn"),
        ("SECRET", "aws_access_key")]
    assert [TEXT[f.start:f.end] for f in done.findings] == VALUES


def test_a_text_without_pii_comes_back_unchanged() -> None:
    text = "Please summarise the attached report in 3 bullet points."
    done = Redactor().redact(text)
    assert done.text is text and done.findings == ()


def test_hash_is_keyed_stable_and_joins_spellings() -> None:
    hasher = Redactor(mode="hash", key=KEY)
    one = hasher.redact("card 4111 1111 1111 1111, mail Jane@Example.com").text
    two = hasher.redact("card 4111-1111-1111-1111, mail jane@example.com").text
    assert one == two
    assert re.fullmatch(r"card <CREDIT_CARD:[0-9a-f]{12}>, mail <EMAIL:[0-9a-f]{12}>", one)
    other_key = Redactor(mode="hash", key=b"x" * 32).redact("card 4111 1111 1111 1111").text
    assert other_key != one.split(",")[0]
    assert Redactor(mode="hash", key=KEY).redact("mail bob@example.com").text != one
    assert not any(v in Redactor(mode="hash", key=KEY).redact(TEXT).text for v in VALUES)


def test_pseudonymize_round_trip() -> None:
    vault = Vault()
    redactor = Redactor(mode="pseudonymize")
    prompt = redactor.redact(TEXT + " Again: JANE.DOE@example.com, bob@example.org.",
                             vault=vault).text
    assert prompt == ("Hi, I'm locked out. Mail <EMAIL_1> or call <PHONE_1>; card "
                      "<CREDIT_CARD_1>, key <SECRET_1>. Again: <EMAIL_1>, <EMAIL_2>.")
    assert not any(v.lower() in prompt.lower() for v in VALUES)
    # the model answers with the placeholders; the caller gets the originals back
    answer = "Done: I e-mailed <EMAIL_1> and <EMAIL_2>, and will call <PHONE_1>."
    assert vault.restore(answer) == ("Done: I e-mailed jane.doe@example.com and "
                                     "bob@example.org, and will call +44 20 7946 0958.")
    # the same vault keeps its numbering in the next turn
    assert redactor.redact("also bob@example.org and carl@example.net", vault=vault).text == (
        "also <EMAIL_2> and <EMAIL_3>")
    assert len(vault) == 6
    assert vault.original("<EMAIL_3>") == "carl@example.net"


@pytest.mark.parametrize(("entity", "template", "value"), POSITIVES,
                         ids=[f"{e}-{v[:24]}" for e, _, v in POSITIVES])
def test_pseudonyms_hide_every_value_and_restore_every_text(entity: str, template: str,
                                                             value: str) -> None:
    text = template.format(value)
    vault = Vault()
    prompt = Redactor(mode="pseudonymize").redact(text, vault=vault).text
    assert value not in prompt and f"<{entity}_1>" in prompt
    assert vault.restore(prompt) == text
    assert streamed(vault, [prompt[:len(prompt) // 2], prompt[len(prompt) // 2:]]) == text


def test_restore_is_robust_to_what_models_do_with_placeholders() -> None:
    vault = Vault()
    Redactor(mode="pseudonymize").redact("a@example.com b@example.com", vault=vault)
    cases = {
        "(<EMAIL_1>)'s inbox": "(a@example.com)'s inbox",
        "<email_1>": "a@example.com",
        "< EMAIL_2 >": "b@example.com",
        "&lt;EMAIL_1&gt;": "a@example.com",
        "\\<EMAIL_2\\>": "b@example.com",
        "[EMAIL_1]": "a@example.com",
        "**<EMAIL_1>**,<EMAIL_2>.": "**a@example.com**,b@example.com.",
        "<EMAIL_3> and <PHONE_1> are not in this vault": "<EMAIL_3> and <PHONE_1> are not in "
                                                         "this vault",
        "a bare EMAIL_1 stays": "a bare EMAIL_1 stays",
    }
    for answer, restored in cases.items():
        assert vault.restore(answer) == restored, answer


def test_the_vault_survives_serialization() -> None:
    vault = Vault()
    Redactor(mode="pseudonymize").redact("a@example.com 10.0.0.1", vault=vault)
    copy = Vault.from_dict(json.loads(json.dumps(vault.to_dict())))
    assert copy.restore("<EMAIL_1> <IP_ADDRESS_1>") == "a@example.com 10.0.0.1"
    assert copy.placeholder("EMAIL", "A@example.com") == "<EMAIL_1>"
    assert copy.placeholder("EMAIL", "c@example.com") == "<EMAIL_2>"


# --- streaming ----------------------------------------------------------------------------

def streamed(vault: Vault, chunks: list[str]) -> str:
    restorer = vault.stream()
    return "".join(restorer.feed(c) for c in chunks) + restorer.flush()


@pytest.fixture
def vault() -> Vault:
    vault = Vault()
    Redactor(mode="pseudonymize").redact(
        "a@example.com 4111 1111 1111 1111 10.0.0.1 bob@example.org", vault=vault)
    return vault


ANSWER = ("Sure <EMAIL_1>: card <CREDIT_CARD_1> (&lt;IP_ADDRESS_1&gt;) was used; "
          "a < b, x[0] & y, \\<EMAIL_2\\>, [EMAIL_2] and <EMAIL_9>.<email_1>")


def test_stream_restore_at_every_split(vault: Vault) -> None:
    whole = vault.restore(ANSWER)
    assert "a@example.com" in whole and "<CREDIT_CARD_1>" not in whole
    for i in range(len(ANSWER) + 1):
        assert streamed(vault, [ANSWER[:i], ANSWER[i:]]) == whole, i


def test_stream_restore_char_by_char_and_in_random_chunks(vault: Vault) -> None:
    whole = vault.restore(ANSWER)
    assert streamed(vault, list(ANSWER)) == whole
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(ANSWER)), 4))
        chunks = [ANSWER[a:b] for a, b in zip([0, *cuts], [*cuts, len(ANSWER)], strict=True)]
        assert streamed(vault, chunks) == whole


def test_stream_holds_back_only_what_may_be_a_placeholder(vault: Vault) -> None:
    restorer = vault.stream()
    assert restorer.feed("Hello <EMA") == "Hello "
    assert restorer.feed("IL_1> and more text") == "a@example.com and more text"
    assert restorer.feed("x" * 100 + "<") == "x" * 100
    assert restorer.feed("nothing>") == "<nothing>"
    assert restorer.feed("a" * (MAX_PLACEHOLDER + 10)) == "a" * (MAX_PLACEHOLDER + 10)
    assert restorer.flush() == ""
    with pytest.raises(TypeError, match="feed takes str, got bytes"):
        restorer.feed(b"x")  # type: ignore[arg-type]


# --- structures ---------------------------------------------------------------------------

def test_redact_json() -> None:
    obj: dict[str, Any] = {
        "user": {"email": "a@example.com", "phones": ["+44 20 7946 0958", 14155552671],
                 "age": 42, "score": 0.5, "ok": True, "none": None},
        "a@example.com": "keyed by an address",
        "b@example.com": "another",
        "args": ("card 4111 1111 1111 1111", 3),
    }
    out = Redactor().redact_json(obj)
    assert out == {
        "user": {"email": "<EMAIL>", "phones": ["<PHONE>", "<PHONE>"], "age": 42,
                 "score": 0.5, "ok": True, "none": None},
        "<EMAIL>": "keyed by an address",
        "<EMAIL>#2": "another",
        "args": ("card <CREDIT_CARD>", 3),
    }
    assert obj["user"]["email"] == "a@example.com"  # a copy
    vault = Vault()
    pseudo = Redactor(mode="pseudonymize").redact_json(obj, vault=vault)
    assert "a@example.com" not in json.dumps(pseudo)
    assert json.loads(vault.restore(json.dumps(pseudo))) == {
        **obj, "user": {**obj["user"], "phones": ["+44 20 7946 0958", "14155552671"]},
        "args": list(obj["args"])}


def test_redact_json_reads_values_with_their_keys() -> None:
    obj = {"password": "hunter2x", "phone_number": "4155552671", "work_phones": [4155552671],
           "order_id": 4155552671, "note": "4155552671", "ssn": "536228841"}
    assert Redactor().redact_json(obj) == {
        "password": "<SECRET>", "phone_number": "<PHONE>", "work_phones": ["<PHONE>"],
        "order_id": 4155552671, "note": "4155552671", "ssn": "<US_SSN>"}


def test_redact_json_names_the_path_of_what_it_cannot_take() -> None:
    with pytest.raises(TypeError, match=r"got set at \$\.user\.tags\[1\]"):
        Redactor().redact_json({"user": {"tags": ["a", {"x"}]}})
    with pytest.raises(TypeError, match=r"got set at \$\.<EMAIL>$"):  # no PII in the error
        Redactor().redact_json({"a@example.com": {"x"}})
    with pytest.raises(UsageError, match="needs a Vault"):
        Redactor(mode="pseudonymize").redact_json({})


# --- names and addresses ------------------------------------------------------------------

def test_names_need_a_recognizer() -> None:
    with pytest.raises(UsageError, match="PERSON need a named-entity recognizer: pass "
                                         "ner='spacy'"):
        Redactor(["PERSON"])


def test_rules_ner_finds_titled_names_and_street_addresses() -> None:
    redactor = Redactor(["PERSON", "ADDRESS", "EMAIL"], ner="rules")
    text = ("Dr. Anita Desai lives at 350 Fifth Avenue, New York, NY 10118; my name is "
            "Tom Berg, mail tom@example.com. Maya called.")
    assert found(text, redactor) == [
        ("PERSON", "Anita Desai"), ("ADDRESS", "350 Fifth Avenue, New York, NY 10118"),
        ("PERSON", "Tom Berg"), ("EMAIL", "tom@example.com")]
    assert list(RulesNER()("Lindenweg 12, 80331 München")) == [("ADDRESS", 0, 27)]


def test_any_callable_can_be_the_recognizer() -> None:
    def ner(text: str) -> list[tuple[str, int, int]]:
        i = text.find("Maya")
        return [("PERSON", i, i + 4), ("ORG", 0, 3)] if i >= 0 else []

    vault = Vault()
    redactor = Redactor(["PERSON", "PHONE"], mode="pseudonymize", ner=ner)
    assert redactor.redact("hey Maya, call 415-555-2671", vault=vault).text == (
        "hey <PERSON_1>, call <PHONE_1>")


def test_spacy_labels_map_to_names_and_addresses() -> None:
    class Ent:
        def __init__(self, label: str, start: int, end: int) -> None:
            self.label_, self.start_char, self.end_char = label, start, end

    class Doc:
        def __init__(self, text: str) -> None:
            self.ents = [Ent("PERSON", 0, 5), Ent("GPE", 15, 21), Ent("FAC", 25, 37)]

    text = "Maria moved to Lisbon at Alfama Tower, 12 Oak Street."
    redactor = Redactor(["PERSON", "ADDRESS"], ner=SpacyNER(Doc))
    assert redactor.redact(text).text == "<PERSON> moved to Lisbon at <ADDRESS>, <ADDRESS>."


@pytest.mark.skipif(importlib.util.find_spec("spacy") is not None, reason="spaCy is installed")
def test_spacy_missing_names_the_extra() -> None:
    with pytest.raises(ImportError, match=r"corral\[ner\]"):
        Redactor(["PERSON"], ner="spacy")


# --- misuse -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [b"bytes", None, 42, ["a list"]])
def test_non_str_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match=f"Redactor.redact takes str, got {type(bad).__name__}"):
        Redactor().redact(bad)  # type: ignore[arg-type]


def test_unknown_entity_names_the_valid_ones() -> None:
    with pytest.raises(UsageError, match="unknown PII entity type 'EMAILS': the types are "
                                         + ", ".join(ENTITIES)) as err:
        Redactor(["EMAIL", "EMAILS"])
    assert err.value.unknown == ["EMAILS"]  # type: ignore[attr-defined]
    assert pickle.loads(pickle.dumps(err.value)).unknown == ["EMAILS"]
    with pytest.raises(TypeError, match=r"write \['EMAIL'\]"):
        Redactor("EMAIL")


def test_mode_errors() -> None:
    with pytest.raises(UsageError, match="unknown redaction mode 'blur': the modes are mask, "
                                         "hash, pseudonymize"):
        Redactor(mode="blur")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="mode='hash' needs key="):
        Redactor(mode="hash")
    with pytest.raises(UsageError, match="the hash key has 5 bytes; use at least 16"):
        Redactor(mode="hash", key="short")
    with pytest.raises(UsageError, match="needs a Vault per conversation"):
        Redactor(mode="pseudonymize").redact("a@example.com")


def test_normalize() -> None:
    assert normalize("PHONE", "+44 (0)20 7946 0958") == "+440207946 0958".replace(" ", "")
    assert normalize("PHONE", "0044 20 7946 0958") == "+442079460958"
    assert normalize("IP_ADDRESS", "2001:0db8:0000::0001") == "2001:db8::1"
    assert normalize("IBAN", "de89 3704") == "DE893704"
