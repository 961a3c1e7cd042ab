"""One error type for everything the user can get wrong.

Every message names the file and, where there is one, the key, says what was expected, and
where possible what to do next: the nodes show it verbatim in ComfyUI's error dialog and the
command line prints it without a traceback.
"""

from __future__ import annotations

import os


class LoraxError(ValueError):
    """Bad input to LoRA-X: a file, key, shape or setting that cannot be used as given."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, key: str | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.key = key
        where = []
        if self.path is not None:
            where.append(f"file '{self.path}'")
        if key is not None:
            where.append(f"key '{key}'")
        self.detail = message
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
