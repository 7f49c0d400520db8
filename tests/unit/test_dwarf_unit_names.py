"""The raw reader that orders DWARF units by name agrees with pyelftools on real objects."""

from __future__ import annotations

import pytest
from elftools.elf.elffile import ELFFile

from ctprofd.resolve import dwarf


def pyelftools_names(info) -> list[tuple[int, str | None]]:
    return [(cu.cu_offset, dwarf._name(cu.get_top_DIE())) for cu in info.iter_CUs()]


@pytest.mark.parametrize("variant", ["static", "dynamic-stripped-buildid",
                                     "static-stripped-debuglink"])
def test_unit_names_match_pyelftools(fixture_bins, variant):
    chosen = fixture_bins[variant]
    path = chosen.debug_file or chosen.jemalloc_object
    with open(path, "rb") as stream:
        info = ELFFile(stream).get_dwarf_info()
        names = dwarf._unit_names(info)
        assert names is not None
        assert len(names) > 50  # jemalloc alone has dozens of units
        assert names == pyelftools_names(info)


def test_tsd_search_starts_with_jemalloc_sources(fixture_bins):
    with open(fixture_bins["static"].binary, "rb") as stream:
        info = ELFFile(stream).get_dwarf_info()
        first = next(dwarf._ordered_units(info))
        assert dwarf._name(first.get_top_DIE()).rsplit("/", 1)[-1] in dwarf.JEMALLOC_SOURCES
