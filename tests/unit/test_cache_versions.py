"""A layout cached by an older ctprofd (format 1: no arena statistics) is parsed again and
overwritten, quietly; a file of an unknown format is still set aside."""

import json

from ctprofd.resolve.cache import FORMAT_VERSION, LayoutCache
from ctprofd.resolve.layout import TsdLayout

LAYOUT = TsdLayout("ab" * 20, "je_tsd_tls", 0, 824, 840, static_block_offset=2632)


def test_an_older_format_is_a_miss_then_rewritten(tmp_path, caplog):
    cache = LayoutCache(str(tmp_path))
    cache.put("build-id:" + "ab" * 20, LAYOUT)
    [path] = (tmp_path / "layouts").iterdir()
    data = json.loads(path.read_text())
    data["version"] = 1
    path.write_text(json.dumps(data))
    fresh = LayoutCache(str(tmp_path))
    assert fresh.get("build-id:" + "ab" * 20) is None
    assert "setting aside" not in caplog.text and path.exists()
    fresh.put("build-id:" + "ab" * 20, LAYOUT)
    assert json.loads(path.read_text())["version"] == FORMAT_VERSION
    assert LayoutCache(str(tmp_path)).get("build-id:" + "ab" * 20) == LAYOUT


def test_an_unknown_format_is_set_aside(tmp_path, caplog):
    cache = LayoutCache(str(tmp_path))
    cache.put("build-id:" + "ab" * 20, LAYOUT)
    [path] = (tmp_path / "layouts").iterdir()
    data = json.loads(path.read_text())
    data["version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(data))
    assert LayoutCache(str(tmp_path)).get("build-id:" + "ab" * 20) is None
    assert "setting aside" in caplog.text
