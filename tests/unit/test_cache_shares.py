"""The layout cache's stores, on a real directory: negative results ("not jemalloc",
failures) never push out a layout; a user over its share evicts its own layouts, never
another user's; imported layouts are never evicted, an import makes older failures stale,
and an import file that cannot be used keeps the layouts read before."""

import logging
import os

from ctprofd.resolve import offsets_file
from ctprofd.resolve.cache import LayoutCache
from ctprofd.resolve.layout import LayoutFailure, NotJemalloc, TsdLayout

ENTRIES = 8


def layout(n: int) -> TsdLayout:
    return TsdLayout(f"{n:040x}", "je_tsd_tls", 0, 824, 840, static_block_offset=2632)


def on_disk(directory, store: str) -> set[str]:
    return {name for name in os.listdir(directory / store) if name.endswith(".json")}


def test_negative_results_never_push_out_a_layout(tmp_path):
    cache = LayoutCache(str(tmp_path), max_entries=ENTRIES)
    cache.put("file:1:1:1:1", layout(1), owner=0)
    for n in range(10 * ENTRIES):  # a flood of files without jemalloc, and failures
        cache.put(f"file:2:{n}:1:1", NotJemalloc(), owner=1000)
        cache.put(f"file:3:{n}:1:1", LayoutFailure("dwarf-parse-failure", "x: no DWARF"),
                  owner=1000)
    assert cache.get("file:1:1:1:1") == layout(1)
    assert LayoutCache(str(tmp_path), max_entries=ENTRIES).get("file:1:1:1:1") == layout(1)
    assert len(on_disk(tmp_path, "negative")) == ENTRIES
    assert on_disk(tmp_path, "layouts") == {"file_1_1_1_1.u0.json"}


def test_a_user_over_its_share_evicts_its_own_layouts_first(tmp_path):
    cache = LayoutCache(str(tmp_path), max_entries=ENTRIES)
    for n in range(3):  # root's services, well within a share
        cache.put(f"file:1:{n}:1:1", layout(n), owner=0)
    for n in range(10 * ENTRIES):  # a user touching a jemalloc binary again and again
        cache.put(f"file:2:{n}:1:1", layout(100 + n), owner=1000)
    assert [cache.get(f"file:1:{n}:1:1") for n in range(3)] == [layout(n) for n in range(3)]
    assert len(cache) == ENTRIES
    reopened = LayoutCache(str(tmp_path), max_entries=ENTRIES)  # the disk keeps them too
    assert [reopened.get(f"file:1:{n}:1:1") for n in range(3)] == [layout(n) for n in range(3)]
    assert sum(name.endswith(".u1000.json") for name in on_disk(tmp_path, "layouts")) == 5
    # two users flooding: each keeps half, and root its three
    for n in range(10 * ENTRIES):
        cache.put(f"file:3:{n}:1:1", layout(1000 + n), owner=1001)
    assert [cache.get(f"file:1:{n}:1:1") for n in range(3)] == [layout(n) for n in range(3)]


def test_imported_layouts_are_pinned_and_an_import_makes_failures_stale(tmp_path):
    cache = LayoutCache(str(tmp_path), max_entries=ENTRIES)
    cache.put("file:9:9:9:9", LayoutFailure("dwarf-parse-failure", "x: no DWARF"), owner=0)
    assert cache.get("file:9:9:9:9") is not None
    offsets_file.dump([layout(7)], str(tmp_path / "imported.json"))
    assert cache.refresh()
    assert not cache.refresh()  # unchanged: a stat only
    assert cache.get("file:9:9:9:9") is None  # cached before the import: tried again
    for n in range(10 * ENTRIES):
        cache.put(f"file:2:{n}:1:1", layout(100 + n), owner=0)
    assert cache.get(f"build-id:{layout(7).build_id}") == layout(7)
    assert cache.imported() == {layout(7).build_id: layout(7)}
    offsets_file.dump([], str(tmp_path / "imported.json"))
    cache.put("file:8:8:8:8", layout(7), owner=0)  # learned through the import
    assert cache.refresh()
    assert cache.get(f"build-id:{layout(7).build_id}") is None
    assert cache.get("file:8:8:8:8") is None  # removed with its import


def test_an_unusable_import_is_logged_once_and_the_layouts_read_before_kept(tmp_path, caplog):
    imported = tmp_path / "imported.json"
    offsets_file.dump([layout(7)], str(imported))
    cache = LayoutCache(str(tmp_path), max_entries=ENTRIES)
    cache.put("file:8:8:8:8", layout(7), owner=0)  # learned through the import
    failure = LayoutFailure("dwarf-parse-failure", "x: no DWARF")
    cache.put("file:9:9:9:9", failure, owner=0)
    imported.write_text(imported.read_text().replace('"layouts"', '"layouts",'))  # a typo
    with caplog.at_level(logging.WARNING, logger="ctprofd.resolve.cache"):
        assert not cache.refresh()
        assert not cache.refresh()
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("imported layouts unusable, the 1 read before are kept: "
                              f"{imported}: not JSON"), warning
    assert cache.imported() == {layout(7).build_id: layout(7)}
    assert cache.get(f"build-id:{layout(7).build_id}") == layout(7)
    assert cache.get("file:8:8:8:8") == layout(7)
    assert cache.get("file:9:9:9:9") == failure  # nothing new to try it with
