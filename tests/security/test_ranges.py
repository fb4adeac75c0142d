"""Hostile Range and If-Range headers on downloads (gateway.ranges): whatever a client writes
there, the answer is the whole file (200), the exact slice it names (206) or a 416 with the
file's size, never a 500 or a byte it did not ask for; the auth check still comes first."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ranges import parse_range
from tests.fixtures.gateway import GatewayStack
from tests.fixtures.hostile import BASE_IMAGE, Hostile

BIG = st.integers(0, 10**30)
# What a header value may hold on the wire (printable ASCII, no whitespace at either end: the
# HTTP client refuses to send that), biased towards byte ranges.
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80).map(str.strip)
RANGES = st.one_of(
    HEADER_TEXT,
    st.builds(lambda a, b: f"bytes={a}-{b}", BIG, BIG),
    st.builds(lambda a: f"bytes={a}-", BIG),
    st.builds(lambda b: f"bytes=-{b}", BIG),
    st.builds(lambda a, b: f"bytes={a}-{b},{b}-", st.integers(0, 5000), st.integers(0, 5000)),
    st.sampled_from(["bytes=", "bytes=--1", "bytes=1-2-3", "bytes=-1-", "bytes=0x10-", "bytes=1e3-", "Bytes=0-1"]),
)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@settings(max_examples=500, deadline=None)
@given(header=RANGES)
def test_parsing_any_range_header_never_fails_and_stays_in_int64(header: str) -> None:
    wanted = parse_range(header)
    if wanted is None:
        return
    offset, limit = wanted.read(1000 if wanted.needs_size else None)
    assert 0 <= offset < 2**63 and 0 <= limit < 2**63


@settings(max_examples=120, deadline=None)
@given(header=RANGES, if_range=st.none() | HEADER_TEXT)
def test_any_range_on_a_download_is_a_200_the_slice_or_a_416(
    hostile: Hostile, header: str, if_range: str | None
) -> None:
    whole = hostile.http.get("/datastore/image", params={"image": BASE_IMAGE}).content
    headers = {"range": header, **({"if-range": if_range} if if_range is not None else {})}
    answer = hostile.http.get("/datastore/image", params={"image": BASE_IMAGE}, headers=headers)
    assert answer.status_code in (200, 206, 416), (header, answer.status_code, answer.text)
    assert hostile.secret not in answer.content
    if answer.status_code == 200:
        assert answer.content == whole and "content-range" not in answer.headers
    elif answer.status_code == 206:
        matched = _CONTENT_RANGE.fullmatch(answer.headers["content-range"])
        assert matched is not None
        first, last, size = map(int, matched.groups())
        assert size == len(whole) and answer.content == whole[first : last + 1]
    else:
        assert answer.headers["content-range"] == f"bytes */{len(whole)}" and answer.json()["detail"]


@pytest.mark.timeout(120)
def test_a_range_without_a_token_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    stack = GatewayStack(tmp_path, gateway_overrides={"auth_tokens": ["range-s3cret"]}).start()
    try:
        for path, params in (
            ("/datastore/image", {"image": BASE_IMAGE}),
            ("/datastore/label", {"label": BASE_IMAGE, "tag": "final"}),
            ("/model/segmentation", {}),
        ):
            for headers in ({"range": "bytes=0-10"}, {"range": "bytes=-10", "authorization": "Bearer wrong"}):
                answer = httpx.get(f"{stack.url}{path}", params=params, headers=headers, timeout=30)
                assert answer.status_code == 401 and "content-range" not in answer.headers, (path, headers)
    finally:
        stack.stop()
