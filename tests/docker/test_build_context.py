"""The .dockerignore filter (Docker's matching rules) and the context it gives this repository."""

from __future__ import annotations

from pathlib import Path

import pytest
from build_context import context_files, copy_context, is_excluded, parse_dockerignore

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path, files: list[str], dockerignore: str) -> Path:
    for relpath in files:
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_text(relpath)
    (root / ".dockerignore").write_text(dockerignore)
    return root


@pytest.mark.parametrize(
    ("pattern", "path", "excluded"),
    [
        ("*.py", "a.py", True),
        ("*.py", "pkg/a.py", False),  # `*` never crosses "/"
        ("**/*.py", "pkg/sub/a.py", True),
        ("**/*.py", "a.py", True),  # "**/" also matches no directory at all
        ("pkg", "pkg/sub/a.py", True),  # a directory match covers everything under it
        ("/pkg/", "pkg/a.py", True),  # leading "/" and trailing "/" are cleaned away
        ("./pkg//sub", "pkg/sub/a.py", True),
        ("pkg/*/a.py", "pkg/sub/a.py", True),
        ("pkg/*/a.py", "pkg/x/y/a.py", False),
        ("file?.txt", "file1.txt", True),
        ("file?.txt", "file10.txt", False),
        ("file[0-3].txt", "file2.txt", True),
        ("file[!0-3].txt", "file2.txt", False),
        ("weird\\*name", "weird*name", True),
        ("weird\\*name", "weirdXname", False),
        ("a.b", "aXb", False),  # "." is literal, not a regex wildcard
    ],
)
def test_pattern_matching_follows_docker(pattern: str, path: str, excluded: bool) -> None:
    assert is_excluded(path, parse_dockerignore(pattern)) is excluded


def test_last_matching_pattern_wins_and_exceptions_reach_into_excluded_dirs(
    tmp_path: Path,
) -> None:
    root = _tree(
        tmp_path,
        [
            "pyproject.toml",
            "models/default/model.json",
            "models/default/cache.npy",
            "models/other/model.json",
            "pkg/a.py",
            "pkg/__pycache__/a.cpython-311.pyc",
            ".venv/bin/python",
            "notes.txt",
        ],
        "# comment\n\n*\n!pyproject.toml\n!models/default\n!pkg\n**/__pycache__\n**/*.npy\n",
    )
    assert context_files(root) == ["models/default/model.json", "pkg/a.py", "pyproject.toml"]


def test_copy_context_copies_exactly_the_kept_files(tmp_path: Path) -> None:
    root = _tree(tmp_path / "src", ["keep/a.txt", "drop/b.txt"], "drop\n")
    copied = copy_context(root, tmp_path / "dest")
    assert sorted(copied) == [".dockerignore", "keep/a.txt"]
    assert (tmp_path / "dest" / "keep" / "a.txt").read_text() == "keep/a.txt"
    assert not (tmp_path / "dest" / "drop").exists()


def test_unclosed_character_class_names_the_pattern() -> None:
    with pytest.raises(ValueError, match=r"file\[0-3"):
        parse_dockerignore("file[0-3")


def test_repository_context_is_the_package_and_the_default_model_only() -> None:
    files = context_files(REPO)
    tops = {path.split("/")[0] for path in files}
    assert tops <= {"pyproject.toml", "README.md", "vqmodel", "training", "service", "models"}
    for needed in ("pyproject.toml", "README.md", "service/__init__.py", "vqmodel/__init__.py"):
        assert needed in files
    assert not [path for path in files if "__pycache__" in path or path.endswith(".npy")]
    assert not [p for p in files if p.startswith("models/") and not p.startswith("models/default/")]
    if (REPO / "models" / "default" / "model.json").is_file():
        assert "models/default/model.json" in files
