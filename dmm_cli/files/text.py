"""Text files are UTF-8 whatever the locale: a Windows code page would garble, or refuse, a non-ASCII style name."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
