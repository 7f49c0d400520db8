"""Label values as the registry must see them: valid UTF-8 text.

Names from /proc and the file system are bytes under a target's control. Python decodes
them with surrogateescape (os.readlink, pwd) or may be handed lone surrogates (a JSON state
file), and prometheus_client fails the whole scrape on a string that cannot be encoded. Every
label value passes through `label_value` before it reaches a series key: undecodable bytes
and surrogates become U+FFFD; newlines, quotes and backslashes stay and are escaped by the
exposition format.
"""

from __future__ import annotations


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
