"""The layout cache's bookkeeping, on a real directory: what it counts, what an import
makes stale (and when), what it takes from a directory others may have written to, how it
keeps its index honest when files go, and how it falls back to memory when the disk fails."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from ctprofd.config.settings import Config
from ctprofd.resolve import offsets_file
from ctprofd.resolve.cache import IMPORTED_FILE, LayoutCache, Shares
from ctprofd.resolve.layout import LayoutFailure, NotJemalloc, TsdLayout

FAILURE = LayoutFailure("dwarf-parse-failure", "x: no DWARF")
LOGGER = "ctprofd.resolve.cache"


def layout(n: int) -> TsdLayout:
    return TsdLayout(f"{n:02x}" * 20, "je_tsd_tls", 0, 824, 840, static_block_offset=2632)


def key(n: int) -> str:
    return f"file:64769:{1000 + n}:4096:{n}"


def names(directory: Path) -> set[str]:
    return set(os.listdir(directory)) if directory.exists() else set()


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# -- counting and what is held --

def test_each_lookup_counts_once_a_hit_or_a_miss():
    cache = LayoutCache(None)
    assert (cache.hits, cache.misses) == (0, 0)
    assert cache.get(key(1)) is None
    cache.put(key(2), layout(2))
    assert cache.get(key(1), key(2)) == layout(2)  # the second key hits: one lookup
    assert cache.get(key(2)) == layout(2)
    assert cache.get(key(3), key(4)) is None
    assert (cache.hits, cache.misses) == (2, 2)


def test_its_default_bounds_are_the_configurations():
    cache, config = LayoutCache(None), Config()
    for n in range(config.cache_max_entries + 1):
        cache.put(key(n), layout(n % 7))
    assert len(cache) == config.cache_max_entries
    assert cache.failure_ttl == 600.0


def test_pinned_imported_and_learned_layouts_are_each_held_and_counted(tmp_path: Path):
    offsets_file.dump([layout(1), layout(2)], str(tmp_path / IMPORTED_FILE))
    cache = LayoutCache(str(tmp_path))
    cache.pin([layout(3)])
    learned = layout(4)
    cache.put(key(4), learned)
    cache.put(key(5), learned)  # one layout under two keys (a file's, its build's): once
    cache.put(key(6), layout(6))
    assert len(cache) == 6
    assert cache.configured() == {layout(3).build_id: layout(3)}
    assert cache.get(f"build-id:{layout(3).build_id}") == layout(3)
    assert cache.get(f"build-id:{layout(1).build_id}") == layout(1)
    assert sorted(cache.layouts(), key=lambda l: l.build_id) == [
        layout(n) for n in (1, 2, 3, 4, 6)]


def test_the_learned_list_holds_build_id_keys_only(tmp_path: Path):
    cache = LayoutCache(str(tmp_path))
    cache.put(key(1), layout(1))
    cache.put(f"build-id:{layout(2).build_id}:uid:1000", layout(2), owner=1000)
    assert cache.learned() == [(f"build-id:{layout(2).build_id}:uid:1000", 1000, layout(2))]


def test_a_memory_only_cache_has_no_directory_and_no_import_to_refresh():
    cache = LayoutCache(None)
    assert cache.directory is None
    assert cache.refresh() is False


# -- imports: what they make stale, and when --

def failure_stored(directory: Path) -> float:
    """Store FAILURE under key(1) in a cache on `directory`; the time it was stored at."""
    LayoutCache(str(directory)).put(key(1), FAILURE)
    [path] = (directory / "negative").iterdir()
    return json.loads(path.read_text())["stored_at"]


def import_dated(directory: Path, when: float) -> None:
    path = directory / IMPORTED_FILE
    offsets_file.dump([layout(9)], str(path))
    os.utime(path, ns=(int(when * 1e9), int(when * 1e9)))


def test_at_start_only_failures_older_than_the_import_file_are_stale(tmp_path: Path):
    stored = failure_stored(tmp_path)
    import_dated(tmp_path, stored - 1)  # imported before the failure: it still stands
    assert LayoutCache(str(tmp_path)).get(key(1)) == FAILURE
    import_dated(tmp_path, stored + 1)  # imported after it: tried again
    cache = LayoutCache(str(tmp_path))
    assert cache.get(key(1)) is None
    assert names(tmp_path / "negative") == set()  # and forgotten on disk too


def test_an_import_seen_later_makes_every_failure_so_far_stale_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    stored = failure_stored(tmp_path)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        cache = LayoutCache(str(tmp_path))
        assert messages(caplog) == []
        import_dated(tmp_path, stored - 100)  # dated early (a coarse clock, a copied file)
        assert cache.refresh() is True
    assert cache.get(key(1)) is None
    assert messages(caplog) == [
        f"imported layouts changed: 1 held in {tmp_path / IMPORTED_FILE}; failures cached "
        f"before are tried again"]


def test_an_import_removed_takes_its_layouts_and_what_was_learned_through_them(
        tmp_path: Path):
    offsets_file.dump([layout(1)], str(tmp_path / IMPORTED_FILE))
    cache = LayoutCache(str(tmp_path))
    cache.put(key(1), layout(1))  # learned through the import
    cache.put(key(2), layout(2))
    (tmp_path / IMPORTED_FILE).unlink()
    assert cache.refresh() is True
    assert cache.imported() == {}
    assert (cache.get(key(1)), cache.get(key(2))) == (None, layout(2))


def test_an_expired_failure_is_forgotten_on_disk(tmp_path: Path):
    cache = LayoutCache(str(tmp_path), failure_ttl=-1)
    cache.put(key(1), FAILURE)
    cache.put(key(2), NotJemalloc())  # never expires
    assert len(names(tmp_path / "negative")) == 2
    assert (cache.get(key(1)), cache.get(key(2))) == (None, NotJemalloc())
    assert len(names(tmp_path / "negative")) == 1


# -- one key, one result, one file --

def test_a_result_replacing_another_of_the_other_kind_leaves_no_file_behind(tmp_path: Path):
    cache = LayoutCache(str(tmp_path))
    cache.put(key(1), FAILURE)
    cache.put(key(1), layout(1))
    assert (len(names(tmp_path / "layouts")), names(tmp_path / "negative")) == (1, set())
    cache.put(key(1), NotJemalloc())
    assert (names(tmp_path / "layouts"), len(names(tmp_path / "negative"))) == (set(), 1)
    assert LayoutCache(str(tmp_path)).get(key(1)) == NotJemalloc()


def test_a_key_stored_again_for_another_owner_keeps_one_file(tmp_path: Path):
    cache = LayoutCache(str(tmp_path))
    cache.put(key(1), layout(1), owner=0)
    cache.put(key(1), layout(1), owner=1000)
    assert [n.rsplit(".", 2)[1] for n in names(tmp_path / "layouts")] == ["u1000"]
    assert json.loads(next((tmp_path / "layouts").iterdir()).read_text())["owner"] == 1000


def test_a_forgotten_entry_leaves_no_share_behind():
    """An entry removed (its key now holds a failure) no longer counts in its owner's
    share: the next eviction picks among what is held."""
    cache = LayoutCache(None, max_entries=2)
    cache.put(key(1), layout(1))
    cache.put(key(1), FAILURE)
    cache.put(key(2), layout(2))
    cache.put(key(3), layout(3))
    assert (cache.get(key(2)), cache.get(key(3))) == (layout(2), layout(3))


@pytest.mark.parametrize("lose", ["replaced by a failure", "removed by another",
                                  "unusable"])
def test_a_file_gone_from_the_index_costs_no_other_owners_file(tmp_path: Path, lose: str):
    """Root's file leaves the disk (replaced by a failure, removed by another daemon, or set
    aside as unusable); a user's two files then fit the bound of two and both stay."""
    cache = LayoutCache(str(tmp_path), max_entries=2)
    cache.put(key(1), layout(1), owner=0)
    [root_file] = (tmp_path / "layouts").iterdir()
    if lose == "replaced by a failure":
        cache.put(key(1), FAILURE, owner=0)
    else:
        cache = LayoutCache(str(tmp_path), max_entries=2)  # root's file on disk only
        if lose == "removed by another":
            root_file.unlink()
        else:
            root_file.write_text("{")
        assert cache.get(key(1)) is None
    cache.put(key(2), layout(2), owner=1000)
    cache.put(key(3), layout(3), owner=1000)
    assert len([n for n in names(tmp_path / "layouts") if n.endswith(".u1000.json")]) == 2


