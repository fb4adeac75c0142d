"""The one paging rule of every list RPC (AIP-158)."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.common.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, offset_page, page_size


def test_page_size_defaults_and_coerces_to_the_maximum() -> None:
    assert page_size(0) == DEFAULT_PAGE_SIZE
    assert page_size(7) == 7
    assert page_size(MAX_PAGE_SIZE + 1) == MAX_PAGE_SIZE
    assert page_size(2**31 - 1) == MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument, match="negative"):
        page_size(-1)


def test_offset_pages_cover_the_list_once() -> None:
    items = list(range(25))
    got, token = [], ""
    while True:
        page, token = offset_page(items, 10, token, "ListThings")
        got.extend(page)
        if not token:
            break
    assert got == items
    assert offset_page(items, 0, "", "ListThings") == (items, "")
    assert offset_page([], 5, "", "ListThings") == ([], "")


@pytest.mark.parametrize("token", ["garbage", "-1", "26", "²", "1" * 5000, " 1"])
def test_a_token_no_page_returned_is_invalid(token: str) -> None:
    with pytest.raises(InvalidArgument, match="previous ListThings"):
        offset_page(list(range(25)), 10, token, "ListThings")
