"""How the training CLIs (vqtok-train, -eval, -ablation, -export) end on a user error: a missing or
unreadable file, a bad config or flag, a data package that is not installed. One line on stderr,
``<prog>: <what to fix>``, and exit status 2; never a traceback.
"""

from __future__ import annotations

import sys

USER_ERROR = 2


def user_error(prog: str, error: BaseException | str) -> int:
    """Print ``error`` as one line (a multi-line message's lines joined by "; ", or by a space
    after a line that ends in a colon) and return 2."""
    text = ""
    for line in filter(None, (line.strip() for line in str(error).splitlines())):
        text += ("" if not text else " " if text.endswith(":") else "; ") + line
    print(f"{prog}: {text}", file=sys.stderr, flush=True)
    return USER_ERROR
