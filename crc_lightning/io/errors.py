"""Errors for bad input: every message names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A user-supplied file or folder cannot be used; the message says which and why."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class ManifestError(InputError):
    """A cohort manifest has one or more problems; all of them are listed at once."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(path, f"{len(problems)} problem(s) in the manifest:\n{lines}")
