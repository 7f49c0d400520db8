"""The plausibility checks of resolve.layout on plain data, each bound from both sides:
ArenaLayout.check, validate (what test_tls_math leaves), ObjectFacts.check and its dict
form, resolution_from_dict and the dict forms of the three results, LayoutFailure.about,
and applies_to (a layout learned from another file with the same build-id)."""

from __future__ import annotations

import dataclasses

import pytest

from ctprofd.report import tags
from ctprofd.resolve.elf import Symbol
from ctprofd.resolve.layout import (HEALTH_FIELDS, RECORD_MAX, ArenaLayout, LayoutFailure,
                                    NotJemalloc, ObjectFacts, TsdLayout, applies_to,
                                    resolution_from_dict, validate)

# jemalloc 5.3.0's arena layout as its DWARF gives it (the debug build of the tests)
ARENA = ArenaLayout(
    arenas=681536, arenas_count=4095, narenas_total=714632, nhbins=2820688,
    sz_index2size_tab=2817152, nsizes=232, arena_bin_offsets=714656, bin_infos=2812800,
    bin_info_size=40, bin_info_shards=20, tcache_bin_alloc_size=2820872,
    tcache_bin_alloc_alignment=2820864, arena_internal=56, arena_cache_locks=10464,
    arena_lstats=976, nlarge=196, lstat_size=48, lstat_nmalloc=0, lstat_ndalloc=8,
    lstat_nrequests=16, arena_descriptors=10400, tsd_descriptor=272, descriptor_next=0,
    descriptor_bins=16, cache_bin_size=24, cache_bin_head=0, cache_bin_nrequests=8,
    cache_bin_empty=20, bin_size=224, bin_nrequests=128, bin_curregs=136, arena_ind=78928,
    bin_info_reg_size=0, bin_info_slab_size=8, bin_info_nregs=16, arena_nactive=10656,
    arena_dirty_pages=20480, arena_dirty_guarded_pages=30136, arena_muzzy_pages=39920,
    arena_muzzy_guarded_pages=49576, arena_retained_pages=59360,
    arena_retained_guarded_pages=69016, arena_pac_mapped=176, arena_base=78936,
    base_allocated=3880, base_resident=3888, base_mapped=3896)
# the same without anything a layout cached before they were read lacks
OLD_ARENA = dataclasses.replace(ARENA, arena_ind=None, bin_info_reg_size=None,
                                bin_info_slab_size=None, bin_info_nregs=None,
                                **{name: None for name in HEALTH_FIELDS})
BUILD_ID = "cfb124ef75d0d4911f5bea0b0b4f5c8ae69def43"


def refusal(arena: ArenaLayout) -> str:
    with pytest.raises(ValueError) as info:
        arena.check()
    return str(info.value)


OUTSIDE = "arena layout: offsets must be integers in [0, 2**40)"
COUNTS = "arena layout: implausible size class or arena counts"


def members(record: str) -> str:
    return f"arena layout: {record} members outside the record or out of order"


# --- ArenaLayout -------------------------------------------------------------------------

def test_derived_figures():
    assert ARENA.nbins == 36
    assert ARENA.has_health and not OLD_ARENA.has_health
    for name in HEALTH_FIELDS:  # every one of them is needed
        assert not dataclasses.replace(ARENA, **{name: None}).has_health


@pytest.mark.parametrize("arena", [
    ARENA, OLD_ARENA, dataclasses.replace(ARENA, table="x" * 100),
    dataclasses.replace(ARENA, arenas=(1 << 40) - 1, descriptor_next=0),
    dataclasses.replace(OLD_ARENA, arena_base=(1 << 40) - 1),
])
def test_plausible_arena_layouts_are_accepted(arena: ArenaLayout):
    arena.check()


@pytest.mark.parametrize("change, message", [
    ({"table": "x" * 101}, "arena layout: table must be a short name"),
    ({"table": None}, "arena layout: table must be a short name"),
    ({"arenas": 1 << 40}, OUTSIDE),
    ({"arenas": -1}, OUTSIDE),
    ({"arena_base": 1 << 40}, OUTSIDE),  # optional ones too, when set
    ({"arena_ind": -1}, OUTSIDE),
    ({"arenas": True}, OUTSIDE),
    ({"arenas": 681536.0}, OUTSIDE),
    ({"bin_info_nregs": "16"}, OUTSIDE),
])
def test_arena_fields_that_are_no_offsets_are_refused(change: dict, message: str):
    assert refusal(dataclasses.replace(ARENA, **change)) == message


