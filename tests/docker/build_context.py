"""The Docker build context as `docker build` would send it: the tree filtered by .dockerignore.

Follows the rules of moby's patternmatcher (what the Docker CLI and BuildKit use):

- one pattern per line; blank lines and lines starting with ``#`` are skipped; surrounding
  whitespace is trimmed; a leading ``!`` makes an exception (re-include);
- patterns are cleaned like ``filepath.Clean`` (``./a//b/`` -> ``a/b``, leading ``/`` dropped) and
  match the whole path relative to the context root: ``*`` and ``?`` never cross ``/``,
  ``[...]`` is a character class, ``**`` matches any number of directories, ``\\`` escapes;
- a pattern that matches a directory matches everything under it, and the LAST pattern that
  matches a path or one of its parents decides (so ``*`` then ``!models/default`` keeps exactly
  that folder).

Limits: character classes are handed to Python's ``re`` as written (``[^...]``/``[!...]``
negation and ranges behave the same for the patterns used here, exotic classes may not); files
are listed with ``os.walk`` without following symlinked directories, and symlinks are copied as
links; Docker's rule that the Dockerfile and .dockerignore are always sent is ignored (the images
never COPY them).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class IgnorePattern:
    """One .dockerignore line: the cleaned pattern, its regex, and whether it re-includes."""

    text: str
    regex: re.Pattern[str]
    exception: bool

    def matches(self, relpath: str) -> bool:
        """True when the pattern matches `relpath` (posix, relative) or one of its parents."""
        parts = relpath.split("/")
        return any(self.regex.match("/".join(parts[:n])) for n in range(len(parts), 0, -1))

    def could_match_below(self, dir_relpath: str) -> bool:
        """Whether some path strictly inside the directory might match (conservative: True
        whenever unsure), so an excluded directory is only skipped when nothing in it can be
        re-included."""
        if "**" in self.text:
            return True
        dir_parts = dir_relpath.split("/")
        parts = self.text.split("/")
        if len(parts) <= len(dir_parts):
            return False
        return all(
            _pattern_regex(part).match(name) for part, name in zip(parts, dir_parts, strict=False)
        )


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ["^"]
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            if pattern.startswith("**", i):
                i += 1
                if pattern.startswith("/", i + 1):  # "**/" : zero or more leading directories
                    out.append("(.*/)?")
                    i += 1
                else:
                    out.append(".*")
            else:
                out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise ValueError(f".dockerignore pattern {pattern!r}: '[' at {i} is never closed")
            body = pattern[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(char))
        i += 1
    out.append("$")
    return re.compile("".join(out))


def parse_dockerignore(text: str) -> list[IgnorePattern]:
    """The patterns of a .dockerignore file, in order."""
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        cleaned = posixpath.normpath(line).lstrip("/")
        if cleaned in ("", "."):
            continue
        patterns.append(IgnorePattern(cleaned, _pattern_regex(cleaned), exception))
    return patterns


def is_excluded(relpath: str, patterns: list[IgnorePattern]) -> bool:
    """Whether `relpath` (posix, relative to the context root) is left out of the context."""
    excluded = False
    for pattern in patterns:
        if pattern.matches(relpath):
            excluded = not pattern.exception
    return excluded


def context_files(root: Path) -> list[str]:
    """Relative posix paths of the files `docker build root` sends, per root/.dockerignore."""
    ignore_file = root / ".dockerignore"
    patterns = parse_dockerignore(ignore_file.read_text()) if ignore_file.exists() else []
    exceptions = [pattern for pattern in patterns if pattern.exception]

    def worth_visiting(rel_dir: str) -> bool:
        # An excluded directory (.git, .venv, ...) is skipped unless an exception reaches inside.
        return not is_excluded(rel_dir, patterns) or any(
            pattern.could_match_below(rel_dir) for pattern in exceptions
        )

    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else f"{rel_dir}/"
        dirnames[:] = sorted(name for name in dirnames if worth_visiting(prefix + name))
        for name in sorted(filenames):
            relpath = prefix + name
            if not is_excluded(relpath, patterns):
                files.append(relpath)
    return sorted(files)


def copy_context(root: Path, dest: Path) -> list[str]:
    """Copy the filtered build context of `root` into `dest`; returns the copied paths."""
    files = context_files(root)
    for relpath in files:
        target = dest / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relpath, target, follow_symlinks=False)
    return sorted(files)
