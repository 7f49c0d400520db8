"""resolve.arena_tables on the real Debian libjemalloc.so.2 (stripped, its table checked
in): the table taken where everything agrees, and each disagreement refused with its reason,
on copies of the table changed one field at a time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from ctprofd.resolve import arena_tables
from ctprofd.resolve.arena_tables import MAX_VERSIONS, TableError, arena_fields, versions_in

STOCK = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")  # libjemalloc2, scripts/setup.sh
LOAD_PAGE = 0x1000


@pytest.fixture(scope="module")
def stock():
    with open(STOCK, "rb") as f:
        yield ELFFile(f), f


def debian() -> arena_tables.Table:
    (table,) = [t for t in arena_tables.load() if t.name == "debian-12-libjemalloc2"]
    return table


def fields(stock, tables, allocated=824, deallocated=840, load_page=LOAD_PAGE) -> dict:
    image, stream = stock
    return arena_fields(image, stream, allocated, deallocated, load_page, tables)


def test_the_checked_in_table_applies_with_variables_from_the_first_loaded_page(stock):
    table = debian()
    got = fields(stock, None)  # the checked-in tables
    assert got["table"] == table.name
    assert {k: got[k] for k in table.members} == table.members
    assert {k: got[k] for k in table.variables} == {
        k: v - LOAD_PAGE for k, v in table.variables.items()}
    assert len(got) == len(table.members) + len(table.variables) + 1


def test_the_load_page_may_equal_the_lowest_variable_but_not_lie_above_it(stock):
    table = debian()
    lowest = min(table.variables.values())
    assert min(fields(stock, [table], load_page=lowest)[k] for k in table.variables) == 0
    with pytest.raises(TableError) as error:
        fields(stock, [table], load_page=lowest + 1)
    assert str(error.value) == f"table {table.name}: variables below the first loaded page"


def test_counters_elsewhere_in_tsd_are_refused(stock):
    table = debian()
    with pytest.raises(TableError) as error:
        fields(stock, [table], allocated=824, deallocated=848)
    assert str(error.value) == (f"table {table.name}: counters at 824/840 in tsd_s, the code "
                                "shows 824/848")
    with pytest.raises(TableError):
        fields(stock, [table], allocated=816, deallocated=840)


def test_data_placed_otherwise_is_refused_naming_each_section(stock):
    table = debian()
    image, _ = stock
    bss = image.get_section_by_name(".bss")
    moved = dict(table.sections, **{".bss": (bss["sh_addr"] + 16, bss["sh_size"]),
                                    ".nothere": (0, 8)})
    other = dataclasses.replace(table, name="moved", sections=moved)
    with pytest.raises(TableError) as error:
        fields(stock, [other])
    assert str(error.value) == (
        f"table moved: its data is placed otherwise (.bss at {bss['sh_addr']:#x}+"
        f"{bss['sh_size']:#x}, no .nothere)")
    # every candidate's reason, and the one that applies is still taken
    two = dataclasses.replace(table, name="two", tsd=(1, 2))
    with pytest.raises(TableError) as error:
        fields(stock, [other, two])
    assert str(error.value).startswith("table moved: its data is placed otherwise (")
    assert str(error.value).endswith("; table two: counters at 1/2 in tsd_s, the code shows "
                                     "824/840")
    assert fields(stock, [other, table])["table"] == table.name


def test_no_table_for_the_version_names_both(stock):
    table = dataclasses.replace(debian(), version="5.2.1-0-g" + "0" * 40)
    with pytest.raises(TableError) as error:
        fields(stock, [table])
    assert str(error.value) == ("no arena layout table for jemalloc 5.3.0-0-g54eaed1 "
                                "(tables: 5.2.1-0-g0000000)")
    older = dataclasses.replace(table, version="4.5.0-0-g" + "1" * 40)
    with pytest.raises(TableError) as error:
        fields(stock, [table, older])
    assert str(error.value).endswith("(tables: 4.5.0-0-g1111111, 5.2.1-0-g0000000)")
    with pytest.raises(TableError, match=r"\(tables: none\)$"):
        fields(stock, [])
    with open("/bin/true", "rb") as f:
        with pytest.raises(TableError, match="for jemalloc no version string "):
            arena_fields(ELFFile(f), f, 824, 840, LOAD_PAGE, [table])


def versions(tmp_path, data: bytes) -> list[str]:
    path = tmp_path / "blob"
    path.write_bytes(data)
    with open(path, "rb") as f:
        return versions_in(f)


def test_versions_are_listed_once_each_and_at_most_max_versions(tmp_path):
    made = [f"5.{i}.0-0-g{i:040x}".encode() for i in range(MAX_VERSIONS + 2)]
    assert versions(tmp_path, b"\0".join([made[0], made[1], made[0]])) == [
        made[0].decode(), made[1].decode()]
    assert versions(tmp_path, b"\0".join(made)) == [v.decode() for v in made[:MAX_VERSIONS]]


def test_every_version_a_file_shows_is_named(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"5.3.0-0-g" + b"a" * 40 + b"\0" + b"5.2.1-0-g" + b"b" * 40)
    with open(path, "rb") as f:  # refused on the versions alone: the ELF is not looked at
        with pytest.raises(TableError) as error:
            arena_fields(None, f, 824, 840, LOAD_PAGE, [debian()])
    assert str(error.value).startswith(
        "no arena layout table for jemalloc 5.3.0-0-gaaaaaaa, 5.2.1-0-gbbbbbbb (tables: ")


def test_a_table_is_read_from_its_json(tmp_path):
    path = tmp_path / "tables.json"
    path.write_text('{"tables": [{"name": "n", "version": "v", "sections": {".data": [1, 2]},'
                    ' "tsd": {"thread_allocated": 8, "thread_deallocated": 16},'
                    ' "members": {"m": 3}, "variables": {"x": 4}}]}')
    assert arena_tables.load(path) == (arena_tables.Table(
        "n", "v", {".data": (1, 2)}, (8, 16), {"m": 3}, {"x": 4}),)
    assert isinstance(arena_tables.load(path)[0].sections[".data"], tuple)