def test_an_old_layout_with_a_field_that_is_no_offset_is_refused():
    assert refusal(dataclasses.replace(OLD_ARENA, arenas=-1)) == OUTSIDE


@pytest.mark.parametrize("change, accepted", [
    ({"nlarge": 1}, True), ({"nlarge": 0}, False),
    ({"nlarge": 231}, True), ({"nlarge": 232}, False),
    ({"nsizes": 1024}, True), ({"nsizes": 1025}, False),
    ({"arenas_count": 1}, True), ({"arenas_count": 0}, False),
    ({"arenas_count": 1 << 16}, True), ({"arenas_count": (1 << 16) + 1}, False),
])
def test_size_class_and_arena_counts_are_bounded(change: dict, accepted: bool):
    arena = dataclasses.replace(ARENA, **change)
    if accepted:
        arena.check()
    else:
        assert refusal(arena) == COUNTS


@pytest.mark.parametrize("record, change, accepted", [
    # the largest record of each kind, its last member's 8 bytes at its end
    ("lstat", {"lstat_size": RECORD_MAX["lstat"], "lstat_nrequests": 248}, True),
    ("lstat", {"lstat_size": RECORD_MAX["lstat"] + 1, "lstat_nrequests": 249}, False),
    ("lstat", {"lstat_nrequests": 40}, True),
    ("lstat", {"lstat_nrequests": 41}, False),
    ("lstat", {"lstat_ndalloc": 0}, False),  # two members at one place
    ("lstat", {"lstat_nmalloc": 8, "lstat_ndalloc": 0}, False),  # out of order
    ("lstat", {"lstat_ndalloc": 24}, False),
    ("cache_bin", {"cache_bin_size": RECORD_MAX["cache_bin"], "cache_bin_nrequests": 240,
                   "cache_bin_empty": 248}, True),
    ("cache_bin", {"cache_bin_size": RECORD_MAX["cache_bin"] + 1,
                   "cache_bin_nrequests": 240, "cache_bin_empty": 248}, False),
    ("cache_bin", {"cache_bin_head": 8}, False),
    ("cache_bin", {"cache_bin_size": 15, "cache_bin_head": 0, "cache_bin_nrequests": 8},
     False),
    ("bin", {"bin_size": RECORD_MAX["bin"], "bin_curregs": 1016}, True),
    ("bin", {"bin_size": RECORD_MAX["bin"] + 1, "bin_curregs": 1017}, False),
    ("bin", {"bin_curregs": 216}, True),
    ("bin", {"bin_curregs": 217}, False),
    ("bin", {"bin_curregs": 128}, False),
    ("bin", {"bin_nrequests": 136, "bin_curregs": 128}, False),
])
def test_record_members_lie_in_their_record_in_order(record: str, change: dict,
                                                     accepted: bool):
    arena = dataclasses.replace(ARENA, **change)
    if accepted:
        arena.check()
    else:
        assert refusal(arena) == members(record)


def test_record_max():
    assert RECORD_MAX == {"bin": 1024, "bin_info": 256, "cache_bin": 256, "lstat": 256}


@pytest.mark.parametrize("size, accepted", [(1, True), (0, False), (256, True), (257, False)])
def test_bin_info_size_is_bounded(size: int, accepted: bool):
    arena = dataclasses.replace(ARENA, bin_info_size=size)
    if accepted:
        arena.check()
    else:
        assert refusal(arena) == f"arena layout: a bin_info_t of {size} bytes"


@pytest.mark.parametrize("empty, accepted", [(16, True), (15, False), (22, True), (23, False)])
def test_the_empty_position_lies_after_the_requests_and_within_the_cache_bin(empty: int,
                                                                              accepted: bool):
    arena = dataclasses.replace(ARENA, cache_bin_empty=empty)
    if accepted:
        arena.check()
    else:
        assert refusal(arena) == "arena layout: cache_bin members outside the record"


@pytest.mark.parametrize("words", [(3880, 3888, 3904), (3880, 3896, 3904), (3888, 3888, 3896),
                                   (3872, 3888, 3896), (3880, 3888, 3888)])
def test_base_words_are_three_in_a_row(words: tuple[int, int, int]):
    allocated, resident, mapped = words
    arena = dataclasses.replace(ARENA, base_allocated=allocated, base_resident=resident,
                                base_mapped=mapped)
    assert refusal(arena) == ("arena layout: base_t's allocated, resident and mapped are "
                              "not three words in a row")
    # without the health figures they are not read, nor checked
    dataclasses.replace(arena, arena_nactive=None).check()


