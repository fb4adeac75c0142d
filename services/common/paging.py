"""Paging of list RPCs, the one rule for every service (AIP-158).

`page_size` 0 means the default, a size above the maximum is coerced to the maximum, and a
negative one is INVALID_ARGUMENT. Listings over the datastore's index page by keyset tokens
(the index makes those); listings of a list already in memory (jobs) page by `offset_page`,
whose tokens are offsets this module makes and checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


def page_size(requested: int, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """The size of the page to return: `default` for 0, at most `maximum`; INVALID_ARGUMENT when negative."""
    if requested < 0:
        raise InvalidArgument(f"page_size must not be negative (got {requested})")
    return min(requested or default, maximum)


def offset_page(items: Sequence[T], requested_size: int, page_token: str, listing: str) -> tuple[list[T], str]:
    """One page of `items` and the token of the next ("" after the last page).

    The token is an offset a previous page of this listing returned; anything else (not a
    decimal number, or past the end) is INVALID_ARGUMENT naming `listing`.
    """
    size = page_size(requested_size)
    start = 0
    if page_token:
        digits = page_token.isascii() and page_token.isdigit() and len(page_token) <= 18
        if not digits or int(page_token) > len(items):
            raise InvalidArgument(f"page_token was not returned by a previous {listing}")
        start = int(page_token)
    end = start + size
    return list(items[start:end]), str(end) if end < len(items) else ""