# -- what the directory holds besides the cache's own files --

def test_a_missing_or_no_directory_is_no_older_cache(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        LayoutCache(None)
        LayoutCache(str(tmp_path / "absent"), writable=False)
    assert messages(caplog) == []
    assert not (tmp_path / "absent").exists()


def test_strays_in_the_directory_are_left_alone_and_older_files_removed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    layouts = tmp_path / "layouts"
    LayoutCache(str(tmp_path)).put(key(1), layout(1))
    (layouts / "notes.txt").write_text("the operator's")
    (layouts / "a.u0.json").mkdir()  # a directory named like an entry
    (layouts / "old.uabc.json").write_text("{}")  # no owner in the name: an older ctprofd's
    (layouts / "old.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cache = LayoutCache(str(tmp_path))
    assert messages(caplog) == [
        f"removed 2 cache files of an older ctprofd from {tmp_path}: their binaries are "
        f"parsed again"]
    assert names(layouts) == {"notes.txt", "a.u0.json",
                              f"{key(1).replace(':', '_')}.u0.json"}
    assert cache.get(key(1)) == layout(1)


def test_a_symlink_named_as_an_entry_is_not_followed(tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    LayoutCache(str(elsewhere)).put(key(1), layout(1))
    [real] = (elsewhere / "layouts").iterdir()
    (tmp_path / "layouts").mkdir()
    (tmp_path / "layouts" / real.name).symlink_to(real)
    assert LayoutCache(str(tmp_path)).get(key(1)) is None


def test_a_key_holding_the_owner_separator_reads_back(tmp_path: Path):
    view_key = f"build-id:{layout(1).build_id}:uid:5:view:mnt.u7"
    LayoutCache(str(tmp_path)).put(view_key, layout(1), owner=5)
    reopened = LayoutCache(str(tmp_path))
    assert reopened.get(view_key) == layout(1)
    assert reopened.learned() == [(view_key, 5, layout(1))]


def test_an_unusable_file_is_set_aside_saying_why(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture):
    LayoutCache(str(tmp_path)).put(key(1), layout(1))
    [path] = (tmp_path / "layouts").iterdir()
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "key": key(2)}))  # another key's name
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert LayoutCache(str(tmp_path)).get(key(1)) is None
    assert messages(caplog) == [
        f"setting aside unusable cache file {path} (foreign format version or key); it will "
        f"be rebuilt"]