# --- validate: what test_tls_math leaves --------------------------------------------------

LAYOUT = TsdLayout(BUILD_ID, "je_tsd_tls", 0, 824, 840, tpoff_got=679816, arena=ARENA)


def validate_refusal(layout: TsdLayout) -> str:
    with pytest.raises(ValueError) as info:
        validate(layout)
    return str(info.value)


@pytest.mark.parametrize("change", [
    {}, {"arena_missing": "m" * 500}, {"view": "v" * 200}, {"code_source": None},
    {"tpoff_got": None, "dynamic_tls": True}, {"arena": None},
])
def test_plausible_layouts_pass(change: dict):
    validate(dataclasses.replace(LAYOUT, **change))


@pytest.mark.parametrize("change, message", [
    ({"arena_missing": "m" * 501}, "arena_missing must be a short string"),
    ({"arena_missing": None}, "arena_missing must be a short string"),
    ({"view": "v" * 201}, "view must be a short string"),
    ({"view": None}, "view must be a short string"),
    ({"dynamic_tls": 1}, "dynamic_tls must be a boolean"),
    ({"dynamic_tls": True}, "exactly one of static_block_offset, tpoff_got and dynamic_tls "
                            "must be set"),
    ({"tpoff_got": None, "static_block_offset": 64, "dynamic_tls": True},
     "exactly one of static_block_offset, tpoff_got and dynamic_tls must be set"),
    ({"static_block_offset": 64, "dynamic_tls": True},
     "exactly one of static_block_offset, tpoff_got and dynamic_tls must be set"),
    ({"arena": dataclasses.replace(ARENA, nlarge=0)}, COUNTS),
])
def test_implausible_layouts_fail(change: dict, message: str):
    assert validate_refusal(dataclasses.replace(LAYOUT, **change)) == message


# --- the results as dicts -----------------------------------------------------------------

def test_a_layout_round_trips_with_and_without_its_arena():
    for layout in (LAYOUT, dataclasses.replace(LAYOUT, arena=None, arena_missing="no DWARF",
                                               code_source="malloc/free fast paths",
                                               view="mnt:[4026531840]")):
        data = layout.to_dict()
        assert data["kind"] == "layout"
        assert resolution_from_dict(data) == layout
    assert LAYOUT.to_dict()["arena"]["bin_size"] == 224


def test_a_layout_dict_without_an_arena_has_none():
    data = dataclasses.replace(LAYOUT, arena=None).to_dict()
    del data["arena"]
    assert resolution_from_dict(data) == dataclasses.replace(LAYOUT, arena=None)


def test_a_layout_from_a_dict_is_validated():
    data = LAYOUT.to_dict()
    data["deallocated_offset"] = 824
    with pytest.raises(ValueError, match="^thread_deallocated must come after"):
        resolution_from_dict(data)
    data = LAYOUT.to_dict()
    data["arena"]["nsizes"] = 1025
    with pytest.raises(ValueError) as info:
        resolution_from_dict(data)
    assert str(info.value) == COUNTS


def test_not_jemalloc_round_trips_and_keeps_no_digest():
    assert NotJemalloc().reason == "no jemalloc TSD symbol"
    assert NotJemalloc().to_dict() == {"kind": "not-jemalloc",
                                       "reason": "no jemalloc TSD symbol"}
    found = NotJemalloc("stripped", mapped=7)
    assert found.to_dict() == {"kind": "not-jemalloc", "reason": "stripped"}
    assert resolution_from_dict(found.to_dict()) == NotJemalloc("stripped")
    assert resolution_from_dict(found.to_dict()).mapped is None
    assert found == NotJemalloc("stripped", mapped=8)  # the digest is not compared


def test_a_failure_round_trips():
    failure = LayoutFailure(tags.DWARF_PARSE_FAILURE, "/lib/x: no DWARF", crashed=True,
                            lost=False, subject="/lib/x")
    assert failure.to_dict() == {"kind": "failure", "tag": tags.DWARF_PARSE_FAILURE,
                                 "message": "/lib/x: no DWARF", "crashed": True,
                                 "lost": False, "subject": "/lib/x"}
    assert resolution_from_dict(failure.to_dict()) == failure
    bare = {"kind": "failure", "tag": tags.ARCH_MISMATCH, "message": "m"}
    assert resolution_from_dict(bare) == LayoutFailure(tags.ARCH_MISMATCH, "m", False, False,
                                                       "")


