"""One router per MONAI Label router (`monailabel/endpoints/*.py`)."""

from __future__ import annotations
