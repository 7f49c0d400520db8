"""resolve.offsets_file: a portable offsets file written and read back, and each refusal of
a file that cannot be used, with the one line that names the file and the entry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ctprofd.resolve import offsets_file
from ctprofd.resolve.layout import TsdLayout
from ctprofd.resolve.offsets_file import MAX_BYTES, OffsetsFileError

BUILD_ID = "ab" * 20


def layout(build_id: str = BUILD_ID) -> TsdLayout:
    return TsdLayout(build_id, "je_tsd_tls", 0, 824, 840, static_block_offset=2632)


def refused(tmp_path, content) -> str:
    path = tmp_path / "offsets.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(OffsetsFileError) as error:
        offsets_file.load(str(path))
    return str(error.value).replace(str(path), "PATH")


def test_layouts_with_a_build_id_are_written_sorted_readable_and_read_back(tmp_path):
    path = tmp_path / "offsets.json"
    second = layout("cd" * 20)
    assert offsets_file.dump([second, layout(), layout("")], str(path)) == 2
    text = path.read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2) + "\n"  # for people to read and diff
    assert (data["format"], data["version"]) == ("ctprofd-offsets", 1)
    assert list(data["layouts"]) == [BUILD_ID, "cd" * 20]
    assert offsets_file.load(str(path)) == [layout(), second]


def good() -> dict:
    return {"format": "ctprofd-offsets", "version": 1,
            "layouts": {BUILD_ID: layout().to_dict()}}


def test_each_unusable_file_is_one_line_naming_the_file_and_the_entry(tmp_path):
    assert refused(tmp_path, "{").startswith("PATH: not JSON: ")
    assert refused(tmp_path, [1]) == ("PATH: not a ctprofd offsets file "
                                      "(format != 'ctprofd-offsets')")
    assert refused(tmp_path, {"version": 1}) == ("PATH: not a ctprofd offsets file "
                                                 "(format != 'ctprofd-offsets')")
    assert refused(tmp_path, {**good(), "version": 2}) == "PATH: unsupported version 2"
    assert refused(tmp_path, {**good(), "layouts": []}) == (
        "PATH: layouts: expected a mapping of build-id to layout")
    assert refused(tmp_path, {**good(), "layouts": {"AB12": layout().to_dict()}}) == (
        "PATH: layouts.AB12: not a build-id")
    broken = {**layout().to_dict(), "tsd_offset": "x"}
    assert refused(tmp_path, {**good(), "layouts": {BUILD_ID: broken}}).startswith(
        f"PATH: layouts.{BUILD_ID}: invalid layout: ")
    other = {**good(), "layouts": {BUILD_ID: layout("cd" * 20).to_dict()}}
    assert refused(tmp_path, other) == (
        f"PATH: layouts.{BUILD_ID}: entry is not a layout for this build-id")
    not_layout = {"kind": "not-jemalloc"}
    assert refused(tmp_path, {**good(), "layouts": {BUILD_ID: not_layout}}) == (
        f"PATH: layouts.{BUILD_ID}: entry is not a layout for this build-id")


def test_a_missing_file_and_one_over_the_size_bound_are_one_line_each(tmp_path):
    with pytest.raises(OffsetsFileError) as error:
        offsets_file.load(str(tmp_path / "missing.json"))
    assert str(error.value) == f"{tmp_path / 'missing.json'}: No such file or directory"
    documented = re.search(r"offsets files \((\d+) MiB\)",
                           (Path(__file__).parents[2] / "docs" / "daemon.md").read_text())
    assert documented and MAX_BYTES == int(documented.group(1)) << 20
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(MAX_BYTES + 1)  # sparse: the size alone refuses it
    with pytest.raises(OffsetsFileError) as error:
        offsets_file.load(str(big))
    assert str(error.value) == f"{big}: too large ({MAX_BYTES + 1} bytes, limit {MAX_BYTES})"
