"""Format readers: one module per dataset layout, each turning the real on-disk layout into rows and problems.

`FORMATS` names each reader; `shared/data/checks.py:read_site` runs a site's and returns the validated
manifest with every problem found.
"""

from __future__ import annotations

from shared.data.formats import aptos, eyepacs, folder, idrid, messidor2, mmac, ukb
from shared.data.formats.common import FormatReader

FORMATS: dict[str, FormatReader] = {
    m.READER.name: m.READER for m in (eyepacs, messidor2, aptos, idrid, mmac, ukb, folder)
}
