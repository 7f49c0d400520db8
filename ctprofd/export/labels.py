"""The label dimensions a series can have, and label values as the registry must see them.

`LABELS` names each dimension (the `labels` configuration key chooses among them) and how a
process's value is read: a new dimension is one entry there.

Names from /proc and the file system are bytes under a target's control. Python decodes
them with surrogateescape (os.readlink, pwd) or may be handed lone surrogates (a JSON state
file), and prometheus_client fails the whole scrape on a string that cannot be encoded. Every
label value passes through `label_value` before it reaches a series key: undecodable bytes
and surrogates become U+FFFD; newlines, quotes and backslashes stay and are escaped by the
exposition format.
"""

from __future__ import annotations

import pwd
from functools import lru_cache
from typing import Callable

from ..report.snapshot import ProcessSample

UserOf = Callable[[int], str]


@lru_cache(maxsize=4096)
def username(uid: int) -> str:
    """The user name of a uid, or the number when it has none here."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


# name -> value of a process: `comm` is the name its series keeps (when first seen, or at its
# last exec: aggregate), `user_of` turns a uid into a user name
LABELS: dict[str, Callable[[ProcessSample, str, UserOf], str]] = {
    "pid": lambda process, comm, user_of: str(process.pid),
    "comm": lambda process, comm, user_of: comm,
    "unit": lambda process, comm, user_of: process.unit,
    "exe": lambda process, comm, user_of: process.exe,
    "user": lambda process, comm, user_of: user_of(process.uid),
    # the container (its 64-hex id) and Kubernetes pod (its UID) named by the cgroup path,
    # to join kube_pod_container_info / kube_pod_info as cAdvisor's series are
    "container_id": lambda process, comm, user_of: process.container_id,
    "pod_uid": lambda process, comm, user_of: process.pod_uid,
}
LABEL_NAMES = tuple(LABELS)


def label_values(names: tuple[str, ...], process: ProcessSample, comm: str,
                 user_of: UserOf = username) -> tuple[str, ...]:
    """The values of the labels `names` for `process`, each valid UTF-8 (`label_value`)."""
    return tuple(label_value(LABELS[name](process, comm, user_of)) for name in names)


def label_value(value: str) -> str:
    """`value` as valid UTF-8 text: bytes smuggled in as surrogates (surrogateescape) and
    any other lone surrogate are replaced by U+FFFD."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        raw = value.encode("utf-8", "surrogateescape")  # back to the original bytes
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogatepass")  # a surrogate not from a byte
    return raw.decode("utf-8", "replace")
