"""Writing a file so that readers see the old or the new content, never a part."""

from __future__ import annotations

import json
import os
import tempfile


def write_json(path: str, data: object, indent: int | None = None) -> None:
    """Serialize `data` to a temporary file beside `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