@pytest.mark.parametrize("change, message", [
    ({"tag": "no-such-tag"}, "unknown tag 'no-such-tag'"),
    ({"crashed": 1}, "crashed and lost must be booleans"),
    ({"lost": None}, "crashed and lost must be booleans"),
    ({"subject": None}, "subject must be a string"),
    ({"subject": 5}, "subject must be a string"),
    ({"kind": "facts"}, "unknown kind 'facts'"),
])
def test_malformed_failures_are_refused(change: dict, message: str):
    data = {**LayoutFailure(tags.DWARF_PARSE_FAILURE, "m").to_dict(), **change}
    with pytest.raises(ValueError) as info:
        resolution_from_dict(data)
    assert str(info.value) == message


def test_a_dict_without_a_kind_is_refused():
    with pytest.raises(KeyError):
        resolution_from_dict({"tag": tags.DWARF_PARSE_FAILURE, "message": "m"})


def test_source_says_dwarf_or_code():
    assert LAYOUT.source == "dwarf: embedded"
    assert dataclasses.replace(LAYOUT, dwarf_source="debuglink /x.debug").source == (
        "dwarf: debuglink /x.debug")
    assert dataclasses.replace(LAYOUT, dwarf_source="none",
                               code_source="malloc/free fast paths").source == (
        "code: malloc/free fast paths")
    assert dataclasses.replace(LAYOUT, code_source="").source == "dwarf: embedded"


# --- LayoutFailure.about -----------------------------------------------------------------

def test_about_names_the_path_the_asker_has_the_object_at():
    fresh = LayoutFailure(tags.DWARF_PARSE_FAILURE, "/a/lib.so: no DWARF")
    assert fresh.about("/a/lib.so") == LayoutFailure(tags.DWARF_PARSE_FAILURE,
                                                     "/a/lib.so: no DWARF",
                                                     subject="/a/lib.so")
    assert fresh.about("/b/lib.so") is fresh  # a message about another file: as it is
    told = fresh.about("/a/lib.so")
    assert told.about("/a/lib.so") is told
    assert told.about("/proc/7/root/lib.so") == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "/proc/7/root/lib.so: no DWARF",
        subject="/proc/7/root/lib.so")
    odd = LayoutFailure(tags.DWARF_PARSE_FAILURE, "machine code: x", subject="/a/lib.so")
    assert odd.about("/b/lib.so") is odd
    kept = LayoutFailure(tags.DWARF_PARSE_FAILURE, "/a/lib.so: x", crashed=True, lost=True,
                         subject="/a/lib.so").about("/b")
    assert (kept.message, kept.crashed, kept.lost, kept.subject) == ("/b: x", True, True, "/b")


# --- ObjectFacts ---------------------------------------------------------------------------

FACTS = ObjectFacts(BUILD_ID, Symbol("je_tsd_tls", 16, 2632), True,
                    debuglink=("libjemalloc.so.2.debug", 0xFFFFFFFF), tpoff_got=679816,
                    tpoff_addend=8, tpoff_symbolic=True, load_page=0x1000)


def test_facts_round_trip_through_their_dict():
    data = FACTS.to_dict()
    assert data == {"kind": "facts", "build_id": BUILD_ID,
                    "symbol": {"name": "je_tsd_tls", "value": 16, "size": 2632},
                    "embedded_dwarf": True, "debuglink": ("libjemalloc.so.2.debug",
                                                          0xFFFFFFFF),
                    "static_block_offset": None, "tpoff_got": 679816, "tpoff_addend": 8,
                    "tpoff_symbolic": True, "dynamic_tls": False, "load_page": 0x1000}
    assert ObjectFacts.from_dict(data) == FACTS
    data.update(debuglink=["x.debug", 0], symbol=None, build_id=None)  # as JSON has them
    assert ObjectFacts.from_dict(data) == dataclasses.replace(
        FACTS, debuglink=("x.debug", 0), symbol=None, build_id=None)
    data.update(debuglink=None)
    assert ObjectFacts.from_dict(data).debuglink is None


def test_the_facts_placement_is_what_places_the_tls_block():
    assert FACTS.placement() == {"static_block_offset": None, "tpoff_got": 679816,
                                 "tpoff_addend": 8, "tpoff_symbolic": True,
                                 "dynamic_tls": False}


