"""normalize_path: RFC 3986 normalization as Kong's `kong/tools/uri.lua`, refusing path tricks."""

import pytest

from fhirgate.gateway.normalize import BadPathError, normalize_path


@pytest.mark.parametrize(
    "raw",
    ["/", "/fhir", "/fhir/Patient/123", "/fhir/Patient/123/", "/a-b_c~d", "/fhir/Patient?x"],
)
def test_plain_paths_are_returned_unchanged(raw):
    assert normalize_path(raw) == raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/%66hir", "/fhir"),  # unreserved ALPHA decoded
        ("/a%2Db%5Fc%7Ed%2E", "/a-b_c~d."),  # - _ ~ . decoded
        ("/%31%32", "/12"),  # DIGIT decoded
        ("/a%2fb", "/a%2Fb"),  # reserved kept encoded, hex upper-cased
        ("/a%20b", "/a%20b"),  # "other" kept encoded (Kong decodes it; we do not)
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a%3fb", "/a%3Fb"),
    ],
)
def test_percent_escapes_decode_unreserved_only_and_uppercase_the_rest(raw, expected):
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/./b", "/a/b"),
        ("/a/b/../c", "/a/c"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/.", "/a/"),
        ("/a/..", "/"),
        ("/./a", "/a"),
        ("/a/%2e%2e/b", "/b"),  # encoded dot-segment is a dot-segment (as in Kong)
        ("/a/.%2E/b", "/b"),
        ("/a/b/c/./../../g", "/a/g"),  # RFC 3986 5.2.4 example
        ("/a/.b/..c", "/a/.b/..c"),  # dots inside a segment are not dot-segments
    ],
)
def test_dot_segments_are_removed(raw, expected):
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("//a", "/a"), ("/a//b", "/a/b"), ("/a///b//", "/a/b/"), ("//", "/")],
)
def test_repeated_slashes_are_merged(raw, expected):
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw", ["/..", "/../admin", "/a/../../admin", "/%2e%2e/admin", "/a/./../.."])
def test_dot_dot_above_root_is_refused(raw):
    with pytest.raises(BadPathError, match="above the root"):
        normalize_path(raw)


@pytest.mark.parametrize("raw", ["", "fhir", "*", "http://x/fhir", "%2Ffhir"])
def test_path_not_starting_with_slash_is_refused(raw):
    with pytest.raises(BadPathError, match="start with '/'"):
        normalize_path(raw)


@pytest.mark.parametrize("raw", ["/a%", "/a%2", "/a%zz", "/a%2g/b", "/%%41"])
def test_invalid_percent_escape_is_refused(raw):
    with pytest.raises(BadPathError, match="percent-encoding"):
        normalize_path(raw)


@pytest.mark.parametrize("raw", ["/a%00b", "/a\x00b"])
def test_nul_is_refused(raw):
    with pytest.raises(BadPathError, match="NUL"):
        normalize_path(raw)


@pytest.mark.parametrize(
    "raw", ["/a\nb", "/a\rb", "/a\tb", "/a\x7fb", "/a%0Ab", "/a%0d%0aSet-Cookie:x", "/a%7f"]
)
def test_control_characters_are_refused(raw):
    with pytest.raises(BadPathError, match="control character"):
        normalize_path(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "/fhir/..%2Fadmin",
        "/fhir/..%2fadmin",
        "/fhir/%2e%2e%2fadmin",
        "/fhir/%2E%2E%2Fadmin",
        "/fhir/..%5cadmin",
        "/fhir/..\\admin",
        "/fhir/x%2F..%2F..%2Fadmin",
        "/fhir/.%2Fadmin",
        "/fhir/admin%2F..",
    ],
)
def test_encoded_slash_or_backslash_next_to_dot_segment_is_refused(raw):
    with pytest.raises(BadPathError, match="encoded slash or backslash"):
        normalize_path(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/fhir/Binary/a%2Fb", "/fhir/Binary/a%2Fb"),
        ("/fhir/a%2f.b", "/fhir/a%2F.b"),  # '.b' is not a dot-segment
        ("/files/a\\b", "/files/a\\b"),
        ("/x/%2F/y", "/x/%2F/y"),
    ],
)
def test_encoded_slash_without_dot_segment_is_kept_encoded(raw, expected):
    assert normalize_path(raw) == expected


def test_error_is_a_value_error_with_a_human_message():
    with pytest.raises(ValueError, match=r"\S+ \S+"):
        normalize_path("/../etc/passwd")
