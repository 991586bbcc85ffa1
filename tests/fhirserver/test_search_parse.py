"""Black-box tests of `parse_search`: FHIR R4 search requests (search.html) -> query AST."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

import pytest

from fhirgate.fhirserver.definitions import param_id
from fhirgate.fhirserver.errors import FhirError
from fhirgate.fhirserver.model import (
    DateValue,
    HasClause,
    Include,
    NumberValue,
    ParamClause,
    QuantityValue,
    ReferenceValue,
    SearchQuery,
    SortKey,
    StringValue,
    TokenValue,
    UriValue,
)
from fhirgate.fhirserver.search import PREFIXES, parse_search
from fhirgate.fhirserver.values import date_range


def _all_supported(rtype: str, code: str) -> bool:
    return True


def parse(rtype: str | None, query: str | Sequence[tuple[str, str]], **kwargs: Any) -> SearchQuery:
    """`query` as a decoded query string (`a=b&c=d`, `+` is a space as in a URL) or as pairs."""
    pairs = parse_qsl(query, keep_blank_values=True) if isinstance(query, str) else list(query)
    kwargs.setdefault("supported", _all_supported)
    return parse_search(rtype, pairs, **kwargs)


def one(rtype: str | None, query: str | Sequence[tuple[str, str]], **kwargs: Any) -> ParamClause:
    q = parse(rtype, query, **kwargs)
    assert len(q.clauses) == 1, q
    clause = q.clauses[0]
    assert isinstance(clause, ParamClause)
    return clause


def rejects(rtype: str | None, query: str | Sequence[tuple[str, str]], *needles: str, **kwargs: Any) -> str:
    with pytest.raises(FhirError) as info:
        parse(rtype, query, **kwargs)
    assert info.value.status == 400, info.value.diagnostics
    for needle in needles:
        assert needle in info.value.diagnostics, info.value.diagnostics
    return info.value.diagnostics


def day(text: str, prefix: str = "eq") -> DateValue:
    low, high = date_range(text)
    return DateValue(prefix, low, high)


# ---- string (search.html#string) ---------------------------------------------------------------


def test_string_default_is_normalised_prefix_value() -> None:
    c = one("Patient", [("name", "  Péter  VAN ")])
    assert (c.code, c.type, c.modifier) == ("name", "string", None)
    assert c.values == (StringValue("peter van"),)
    assert c.param_id == param_id("Patient", "name")
    assert c.resource_type == "Patient"


def test_string_exact_keeps_raw_value_and_contains_normalises() -> None:
    assert one("Patient", [("family", "Müller")]).values == (StringValue("muller"),)
    exact = one("Patient", [("family:exact", "Müller")])
    assert (exact.modifier, exact.values) == ("exact", (StringValue("Müller"),))
    contains = one("Patient", [("family:contains", "ÜLL")])
    assert (contains.modifier, contains.values) == ("contains", (StringValue("ull"),))


def test_string_of_only_spaces_is_rejected() -> None:
    rejects("Patient", [("name", "   ")], "name", "no searchable characters")


# ---- token (search.html#token) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("male", TokenValue(None, "male")),
        (
            "http://hl7.org/fhir/administrative-gender|male",
            TokenValue("http://hl7.org/fhir/administrative-gender", "male"),
        ),
        ("|male", TokenValue("", "male")),
        (
            "http://hl7.org/fhir/administrative-gender|",
            TokenValue("http://hl7.org/fhir/administrative-gender", None),
        ),
    ],
)
def test_token_forms(raw: str, expected: TokenValue) -> None:
    c = one("Patient", [("gender", raw)])
    assert (c.type, c.modifier, c.values) == ("token", None, (expected,))


def test_token_not_and_text_modifiers() -> None:
    c = one("Observation", [("code:not", "http://loinc.org|1234-5,9999-9")])
    assert c.modifier == "not"
    assert c.values == (TokenValue("http://loinc.org", "1234-5"), TokenValue(None, "9999-9"))
    text = one("Observation", [("code:text", "Blood  PRESSURE")])
    assert (text.modifier, text.values) == ("text", (StringValue("blood pressure"),))


def test_token_text_of_only_spaces_is_rejected() -> None:
    rejects("Observation", [("code:text", " ")], "code:text", "no searchable characters")


def test_token_with_two_pipes_or_only_a_pipe_is_rejected() -> None:
    rejects("Patient", [("identifier", "a|b|c")], "identifier", "more than one '|'", "\\|")
    rejects("Patient", [("identifier", "|")], "identifier", "system or a code")


@pytest.mark.parametrize("modifier", ["in", "not-in", "below", "above", "of-type"])
def test_token_modifiers_the_spec_defines_but_we_do_not_support_are_rejected(modifier: str) -> None:
    rejects("Observation", [(f"code:{modifier}", "x")], f"code:{modifier}", "not supported by this server")


# ---- reference (search.html#reference) ---------------------------------------------------------


def test_reference_typed_relative_reference() -> None:
    c = one("Observation", [("subject", "Patient/123")])
    assert (c.type, c.modifier, c.values) == ("reference", None, (ReferenceValue("Patient", "123", None),))


def test_reference_bare_id_takes_the_single_target_type_or_none() -> None:
    assert one("Observation", [("patient", "123")]).values == (ReferenceValue("Patient", "123", None),)
    assert one("Observation", [("subject", "123")]).values == (ReferenceValue(None, "123", None),)


def test_reference_type_modifier_folds_into_target_type() -> None:
    c = one("Observation", [("subject:Patient", "123,Patient/456")])
    assert c.modifier == "type"
    assert c.values == (ReferenceValue("Patient", "123", None), ReferenceValue("Patient", "456", None))


def test_reference_absolute_url_is_kept_as_url_unless_it_is_this_server() -> None:
    url = "http://other.example/fhir/Patient/9"
    assert one("Observation", [("subject", url)]).values == (ReferenceValue(None, None, url),)
    mine = one(
        "Observation", [("subject", "https://me.example/fhir/Patient/9")], base_url="https://me.example/fhir/"
    )
    assert mine.values == (ReferenceValue("Patient", "9", None),)
    urn = "urn:uuid:8f2a-11"
    assert one("Observation", [("subject", urn)]).values == (ReferenceValue(None, None, urn),)


def test_reference_version_specific_reference_matches_the_resource() -> None:
    assert one("Observation", [("subject", "Patient/1/_history/3")]).values == (
        ReferenceValue("Patient", "1", None),
    )


def test_reference_identifier_modifier_gives_tokens_on_the_identifier_rows() -> None:
    c = one("Observation", [("subject:identifier", "http://hospital/mrn|12345")])
    assert (c.modifier, c.type) == ("identifier", "reference")
    assert c.param_id == param_id("Observation", "subject:identifier")
    assert c.values == (TokenValue("http://hospital/mrn", "12345"),)


def test_reference_to_a_type_the_parameter_cannot_target_is_rejected() -> None:
    rejects("Observation", [("patient", "Group/1")], "patient", "references Patient, not Group")
    rejects("Observation", [("subject:Medication", "1")], "subject:Medication", "not Medication")
    rejects("Observation", [("subject:Patient", "Group/1")], "contradicts the :Patient modifier")
    rejects("Observation", [("subject", "Foo/1")], "unknown resource type 'Foo'")
    rejects("Observation", [("subject:Foo", "1")], "unknown modifier or resource type ':Foo'")
    rejects("Observation", [("subject", "Patient/")], "subject", "not a reference", "[type]/[id]")


def test_reference_above_below_and_string_modifiers_are_rejected() -> None:
    rejects("Observation", [("subject:above", "Patient/1")], "not supported by this server")
    rejects("Observation", [("subject:exact", "Patient/1")], "not valid for reference parameter 'subject'")


# ---- date (search.html#date, #prefix) ----------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
def test_date_prefixes(prefix: str) -> None:
    c = one("Patient", [("birthdate", f"{prefix}1970-01-01")])
    assert c.values == (day("1970-01-01", prefix),)


def test_date_default_prefix_is_eq_and_precision_sets_the_range() -> None:
    c = one("Observation", [("date", "2020,2020-03,2020-03-04T10:00:00Z")])
    assert c.values == (day("2020"), day("2020-03"), day("2020-03-04T10:00:00Z"))
    year = c.values[0]
    assert isinstance(year, DateValue)
    assert year.high - year.low == 366 * 86_400_000 - 1  # 2020 is a leap year


def test_date_time_zone_plus_decoded_as_space_is_repaired() -> None:
    c = one("Observation", "date=ge2020-01-01T10:00:00+01:00")  # `+` decodes to a space
    assert c.values == (day("2020-01-01T10:00:00+01:00", "ge"),)


def test_date_malformed_value_names_parameter_and_format() -> None:
    rejects("Patient", [("birthdate", "1970-13-01")], "birthdate", "1970-13-01", "YYYY[-MM[-DD")
    rejects("Patient", [("birthdate", "01/02/1970")], "birthdate", "YYYY")


def test_date_unknown_prefix_is_rejected() -> None:
    rejects(
        "Observation",
        [("date", "xx2020")],
        "date",
        "unknown prefix 'xx'",
        "eq, ne, gt, lt, ge, le, sa, eb, ap",
    )


def test_date_modifiers_other_than_missing_are_rejected() -> None:
    rejects("Patient", [("birthdate:exact", "1970")], "birthdate:exact", "not valid for date", ":missing")


# ---- number and quantity (search.html#number, #quantity) ---------------------------------------


def test_number_prefix_and_implicit_range() -> None:
    c = one("RiskAssessment", [("probability", "gt0.8,100")])
    assert c.type == "number"
    assert c.values == (
        NumberValue("gt", Decimal("0.8"), Decimal("0.75"), Decimal("0.85")),
        NumberValue("eq", Decimal("100"), Decimal("99.5"), Decimal("100.5")),
    )


def test_number_malformed_is_rejected() -> None:
    rejects("RiskAssessment", [("probability", "one")], "probability", "not a valid number")
    rejects("RiskAssessment", [("probability", "1.2.3")], "probability", "[prefix]number")
    rejects("RiskAssessment", [("probability", "ge")], "probability")
    rejects("RiskAssessment", [("probability", "NaN")], "probability")


def test_quantity_with_system_and_code() -> None:
    c = one("Observation", [("value-quantity", "le5.4|http://unitsofmeasure.org|mg")])
    assert c.type == "quantity"
    assert c.values == (
        QuantityValue(
            "le", Decimal("5.4"), Decimal("5.35"), Decimal("5.45"), "http://unitsofmeasure.org", "mg"
        ),
    )


def test_quantity_with_unit_only_and_number_only() -> None:
    (unit,) = one("Observation", [("value-quantity", "5.4||mg")]).values
    assert isinstance(unit, QuantityValue)
    assert (unit.prefix, unit.system, unit.code) == ("eq", None, "mg")
    (bare,) = one("Observation", [("value-quantity", "ap5")]).values
    assert isinstance(bare, QuantityValue)
    assert (bare.prefix, bare.value, bare.system, bare.code) == ("ap", Decimal("5"), None, None)


def test_quantity_malformed_is_rejected() -> None:
    rejects("Observation", [("value-quantity", "abc")], "value-quantity", "abc", "[prefix]number")
    rejects("Observation", [("value-quantity", "5.4|mg")], "value-quantity", "|system|code")
    rejects("Observation", [("value-quantity", "zz5.4")], "unknown prefix 'zz'")


# ---- uri (search.html#uri) ---------------------------------------------------------------------


def test_uri_exact_below_and_above() -> None:
    url = "http://acme.org/fhir/ValueSet/123"
    c = one("ValueSet", [("url", url)])
    assert (c.type, c.modifier, c.values) == ("uri", None, (UriValue(url),))
    assert one("ValueSet", [("url:below", "http://acme.org/fhir/")]).modifier == "below"
    assert one("ValueSet", [("url:above", url)]).modifier == "above"
    rejects("ValueSet", [("url:contains", url)], "url:contains", "not valid for uri")


# ---- escaping, OR and AND (search.html#escaping, #combining) -----------------------------------


def test_escaped_comma_pipe_dollar_and_backslash() -> None:
    assert one("Patient", [("family:exact", r"a\,b,c")]).values == (StringValue("a,b"), StringValue("c"))
    assert one("Patient", [("identifier", r"sys\|x|v\,1")]).values == (TokenValue("sys|x", "v,1"),)
    assert one("Patient", [("family:exact", r"x\$y\\z")]).values == (StringValue("x$y\\z"),)
    assert one("Patient", [("identifier", r"a\\|b")]).values == (TokenValue("a\\", "b"),)


def test_comma_is_or_and_repeated_parameter_is_and() -> None:
    q = parse("Patient", "given=eve,adam&given=smith")
    assert [c.values for c in q.clauses if isinstance(c, ParamClause)] == [
        (StringValue("eve"), StringValue("adam")),
        (StringValue("smith"),),
    ]


def test_empty_value_in_a_comma_list_is_rejected() -> None:
    rejects("Patient", [("gender", "male,,female")], "gender", "empty value")


# ---- :missing and modifiers (search.html#missing, #modifiers) ----------------------------------


@pytest.mark.parametrize(
    ("rtype", "name"),
    [
        ("Patient", "name"),
        ("Patient", "gender"),
        ("Observation", "subject"),
        ("Patient", "birthdate"),
        ("RiskAssessment", "probability"),
        ("Observation", "value-quantity"),
        ("ValueSet", "url"),
    ],
)
def test_missing_applies_to_every_type(rtype: str, name: str) -> None:
    c = one(rtype, [(f"{name}:missing", "true")])
    assert (c.modifier, c.missing, c.values) == ("missing", True, ())
    assert one(rtype, [(f"{name}:missing", "false")]).missing is False


def test_missing_takes_only_true_or_false() -> None:
    rejects("Patient", [("name:missing", "yes")], "name:missing", "true or false")


def test_unknown_or_doubled_modifiers_are_rejected() -> None:
    rejects("Patient", [("name:foo", "x")], "name:foo", "unknown modifier ':foo'", ":exact")
    rejects("Patient", [("name:exact:contains", "x")], "one modifier")


# ---- chaining (search.html#chaining) -----------------------------------------------------------


def test_chain_with_type_modifier() -> None:
    c = one("Observation", [("subject:Patient.name", "peter")])
    assert (c.code, c.type, c.values, c.chain_type, c.modifier) == (
        "subject",
        "reference",
        (),
        "Patient",
        "type",
    )
    assert c.chain == ParamClause(
        resource_type="Patient",
        code="name",
        param_id=param_id("Patient", "name"),
        type="string",
        values=(StringValue("peter"),),
    )


def test_chain_through_a_single_target_reference() -> None:
    c = one("Observation", [("patient.identifier", "http://hospital/mrn|42")])
    assert c.chain_type == "Patient"
    assert c.modifier is None
    assert c.chain is not None
    assert (c.chain.resource_type, c.chain.code, c.chain.values) == (
        "Patient",
        "identifier",
        (TokenValue("http://hospital/mrn", "42"),),
    )


def test_chain_without_type_when_every_target_shares_the_parameter() -> None:
    c = one("Observation", [("subject.identifier", "x")])
    assert c.chain_type is None
    assert c.chain is not None
    assert (c.chain.code, c.chain.type, c.chain.values) == ("identifier", "token", (TokenValue(None, "x"),))


def test_chain_with_modifier_on_the_chained_parameter() -> None:
    c = one("Observation", [("subject:Patient.name:exact", "Peter")])
    assert c.chain is not None
    assert (c.chain.modifier, c.chain.values) == ("exact", (StringValue("Peter"),))


def test_ambiguous_chain_asks_for_the_type_form() -> None:
    rejects("Observation", [("subject.name", "peter")], "ambiguous", "subject:Patient.name")


def test_chain_of_two_levels_is_rejected() -> None:
    rejects("Observation", [("subject:Patient.organization.name", "acme")], "only one level of chaining")
    rejects("Observation", [("patient.general-practitioner.name", "x")], "only one level of chaining")


def test_chain_needs_a_reference_parameter_and_a_known_target() -> None:
    rejects("Observation", [("code.name", "x")], "code.name", "reference parameter", "token")
    rejects("Observation", [("subject:Medication.code", "x")], "not Medication")
    rejects("Observation", [("subject:identifier.value", "x")], "only a :[type] modifier")
    rejects(
        "RequestGroup", [("instantiates-canonical.url", "x")], "any resource type", "name the target type"
    )


def test_chain_to_an_unknown_parameter_is_ignored_or_strict_400() -> None:
    q = parse("Observation", [("subject:Patient.shoe-size", "9")])
    assert q.clauses == ()
    assert q.ignored[0][0] == "subject:Patient.shoe-size"
    assert "shoe-size" in q.ignored[0][1]
    rejects("Observation", [("subject:Patient.shoe-size", "9")], "shoe-size", strict=True)


# ---- _has (search.html#has) --------------------------------------------------------------------


def test_has_simple() -> None:
    q = parse("Patient", [("_has:Observation:patient:code", "1234-5")])
    (has,) = q.clauses
    assert isinstance(has, HasClause)
    assert (has.source_type, has.reference_param_id) == ("Observation", param_id("Observation", "patient"))
    assert isinstance(has.clause, ParamClause)
    assert (has.clause.resource_type, has.clause.code, has.clause.values) == (
        "Observation",
        "code",
        (TokenValue(None, "1234-5"),),
    )


def test_has_nested_and_with_modifier() -> None:
    q = parse("Patient", [("_has:Observation:patient:_has:AuditEvent:entity:agent:missing", "false")])
    (outer,) = q.clauses
    assert isinstance(outer, HasClause)
    inner = outer.clause
    assert isinstance(inner, HasClause)
    assert (inner.source_type, inner.reference_param_id) == ("AuditEvent", param_id("AuditEvent", "entity"))
    assert isinstance(inner.clause, ParamClause)
    assert (inner.clause.code, inner.clause.modifier, inner.clause.missing) == ("agent", "missing", False)


def test_has_bad_parts_are_rejected() -> None:
    rejects("Patient", [("_has:Observaton:patient:code", "x")], "unknown resource type 'Observaton'")
    rejects("Patient", [("_has:Observation:code:code", "x")], "token parameter", "reference")
    rejects("Encounter", [("_has:Observation:patient:code", "x")], "references Patient, never Encounter")
    rejects("Patient", [("_has:Observation:patient", "x")], "_has:[type]:[reference parameter]:[parameter]")
    rejects("Patient", [("_has:Observation:patient:code.x", "1")], "reference parameter")


def test_has_with_unknown_parameter_is_ignored_or_strict_400() -> None:
    name = "_has:Observation:patient:colour"
    q = parse("Patient", [(name, "red")])
    assert q.clauses == ()
    assert q.ignored == ((name, "unknown search parameter 'colour' for Observation"),)
    rejects("Patient", [(name, "red")], "colour", strict=True)


# ---- _id and _lastUpdated (search.html#id, #lastUpdated) ---------------------------------------


def test_id_is_a_token_list_of_ids() -> None:
    c = one("Patient", [("_id", "a1,b-2.x")])
    assert (c.code, c.type, c.param_id) == ("_id", "token", param_id("Patient", "_id"))
    assert c.values == (TokenValue(None, "a1"), TokenValue(None, "b-2.x"))
    rejects("Patient", [("_id", "not an id")], "_id", "not a resource id")
    rejects("Patient", [("_id:missing", "true")], "_id:missing", "'_id' takes :not")


def test_last_updated_takes_date_prefixes() -> None:
    c = one("Patient", [("_lastUpdated", "gt2024-05-01T00:00:00Z")])
    assert (c.code, c.type) == ("_lastUpdated", "date")
    assert c.values == (day("2024-05-01T00:00:00Z", "gt"),)
    rejects("Patient", [("_lastUpdated", "2024-02-30")], "_lastUpdated")


def test_the_unindexed_check_is_not_consulted_for_resource_columns() -> None:
    q = parse("Patient", [("_id", "1"), ("_lastUpdated", "2020")], supported=lambda t, c: False)
    assert [c.code for c in q.clauses if isinstance(c, ParamClause)] == ["_id", "_lastUpdated"]


# ---- _count and _offset (search.html#count) ----------------------------------------------------


def test_count_default_and_clamping() -> None:
    assert parse("Patient", [], default_count=20).count == 20
    q = parse("Patient", [("_count", "5000")], max_count=1000)
    assert q.count == 1000
    assert q.applied == (("_count", "1000"),)
    assert parse("Patient", [("_count", "0")]).count == 0


@pytest.mark.parametrize("bad", ["-1", "ten", "1.5", "+3"])
def test_count_must_be_a_non_negative_integer(bad: str) -> None:
    rejects("Patient", [("_count", bad)], "_count", "non-negative integer")


def test_offset_is_parsed_but_not_applied() -> None:
    q = parse("Patient", [("_offset", "40"), ("name", "x")])
    assert q.offset == 40
    assert q.applied == (("name", "x"),)
    rejects("Patient", [("_offset", "-5")], "_offset")
    rejects("Patient", [("_offset", "9" * 30)], "_offset", "too large")


def test_control_parameters_given_twice_are_rejected() -> None:
    rejects("Patient", [("_count", "5"), ("_count", "10")], "_count", "more than once")


# ---- _sort (search.html#sort) ------------------------------------------------------------------


def test_sort_multiple_keys_and_descending() -> None:
    q = parse("Observation", [("_sort", "-date,code,_lastUpdated,-_id")])
    assert q.sort == (
        SortKey("date", param_id("Observation", "date"), "date", True),
        SortKey("code", param_id("Observation", "code"), "token", False),
        SortKey("_lastUpdated", param_id("Observation", "_lastUpdated"), "_lastUpdated", False),
        SortKey("_id", param_id("Observation", "_id"), "_id", True),
    )
    assert q.applied == (("_sort", "-date,code,_lastUpdated,-_id"),)


def test_sort_by_unknown_or_unsortable_parameter_is_rejected() -> None:
    rejects("Observation", [("_sort", "colour")], "_sort", "colour")
    rejects("Observation", [("_sort", "code-value-quantity")], "_sort", "not supported")
    rejects("Observation", [("_sort", "date,")], "_sort", "empty sort key")
    rejects("Observation", [("_sort:desc", "date")], "_sort=-date")
    rejects("Observation", [("_sort", "date,-date")], "more than once")


# ---- _include / _revinclude (search.html#include, #revinclude) ---------------------------------


def test_include_with_and_without_target_type() -> None:
    q = parse("Observation", [("_include", "Observation:patient"), ("_include", "Observation:subject:Group")])
    assert q.includes == (
        Include("Observation", "patient", param_id("Observation", "patient"), None, False, False),
        Include("Observation", "subject", param_id("Observation", "subject"), "Group", False, False),
    )


def test_include_iterate_and_recurse_alias() -> None:
    q = parse(
        "MedicationRequest",
        [
            ("_include", "MedicationRequest:requester"),
            ("_include:iterate", "PractitionerRole:organization"),
            ("_include:recurse", "PractitionerRole:practitioner"),
        ],
    )
    assert [(i.source_type, i.code, i.iterate) for i in q.includes] == [
        ("MedicationRequest", "requester", False),
        ("PractitionerRole", "organization", True),
        ("PractitionerRole", "practitioner", True),
    ]


def test_revinclude() -> None:
    q = parse(
        "Patient", [("_revinclude", "Provenance:target"), ("_revinclude:iterate", "Observation:patient")]
    )
    assert q.revincludes == (
        Include("Provenance", "target", param_id("Provenance", "target"), None, False, True),
        Include("Observation", "patient", param_id("Observation", "patient"), None, True, True),
    )
    assert q.includes == ()


def test_include_errors() -> None:
    rejects("Observation", [("_include", "*")], "wildcard", "not supported")
    rejects("Observation", [("_include", "Observation:*")], "wildcard")
    rejects("Observation", [("_include", "Observation:code")], "token parameter", "reference parameter")
    rejects("Observation", [("_include", "Observaton:patient")], "unknown resource type 'Observaton'")
    rejects("Observation", [("_include", "Observation:patient:Group")], "references Patient, not Group")
    rejects("Observation", [("_include", "patient")], "[type]:[parameter][:targetType]")
    rejects("Observation", [("_include:deep", "Observation:patient")], "unknown modifier ':deep'")


def test_include_that_cannot_apply_to_the_search_is_ignored_or_strict_400() -> None:
    q = parse("Observation", [("_include", "Patient:organization")])
    assert q.includes == ()
    assert q.ignored[0][0] == "_include"
    assert ":iterate" in q.ignored[0][1]
    rejects("Observation", [("_include", "Patient:organization")], "Patient", strict=True)
    rejects(
        "Patient",
        [("_revinclude", "Observation:encounter")],
        "reference Encounter, EpisodeOfCare",
        strict=True,
    )
    rejects("Observation", [("_revinclude", "Provenance:target:Patient")], "reference Patient", strict=True)


# ---- _summary, _total, _elements, _format (search.html#summary, #total, #elements) -------------


def test_summary_total_and_elements() -> None:
    q = parse(
        "Patient", [("_summary", "count"), ("_total", "accurate"), ("_elements", "name, Patient.gender,name")]
    )
    assert (q.summary, q.total, q.elements) == ("count", "accurate", ("name", "gender"))
    rejects("Patient", [("_summary", "yes")], "_summary", "true, text, data, count, false")
    rejects("Patient", [("_total", "all")], "_total", "none, estimate, accurate")
    rejects("Patient", [("_elements", "name,a b")], "_elements", "'a b'")
    rejects("Patient", [("_elements", "Observation.code")], "_elements", "Observation.code")


def test_format_and_pretty_are_accepted_and_neither_applied_nor_reported() -> None:
    q = parse("Patient", [("_format", "json"), ("_pretty", "true"), ("gender", "male")], strict=True)
    assert q.ignored == ()
    assert q.applied == (("gender", "male"),)


# ---- unknown and unsupported parameters (search.html#errors) -----------------------------------


def test_unknown_parameter_is_ignored_and_reported_when_lenient() -> None:
    q = parse("Patient", [("birthdat", "1970"), ("gender", "male")])
    assert q.ignored == (
        ("birthdat", "unknown search parameter 'birthdat' for Patient (did you mean 'birthdate'?)"),
    )
    assert q.applied == (("gender", "male"),)
    assert len(q.clauses) == 1


def test_unknown_parameter_is_400_when_strict() -> None:
    rejects("Patient", [("birthdat", "1970")], "birthdat", "handling=strict", strict=True)


def test_unindexed_parameter_is_treated_as_unknown() -> None:
    q = parse("Patient", [("phonetic", "smith")], supported=lambda t, c: c != "phonetic")
    assert q.clauses == ()
    assert q.ignored == (
        ("phonetic", "search parameter 'phonetic' of Patient is not supported by this server"),
    )


@pytest.mark.parametrize(
    "name",
    [
        "code-value-quantity",
        "_text",
        "_content",
        "_query",
        "_filter",
        "_list",
        "_contained",
        "_containedType",
        "_at",
    ],
)
def test_parameters_the_spec_defines_but_we_do_not_implement(name: str) -> None:
    q = parse("Observation", [(name, "x")])
    assert q.clauses == ()
    ((ignored_name, reason),) = q.ignored
    assert ignored_name == name
    assert "not supported by this server" in reason
    rejects("Observation", [(name, "x")], name, "not supported by this server", strict=True)


def test_special_parameter_is_not_supported() -> None:
    q = parse("Location", [("near", "42.25|-83.69|10|km")])
    assert "special" in q.ignored[0][1]


def test_empty_value_is_ignored_or_strict_400() -> None:
    q = parse("Patient", "name=&gender=male")
    assert q.ignored == (("name", "parameter 'name' has an empty value"),)
    rejects("Patient", "name=", "name", "empty value", strict=True)


# ---- system-level search (search.html#all) -----------------------------------------------------


def test_system_search_with_type_and_common_parameters() -> None:
    q = parse(
        None,
        [("_type", "Patient,Observation"), ("_id", "1"), ("_tag", "http://s|t"), ("_lastUpdated", "ge2024")],
    )
    assert (q.resource_type, q.types) == (None, ("Patient", "Observation"))
    codes = [(c.resource_type, c.code, c.type, c.param_id) for c in q.clauses if isinstance(c, ParamClause)]
    assert codes == [
        ("Resource", "_id", "token", param_id("Resource", "_id")),
        ("Resource", "_tag", "token", param_id("Resource", "_tag")),
        ("Resource", "_lastUpdated", "date", param_id("Resource", "_lastUpdated")),
    ]
    assert q.applied[0] == ("_type", "Patient,Observation")


def test_system_search_ignores_type_specific_parameters() -> None:
    q = parse(None, [("name", "x"), ("_has:Observation:patient:code", "1")])
    assert q.clauses == ()
    assert [n for n, _ in q.ignored] == ["name", "_has:Observation:patient:code"]
    rejects(None, [("name", "x")], "name", "_lastUpdated", strict=True)


def test_system_search_parameter_unindexed_for_one_searched_type_is_ignored() -> None:
    q = parse(None, [("_type", "Patient,Group"), ("_tag", "a|b")], supported=lambda t, c: t != "Group")
    assert q.ignored == (("_tag", "search parameter '_tag' of Group is not supported by this server"),)
    assert parse(None, [("_type", "Patient"), ("_tag", "a|b")], supported=lambda t, c: t != "Group").clauses


def test_system_search_rejects_unknown_types_and_sorts_only_by_resource_columns() -> None:
    rejects(None, [("_type", "Patient,Pateint")], "_type", "unknown resource type 'Pateint'")
    assert parse(None, [("_sort", "-_lastUpdated")]).sort[0].descending is True
    rejects(None, [("_sort", "name")], "_sort", "_id or _lastUpdated")


def test_type_on_a_type_level_search_is_ignored() -> None:
    q = parse("Patient", [("_type", "Observation")])
    assert q.types == ()
    assert q.ignored[0][0] == "_type"


def test_unknown_resource_type_is_404_and_compartment_passes_through() -> None:
    with pytest.raises(FhirError) as info:
        parse("Pateint", [])
    assert info.value.status == 404
    assert parse("Observation", [], compartment="123").compartment == "123"


# ---- US Core combinations ----------------------------------------------------------------------


def test_us_core_observation_patient_and_category() -> None:
    q = parse(
        "Observation",
        "patient=Patient/123&category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
    )
    patient, category = q.clauses
    assert isinstance(patient, ParamClause)
    assert isinstance(category, ParamClause)
    assert patient.values == (ReferenceValue("Patient", "123", None),)
    assert category.values == (
        TokenValue("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory"),
    )
    assert q.ignored == ()


def test_us_core_observation_patient_and_code() -> None:
    q = parse("Observation", "patient=123&code=http://loinc.org|2339-0,http://loinc.org|2345-7")
    assert [c.code for c in q.clauses if isinstance(c, ParamClause)] == ["patient", "code"]
    assert q.clauses[1] == ParamClause(
        resource_type="Observation",
        code="code",
        param_id=param_id("Observation", "code"),
        type="token",
        values=(TokenValue("http://loinc.org", "2339-0"), TokenValue("http://loinc.org", "2345-7")),
    )


def test_us_core_observation_patient_category_and_date_range() -> None:
    q = parse("Observation", "patient=123&category=vital-signs&date=ge2020-01-01&date=lt2021-01-01")
    dates = [c.values for c in q.clauses if isinstance(c, ParamClause) and c.code == "date"]
    assert dates == [(day("2020-01-01", "ge"),), (day("2021-01-01", "lt"),)]
    assert len(q.clauses) == 4


def test_us_core_patient_searches() -> None:
    assert one("Patient", "identifier=http://hospital.smarthealthit.org|1032702").values == (
        TokenValue("http://hospital.smarthealthit.org", "1032702"),
    )
    assert one("Patient", "name=Shaw").values == (StringValue("shaw"),)
    q = parse("Patient", "birthdate=2007-03-20&name=Amy")
    assert [c.code for c in q.clauses if isinstance(c, ParamClause)] == ["birthdate", "name"]
    q = parse("Patient", "gender=female&name=Amy")
    assert [(c.code, c.values) for c in q.clauses if isinstance(c, ParamClause)] == [
        ("gender", (TokenValue(None, "female"),)),
        ("name", (StringValue("amy"),)),
    ]


def test_applied_keeps_request_order_and_raw_values() -> None:
    q = parse("Observation", "code=a&_count=10&foo=1&_include=Observation:patient&_offset=20&_sort=-date")
    assert q.applied == (
        ("code", "a"),
        ("_count", "10"),
        ("_include", "Observation:patient"),
        ("_sort", "-date"),
    )
    assert q.ignored[0][0] == "foo"
