"""The state file that carries per-process totals across a ctprofd restart (probe.retained):
what it keeps, what it refuses to trust, and how it fails. A real directory; the boot id
read from a proc root of the test's making, as /proc/sys/kernel/random/boot_id is."""

import json
import logging
import os

import pytest

from ctprofd.probe.retained import RetainedStore, Saved, boot_id

# two processes that differ in every part: exited threads, live threads, last reported
SAVED = {
    (4242, 1001): Saved((7000, 3000), {(4242, 1001): (900, 400), (4250, 1100): (60, 5)},
                        (9100, 3800)),
    (5151, 2002): Saved((11, 0), {}, (0, 0)),
    (6161, 3003): Saved((0, 0), {(6170, 3010): (25, 1)}, (31, 2)),
    (7272, 4004): Saved((0, 0), {(7280, 4010): (8, 3)}, (0, 0)),
}


def proc_root(tmp_path, boot: str | None) -> str:
    root = tmp_path / f"proc-{boot}"
    (root / "sys/kernel/random").mkdir(parents=True, exist_ok=True)
    if boot is not None:
        (root / "sys/kernel/random/boot_id").write_text(boot + "\n")
    return str(root)


def store(tmp_path, boot: str | None = "boot-a") -> RetainedStore:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    return RetainedStore(str(state), proc_root(tmp_path, boot))


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "ctprofd.probe.retained" and r.levelno == logging.WARNING]


def test_what_was_saved_is_loaded_after_a_restart(tmp_path):
    store(tmp_path).save(SAVED)
    assert store(tmp_path).load() == SAVED
    # the exited threads' totals, each live thread's last read and the reported floor
    data = json.loads((tmp_path / "state" / "retained.json").read_text())
    assert data == {
        "boot_id": "boot-a",
        "processes": {"4242:1001": [7000, 3000], "5151:2002": [11, 0], "6161:3003": [0, 0],
                      "7272:4004": [0, 0]},
        "threads": {"4242:1001": {"4242:1001": [900, 400], "4250:1100": [60, 5]},
                    "6161:3003": {"6170:3010": [25, 1]}, "7272:4004": {"7280:4010": [8, 3]}},
        "reported": {"4242:1001": [9100, 3800], "6161:3003": [31, 2]}}


def test_the_boot_id_is_the_kernels(tmp_path):
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert boot_id() == f.read().strip() != ""
    assert RetainedStore(None).boot_id == boot_id()
    assert boot_id(proc_root(tmp_path, None)) == ""


def test_a_file_of_an_older_ctprofd_or_written_by_hand_loads(tmp_path):
    path = tmp_path / "state" / "retained.json"
    path.parent.mkdir()
    path.write_text('{"boot_id": "boot-a", "processes": {"1:2": [5, 4]}}')  # no threads
    assert store(tmp_path).load() == {(1, 2): Saved((5, 4), {})}
    # threads and a floor of processes the "processes" part does not name
    path.write_text(json.dumps({"boot_id": "boot-a", "processes": {},
                                "threads": {"1:2": {"3:4": [9, 1]}}, "reported": {"5:6": [7, 2]}}))
    assert store(tmp_path).load() == {(1, 2): Saved((0, 0), {(3, 4): (9, 1)}),
                                      (5, 6): Saved((0, 0), {}, (7, 2))}


def test_a_file_written_under_another_boot_is_not_trusted(tmp_path, caplog):
    store(tmp_path, "boot-a").save(SAVED)
    assert store(tmp_path, "boot-b").load() == {}
    assert store(tmp_path, None).load() == {}  # no boot id known: nothing matches
    assert warnings(caplog) == []  # not damaged: ignored quietly, and still there
    assert store(tmp_path, "boot-a").load() == SAVED


def test_entries_with_nothing_to_keep_are_left_out(tmp_path):
    saved = {**SAVED, (7171, 4004): Saved((0, 0), {(7171, 4004): (0, 0)}, (0, 0)),
             (4242, 1001): SAVED[(4242, 1001)]._replace(
                 threads={**SAVED[(4242, 1001)].threads, (4260, 1200): (0, 0)})}
    store(tmp_path).save(saved)
    assert store(tmp_path).load() == SAVED


