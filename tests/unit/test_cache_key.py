"""The two defences of a layout learned from one file and offered to another with the same
build-id (resolve.attach Attacher._known), each on its own: the owner in the cache key
(one user's file never vouches for another's), and the file's own placement of its TLS
block and TSD symbol (a build-id alone proves nothing: anyone can write any build-id).
A real cache and attacher; the facts are what phase 1 reads from a file."""

import dataclasses

from ctprofd.resolve.attach import Attacher, learned_key
from ctprofd.resolve.cache import LayoutCache
from ctprofd.resolve.debuginfo import DebugSearch
from ctprofd.resolve.elf import Symbol
from ctprofd.resolve.layout import ObjectFacts, TsdLayout

BUILD_ID = "5e" * 20
ROOTS = TsdLayout(BUILD_ID, "je_tsd_tls", 0x40, 824, 840, static_block_offset=2632)
FACTS = ObjectFacts(BUILD_ID, Symbol("je_tsd_tls", 0x40, 3000), embedded_dwarf=False,
                    static_block_offset=2632)  # a file that places its TLS as ROOTS says


def attacher_knowing(owner: int) -> Attacher:
    cache = LayoutCache(None)
    cache.put(learned_key(BUILD_ID, owner), ROOTS, owner)
    return Attacher(cache, DebugSearch(()))


def test_a_layout_learned_from_a_file_applies_to_a_file_of_the_same_owner_and_placement():
    assert attacher_knowing(0)._known(FACTS, 0, "") == ROOTS


def test_another_owners_file_is_not_vouched_for_even_with_the_same_placement():
    # the owner defence alone: the placement and symbol match, only the owner differs
    assert attacher_knowing(0)._known(FACTS, 65534, "") is None
    assert attacher_knowing(65534)._known(FACTS, 0, "") is None


def test_a_file_placing_its_tls_or_symbol_elsewhere_is_not_vouched_for_by_its_owner():
    # the placement defence alone: the same owner, the same build-id
    knows = attacher_knowing(0)
    for facts in (dataclasses.replace(FACTS, static_block_offset=2688),
                  dataclasses.replace(FACTS, symbol=Symbol("je_tsd_tls", 0x80, 3000)),
                  dataclasses.replace(FACTS, symbol=Symbol("tsd_tls", 0x40, 3000)),
                  dataclasses.replace(FACTS, static_block_offset=None, tpoff_got=0x2000)):
        assert knows._known(facts, 0, "") is None