def test_facts_of_another_kind_are_refused():
    with pytest.raises(ValueError) as info:
        ObjectFacts.from_dict({**FACTS.to_dict(), "kind": "layout"})
    assert str(info.value) == "not object facts: 'layout'"


@pytest.mark.parametrize("change", [
    {"build_id": "ab"}, {"build_id": "0" * 128}, {"build_id": None},
    {"debuglink": ("a", 0)}, {"debuglink": ("...", (1 << 32) - 1)}, {"debuglink": None},
    {"symbol": None}, {"symbol": Symbol("", 0, 0)},
    {"embedded_dwarf": False}, {"load_page": 0}, {"load_page": (1 << 48) - 1},
    {"tpoff_got": None, "dynamic_tls": True},
    {"tpoff_got": None, "static_block_offset": 2632},
])
def test_plausible_facts_are_accepted(change: dict):
    dataclasses.replace(FACTS, **change).check()


BUILD_IDS = "build_id must be 2 to 128 lowercase hex digits"
LINK = "debuglink must be a file name and a CRC32"
SYMBOL = "symbol must be a name, a value and a size"


@pytest.mark.parametrize("change, message", [
    ({"build_id": "a"}, BUILD_IDS), ({"build_id": "0" * 129}, BUILD_IDS),
    ({"build_id": "AB"}, BUILD_IDS), ({"build_id": "abg0"}, BUILD_IDS),
    ({"build_id": ""}, BUILD_IDS), ({"build_id": 0xAB}, BUILD_IDS),
    ({"debuglink": ("", 0)}, LINK), ({"debuglink": (".", 0)}, LINK),
    ({"debuglink": ("..", 0)}, LINK), ({"debuglink": ("../x", 0)}, LINK),
    ({"debuglink": ("x\0y", 0)}, LINK), ({"debuglink": (b"x", 0)}, LINK),
    ({"debuglink": ("x", -1)}, LINK), ({"debuglink": ("x", 1 << 32)}, LINK),
    ({"debuglink": ("x", 1.0)}, LINK), ({"debuglink": ("x", True)}, LINK),
    ({"symbol": Symbol(None, 0, 0)}, SYMBOL), ({"symbol": Symbol("t", 0.0, 0)}, SYMBOL),
    ({"symbol": Symbol("t", 0, None)}, SYMBOL), ({"symbol": Symbol("t", True, 0)}, SYMBOL),
    ({"embedded_dwarf": 1}, "embedded_dwarf must be a boolean"),
    ({"load_page": -1}, "load_page must be a non-negative integer"),
    ({"load_page": 1 << 48}, "load_page must be a non-negative integer"),
    ({"load_page": 4096.0}, "load_page must be a non-negative integer"),
    ({"tpoff_got": None}, "exactly one of static_block_offset, tpoff_got and dynamic_tls "
                          "must be set"),
    ({"tpoff_got": -8}, "tpoff_got must be a non-negative integer"),
])
def test_implausible_facts_are_refused(change: dict, message: str):
    with pytest.raises(ValueError) as info:
        ObjectFacts.from_dict(dataclasses.replace(FACTS, **change).to_dict())
    assert str(info.value) == message


# --- applies_to ---------------------------------------------------------------------------

LEARNED = TsdLayout(BUILD_ID, "je_tsd_tls", 16, 824, 840, tpoff_got=679816, tpoff_addend=8,
                    tpoff_symbolic=True)


def test_a_layout_applies_to_a_file_that_places_its_tls_as_it_says():
    assert applies_to(LEARNED, FACTS)
    assert applies_to(LEARNED, dataclasses.replace(FACTS, symbol=None))  # stripped: no symbol


@pytest.mark.parametrize("change", [
    {"build_id": "cf" * 20}, {"build_id": None}, {"tpoff_got": 679824}, {"tpoff_addend": 0},
    {"tpoff_symbolic": False}, {"tpoff_got": None, "dynamic_tls": True},
    {"tpoff_got": None, "static_block_offset": 2632},
    {"symbol": Symbol("tsd_tls", 16, 2632)}, {"symbol": Symbol("je_tsd_tls", 24, 2632)},
])
def test_a_layout_does_not_apply_to_a_file_that_says_otherwise(change: dict):
    assert not applies_to(LEARNED, dataclasses.replace(FACTS, **change))


def test_the_symbols_size_is_no_part_of_what_applies():
    assert applies_to(LEARNED, dataclasses.replace(FACTS, symbol=Symbol("je_tsd_tls", 16, 8)))
