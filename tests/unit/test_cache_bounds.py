"""The layout cache's bounds (resolve.cache), as behaviour: memory forgets the least
recently used, the disk the least recently written, within an entry count and a byte
count, and a cache opened on a directory over its bounds trims the oldest files first.
Real files; file names are the cache's own business, so a file is found by the key it
holds."""

import json
import os
from pathlib import Path

import pytest

from ctprofd.resolve import offsets_file
from ctprofd.resolve.cache import LayoutCache
from ctprofd.resolve.layout import TsdLayout


def layout(n: int) -> TsdLayout:
    return TsdLayout(f"{n:02x}" * 20, "je_tsd_tls", 0, 824, 840, static_block_offset=2632)


def key(n: int) -> str:
    """A file as the kernel names it (dev, inode, size, mtime): a user can make any number"""
    return f"file:64769:{1000 + n}:4096:{n * 10**9}"


def files(directory: Path) -> dict[str, Path]:
    """The cache files under `directory`, by the key each holds."""
    found = {}
    for path in directory.rglob("*.json"):
        try:
            found[json.loads(path.read_text())["key"]] = path
        except (ValueError, KeyError, TypeError):
            continue
    return found


def disk_bytes(directory: Path) -> int:
    """The bytes of the cache files under `directory`."""
    return sum(p.stat().st_size for p in files(directory).values())


def room_for_two(tmp_path: Path) -> tuple[LayoutCache, int]:
    """A cache on `tmp_path/cache` whose byte bound holds two files but not three (one
    measured in a probe directory first), and that bound."""
    probe = tmp_path / "probe"
    LayoutCache(str(probe)).put(key(1), layout(1))
    size = disk_bytes(probe)
    bound = 2 * size + size // 2
    return LayoutCache(str(tmp_path / "cache"), max_bytes=bound), bound


def present(directory: Path, *numbers: int) -> list[int]:
    """Which of `numbers` a fresh cache on `directory` finds."""
    fresh = LayoutCache(str(directory), writable=False)
    return [n for n in numbers if fresh.get(key(n)) == layout(n)]


def test_memory_forgets_the_least_recently_used_not_the_first_stored():
    cache = LayoutCache(None, max_entries=2)
    cache.put(key(1), layout(1))
    cache.put(key(2), layout(2))
    assert cache.get(key(1)) == layout(1)  # 1 used after 2 was stored
    cache.put(key(3), layout(3))
    assert len(cache) == 2
    assert [cache.get(key(n)) is not None for n in (1, 2, 3)] == [True, False, True]


def test_the_disk_forgets_the_least_recently_written(tmp_path):
    cache = LayoutCache(str(tmp_path), max_entries=2)
    cache.put(key(1), layout(1))
    cache.put(key(2), layout(2))
    assert cache.get(key(1)) == layout(1)  # a use is no write
    cache.put(key(3), layout(3))
    assert len(files(tmp_path)) == 2
    assert present(tmp_path, 1, 2, 3) == [2, 3]


def test_the_disk_holds_no_more_bytes_than_its_bound(tmp_path):
    cache, bound = room_for_two(tmp_path)
    directory = Path(cache.root)
    for n in (1, 2, 3, 4):
        cache.put(key(n), layout(n))
        assert disk_bytes(directory) <= bound
    assert present(directory, 1, 2, 3, 4) == [3, 4]
    both = disk_bytes(directory)
    LayoutCache(str(directory), max_bytes=both)  # opened with room for exactly these two
    assert present(directory, 3, 4) == [3, 4]
    LayoutCache(str(directory), max_bytes=both - 1)  # a byte short: the newest stays
    assert present(directory, 3, 4) == [4]


def test_a_directory_over_its_bounds_is_trimmed_oldest_written_first(tmp_path):
    writer = LayoutCache(str(tmp_path))
    for n in (1, 2, 3, 4):
        writer.put(key(n), layout(n))
    on_disk = files(tmp_path)
    # written 1, 2, 3, 4; aged so that the oldest are 3, then 1, then 4, then 2
    for age, n in enumerate((2, 4, 1, 3)):
        os.utime(on_disk[key(n)], ns=(10**18 - age * 10**12, 10**18 - age * 10**12))
    LayoutCache(str(tmp_path), max_entries=3)  # a daemon started with a smaller bound
    assert present(tmp_path, 1, 2, 3, 4) == [1, 2, 4]
    LayoutCache(str(tmp_path), max_entries=2)
    assert present(tmp_path, 1, 2, 4) == [2, 4]
    size = max(p.stat().st_size for p in files(tmp_path).values())
    LayoutCache(str(tmp_path), max_bytes=size)
    assert present(tmp_path, 2, 4) == [2]


def test_a_read_only_cache_trims_nothing(tmp_path):
    writer = LayoutCache(str(tmp_path))
    for n in (1, 2, 3):
        writer.put(key(n), layout(n))
    reader = LayoutCache(str(tmp_path), max_entries=1, writable=False)
    reader.put(key(4), layout(4))
    assert len(files(tmp_path)) == 3 and present(tmp_path, 1, 2, 3, 4) == [1, 2, 3]


def test_a_key_written_again_takes_its_room_once(tmp_path):
    cache, _ = room_for_two(tmp_path)
    for _ in range(5):
        cache.put(key(1), layout(1))
    cache.put(key(2), layout(2))
    assert present(Path(cache.root), 1, 2) == [1, 2]


def test_a_file_removed_between_listing_and_stat_is_passed_over(tmp_path, monkeypatch):
    writer = LayoutCache(str(tmp_path))
    for n in (1, 2):
        writer.put(key(n), layout(n))
    trimmed, scandir = files(tmp_path)[key(1)], os.scandir

    def racing(path):  # a daemon trims one file after the listing, before its stat
        entries = sorted(scandir(path), key=lambda e: e.path != str(trimmed))  # it first
        trimmed.unlink(missing_ok=True)
        return iter(entries)
    monkeypatch.setattr(os, "scandir", racing)
    reader = LayoutCache(str(tmp_path), writable=False)
    monkeypatch.undo()
    assert reader.directory is not None  # not degraded to memory only
    assert [n for n in (1, 2) if reader.get(key(n)) == layout(n)] == [2]


@pytest.mark.parametrize("look", ["offsets list", "offsets remove"])
def test_looking_through_the_learned_layouts_uses_none_of_them(tmp_path, look):
    def learned(n: int) -> str:
        return f"build-id:{layout(n).build_id}:uid:0"
    writer = LayoutCache(str(tmp_path), max_entries=3)
    for n in (1, 2, 3):
        writer.put(learned(n), layout(n), owner=1000)
    imported = str(tmp_path / "imported.json")
    offsets_file.dump([layout(7)], imported)
    cache = LayoutCache(str(tmp_path), max_entries=3)
    assert cache.get(learned(1)) == layout(1)  # the only one used
    if look == "offsets list":
        assert sorted(cache.learned()) == [(learned(n), 1000, layout(n)) for n in (1, 2, 3)]
    else:  # every learned layout is looked at for one of the import's build
        offsets_file.dump([], imported)
        assert cache.refresh()
    cache.put(key(4), layout(4), owner=1000)  # memory holds 3: the least used goes
    assert cache.holds_layout(learned(1))
