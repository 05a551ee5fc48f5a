"""The README and docs/ against the code: the flags docs/cli.md documents are the commands' flags, the README's
Quick start is what .ci/run runs, and every relative link lands on a file and heading that exist."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from moe_offload.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def commands() -> dict[str, set[str]]:
    """Every command and subcommand ("bench plot") -> its long flags, as `moe-offload COMMAND --help` lists them."""
    def subparsers(parser):
        return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})

    def flags(parser):
        return {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help"}

    found = {}
    for name, parser in subparsers(build_parser()).items():
        found[name] = flags(parser)
        found.update({f"{name} {sub}": flags(p) for sub, p in subparsers(parser).items()})
    return found


def cli_sections() -> list[tuple[str, list[str], set[str]]]:
    """docs/cli.md's `## ` sections: (heading, the commands its heading names in backticks, the flags in it)."""
    known = commands()
    sections = re.split(r"^## ", (REPO / "docs" / "cli.md").read_text(), flags=re.M)
    return [(text.splitlines()[0], [c for c in re.findall(r"`([^`]+)`", text.splitlines()[0]) if c in known],
             set(FLAG.findall(text)) - {"--help"}) for text in sections[1:]]


def test_every_flag_in_docs_cli_is_a_flag_of_the_commands_its_section_names():
    known = commands()
    for heading, named, flags in cli_sections():
        assert named or not flags, f"docs/cli.md, section {heading!r}: flags, but no command named in the heading"
        for command in named:
            assert flags <= known[command], f"docs/cli.md, section {heading!r}: `{command}` has no {flags - known[command]}"


def test_every_flag_of_every_command_is_in_docs_cli():
    documented = {}
    for _, named, flags in cli_sections():
        for command in named:
            documented.setdefault(command, set()).update(flags)
    for command, flags in commands().items():
        assert flags <= documented.get(command, set()), f"docs/cli.md does not document `{command}` {flags - documented.get(command, set())}"


def test_the_readme_quick_start_has_the_two_commands_ci_runs():
    """.ci/run's own reader of the Quick start, run on the README as it is."""
    ci = (REPO / ".ci" / "run").read_text()
    reader = ci[ci.index("quick_start_commands() {"):ci.index("\n}\n", ci.index("quick_start_commands() {")) + 3]
    out = subprocess.run(["bash", "-c", reader + "quick_start_commands"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    commands = out.splitlines()
    assert len(commands) == 2, commands
    assert "pip install -e ." in commands[0] and "moe-offload generate" in commands[0]
    assert '".[test]"' in commands[1] and "pytest" in commands[1]


def test_the_readme_stays_short():
    assert (REPO / "README.md").stat().st_size < 15_000     # issue 33: the rest goes to docs/


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md")))])
def test_relative_links_land_on_a_file_and_heading(page):
    text = (REPO / page).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, fragment = target.partition("#")
        file = (REPO / page).parent / path if path else REPO / page
        assert file.exists(), f"{page}: link to {target}: no such file"
        if fragment and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            assert fragment in {anchor(h) for h in headings}, f"{page}: link to {target}: no such heading"