def test_an_unchanged_state_is_not_written_again(tmp_path):
    first = store(tmp_path)
    first.save(SAVED)
    path = tmp_path / "state" / "retained.json"
    path.unlink()
    first.save(dict(SAVED))
    assert not path.exists()
    first.save({**SAVED, (5151, 2002): Saved((12, 0), {})})
    assert store(tmp_path).load()[(5151, 2002)] == Saved((12, 0), {})
    loaded = store(tmp_path)
    state = loaded.load()
    path.unlink()
    loaded.save(state)  # what was loaded is what is on disk: nothing to write
    assert not path.exists()


MALFORMED = {
    "torn": '{"boot_id": "boot-a", "proc',
    "not an object": '["boot-a"]',
    "no processes": '{"boot_id": "boot-a"}',
    "a key without a start time": '{"boot_id": "boot-a", "processes": {"4242": [1, 2]}}',
    "three totals": '{"boot_id": "boot-a", "processes": {"4242:1": [1, 2, 3]}}',
    "a total not a number": '{"boot_id": "boot-a", "processes": {"4242:1": ["x", 2]}}',
    "threads not a mapping": '{"boot_id": "boot-a", "processes": {}, "threads": {"1:2": 5}}',
    "reported a number": '{"boot_id": "boot-a", "processes": {}, "reported": {"1:2": 5}}',
    "not UTF-8": b'{"boot_id": "\xff"}',
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_file_is_set_aside_with_one_warning(tmp_path, caplog, kind):
    path = tmp_path / "state" / "retained.json"
    path.parent.mkdir()
    content = MALFORMED[kind]
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    loading = store(tmp_path)
    assert loading.load() == {}
    assert not path.exists()
    assert (path.parent / "retained.json.corrupt").read_bytes() == path_bytes(content)
    [warning] = warnings(caplog)
    assert warning.startswith(f"setting aside unusable state file {path} (")
    assert "None" not in warning and len(warning) > len(f"setting aside unusable state file {path} ()")
    assert store(tmp_path).load() == {}  # set aside: not warned about again
    assert len(warnings(caplog)) == 1
    loading.save(SAVED)  # the next state is written where the bad one was
    assert store(tmp_path).load() == SAVED


def path_bytes(content) -> bytes:
    return content if isinstance(content, bytes) else content.encode()


def test_a_directory_that_cannot_be_used_degrades_to_memory_with_one_warning(tmp_path, caplog):
    blocked = tmp_path / "state"
    blocked.mkdir()
    (blocked / "retained.json").mkdir()  # cannot be opened as a file, nor replaced by one
    state = RetainedStore(str(blocked), proc_root(tmp_path, "boot-a"))
    assert state.load() == {}
    assert state.path is None
    state.save(SAVED)
    assert warnings(caplog) == [f"cannot read {blocked / 'retained.json'} (Is a directory); "
                                "exited-thread totals will not survive a restart"]
    assert os.listdir(blocked / "retained.json") == []


def test_a_failed_write_is_counted_warned_once_and_tried_again(tmp_path, caplog):
    state = store(tmp_path)
    (tmp_path / "state").rename(tmp_path / "gone")  # the directory vanished
    state.save(SAVED)
    state.save(SAVED)  # not taken for written: tried again
    assert state.write_failures == 2
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (f"cannot write {tmp_path / 'state' / 'retained.json'} (No such file or "
                       "directory); tried again at each snapshot: until then, a restart loses "
                       "the totals of threads that exited since the last write")
    (tmp_path / "gone").rename(tmp_path / "state")
    state.save(SAVED)
    assert state.write_failures == 2 and store(tmp_path).load() == SAVED


def test_without_a_state_directory_nothing_is_read_or_written(tmp_path):
    state = RetainedStore(None, proc_root(tmp_path, "boot-a"))
    state.save(SAVED)
    assert state.load() == {}
