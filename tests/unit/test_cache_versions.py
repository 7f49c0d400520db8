"""A cache written by an older ctprofd (before format 6: positive and negative results in one
directory, files not named with their owner) is removed with one warning, and its binaries
are parsed again; a file of an unknown format is set aside. Never a traceback."""

import json
import logging

from ctprofd.resolve.cache import FORMAT_VERSION, LayoutCache
from ctprofd.resolve.layout import NotJemalloc, TsdLayout

LAYOUT = TsdLayout("ab" * 20, "je_tsd_tls", 0, 824, 840, static_block_offset=2632)
KEY = "build-id:" + "ab" * 20 + ":uid:0"


def test_an_older_format_is_removed_with_one_warning_then_rewritten(tmp_path, caplog):
    layouts = tmp_path / "layouts"
    layouts.mkdir()
    for n in range(3):  # format 4's names: <key>.json, failures and layouts together
        (layouts / f"file_1_{n}_3_4.json").write_text(json.dumps(
            {"version": 4, "key": f"file:1:{n}:3:4", "stored_at": 1.0,
             "result": NotJemalloc().to_dict()}))
    with caplog.at_level(logging.WARNING, logger="ctprofd.resolve.cache"):
        cache = LayoutCache(str(tmp_path))
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"removed 3 cache files of an older ctprofd from {tmp_path}")
    assert list(layouts.iterdir()) == []
    assert cache.get("file:1:0:3:4") is None
    cache.put(KEY, LAYOUT, owner=0)
    [path] = layouts.iterdir()
    assert path.name == "build-id_" + "ab" * 20 + "_uid_0.u0.json"
    assert json.loads(path.read_text())["version"] == FORMAT_VERSION
    assert LayoutCache(str(tmp_path)).get(KEY) == LAYOUT


def test_an_unknown_format_is_set_aside(tmp_path, caplog):
    cache = LayoutCache(str(tmp_path))
    cache.put(KEY, LAYOUT)
    [path] = (tmp_path / "layouts").iterdir()
    data = json.loads(path.read_text())
    data["version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(data))
    assert LayoutCache(str(tmp_path)).get(KEY) is None
    assert "setting aside" in caplog.text
    assert (tmp_path / "layouts" / (path.name + ".corrupt")).exists()
