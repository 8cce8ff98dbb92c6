"""The README and docs/ cannot drift from the CLI: every flag a command has is documented, and
every flag a documented `clipship` command line names exists."""

import re
from pathlib import Path

import typer

from clipship.cli import app

ROOT = Path(__file__).resolve().parents[1]


def cli_flags() -> dict[str, list[str]]:
    """Every long option of every command (and of `clipship` itself) → the commands taking it."""
    flags: dict[str, list[str]] = {}

    def walk(command, path: list[str]) -> None:
        for param in command.params:
            for option in getattr(param, "opts", []):
                if option.startswith("--"):
                    flags.setdefault(option, []).append(" ".join(path) or "clipship")
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return flags


def docs_text() -> str:
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))])


def test_every_flag_is_documented():
    text = docs_text()
    undocumented = {f: c for f, c in cli_flags().items() if f not in text}
    assert not undocumented, f"flags no doc names: {undocumented}"


def test_every_flag_the_docs_give_clipship_exists():
    flags = cli_flags()
    named = set()
    for line in docs_text().splitlines():
        for command in re.finditer(r"clipship\b[^`\n]*", line):
            named |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command.group(0)))
    absent = sorted(n for n in named if n not in flags and n != "--help")  # click's, on each
    assert not absent, f"flags the docs give `clipship` that no command has: {absent}"


def test_every_relative_link_resolves():
    """Links between the README, docs/ and the repository's files point at something."""
    broken = []
    for page in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
