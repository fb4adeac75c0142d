"""Ids become file names and object keys: nothing may name a path outside the store."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.datastore.domain import ids
from services.datastore.domain.datastore import image_id_from_file_name


@pytest.mark.parametrize("value", ["img_01", "case-7", "a.b", "A1", "x" * 200, "1.2.840.113619.2.55"])
def test_accepts_monai_label_style_ids(value):
    assert ids.check_image_id(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "..", "../x", "x/..", "/abs", "a/b", "a\\b", "nul\x00", "x" * 201, ".hidden", "a b", "a\nb", "é", "a:b", "~"],
)
def test_refuses_path_like_or_odd_ids(value):
    with pytest.raises(InvalidArgument) as caught:
        ids.check_image_id(value)
    assert caught.value.reason == "INVALID_INPUT"
    assert "image id" in caught.value.message


def test_tags_and_model_names_follow_the_same_rule():
    assert ids.check_tag("final") == "final"
    for check in (ids.check_tag, ids.check_model_name, ids.check_version, ids.check_record_key):
        with pytest.raises(InvalidArgument):
            check("../x")


@pytest.mark.parametrize(
    "file_name,expected",
    [("scan.nii.gz", "scan"), ("scan.v2.nii.gz", "scan"), ("/tmp/up/case_1.nrrd", "case_1"), ("a", "a")],
)
def test_id_from_file_name_follows_monai_label(file_name, expected):
    assert image_id_from_file_name(file_name) == expected


# -- the whole string is the id: a trailing newline, NUL or control byte is not one -----------

_ALLOWED = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\x00", "\t", " "])
def test_a_valid_id_with_a_trailing_character_is_refused(suffix):
    for check in (ids.check_image_id, ids.check_tag, ids.check_model_name, ids.check_version, ids.check_record_key):
        with pytest.raises(InvalidArgument):
            check("abc" + suffix)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=260))
def test_any_accepted_id_is_a_safe_file_name(value):
    """Generated: whatever is accepted is 1..200 of the allowed characters, never '.', '..' or hidden."""
    try:
        ids.check_image_id(value)
    except InvalidArgument:
        return
    assert 1 <= len(value) <= ids.MAX_ID_LENGTH
    assert set(value) <= set(_ALLOWED)
    assert not value.startswith(".") and ".." not in value


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=_ALLOWED, min_size=1, max_size=200).filter(lambda v: not v.startswith(".") and ".." not in v))
def test_every_well_formed_id_is_accepted(value):
    assert ids.check_image_id(value) == value