# -- the disk failing --

def test_a_directory_that_cannot_be_made_leaves_a_memory_cache_and_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    (tmp_path / "layouts").write_text("in the way")
    (tmp_path / "negative").write_text("in the way")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cache = LayoutCache(str(tmp_path))
    assert messages(caplog) == [f"cannot create cache directory {tmp_path / 'layouts'}: File "
                                f"exists; caching in memory only"]
    assert cache.directory is None
    cache.put(key(1), layout(1))
    assert cache.get(key(1)) == layout(1)


def test_a_directory_lost_while_running_leaves_a_memory_cache_and_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cache = LayoutCache(str(tmp_path))
    cache.put(f"build-id:{layout(1).build_id}:uid:0", layout(1))
    shutil.rmtree(tmp_path / "layouts")
    shutil.rmtree(tmp_path / "negative")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cache.put(key(2), layout(2))
        cache.put(key(3), FAILURE)
    assert messages(caplog) == [f"cannot write cache directory {tmp_path / 'layouts'}: No "
                                f"such file or directory; caching in memory only"]
    assert cache.directory is None
    assert (cache.get(key(2)), cache.get(key(3))) == (layout(2), FAILURE)
    assert cache.learned() == [(f"build-id:{layout(1).build_id}:uid:0", 0, layout(1))]
    cache.put(key(4), layout(4))
    assert not (tmp_path / "layouts").exists()


# -- owner shares --

def test_the_owner_holding_the_most_gives_way_whatever_its_uid():
    shares = Shares()
    for n in range(3):
        shares.touch(f"root-{n}", 0)
    shares.touch("user", 1000)
    assert shares.victim() == "root-0"


def test_a_key_taken_over_by_another_owner_leaves_the_first_owners_share():
    shares = Shares()
    shares.touch("a", 5)
    shares.touch("a", 1)
    shares.discard("a")
    shares.touch("b", 1)
    assert (shares.victim(), len(shares)) == ("b", 1)
