"""Format readers: one module per dataset layout, each turning the real on-disk layout into rows and problems.

`read_site(site)` runs the right reader and returns the validated manifest with every problem found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from shared.config import validate
from shared.data.formats import aptos, eyepacs, folder, idrid, messidor2, mmac, ukb
from shared.data.formats.common import FormatReader, Problem, drop_eye_conflicts
from shared.data.manifest import empty_manifest, new_manifest

if TYPE_CHECKING:  # a SiteConfig names its format: readers take it, never import it
    from shared.data.site import SiteConfig

FORMATS: dict[str, FormatReader] = {
    m.READER.name: m.READER for m in (eyepacs, messidor2, aptos, idrid, mmac, ukb, folder)
}


@dataclass(frozen=True)
class SiteData:
    manifest: pd.DataFrame
    problems: tuple[Problem, ...]
    tasks: dict[str, int]

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]


def read_site(site: SiteConfig) -> SiteData:
    """List the site's images into a manifest; nothing is decoded here."""
    reader = FORMATS[site.format]
    options = validate(reader.options, site.options, f"{site.source or site.name}: options")
    rows = reader.read(site.root, options)
    drop_eye_conflicts(rows)
    manifest = new_manifest(rows.rows, site.name, rows.tasks) if rows.rows else empty_manifest(site.name)
    return SiteData(manifest, tuple(rows.problems), dict(rows.tasks))
