"""The manual cannot drift from the code.

Every ``upstream-compressed SUBCOMMAND`` written in README.md and docs/*.md (fenced code blocks and
inline code) names a real subcommand, and every ``-x``/``--flag`` after it is one that subcommand's
parser accepts (also a long flag listed alone in prose after such a command); the same for
``./run_downstream.sh`` against its ``--help``. Every relative link and
image points at an existing file (and heading, for ``#anchor`` links). The README stays a front door.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from upstream_compressed.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC_PAGES = sorted((REPO / "docs").glob("*.md"))
DOCUMENTS = [README, *DOC_PAGES]
README_MAX_LINES = 160

CLI_NAMES = {"upstream-compressed", "upstream_compressed.cli"}  # the console script, `python -m ...`
SHELL_JOB = {"./run_downstream.sh", "run_downstream.sh"}
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"^[\[(]*(--?[A-Za-z][\w-]*)")
COMMAND_END = re.compile(r"\s#|\s\|\s|&&|\|\||;")  # a comment or the next command of a shell line


@dataclass
class Command:
    """One parser of the CLI: its flags and its nested subcommands (``analyse heads``)."""

    flags: set[str]
    children: dict[str, Command] = field(default_factory=dict)


def command_tree(parser: argparse.ArgumentParser) -> Command:
    """The parser the CLI runs, walked into flags and subcommands."""
    node = Command(flags=set())
    for action in parser._actions:
        node.flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            node.children.update({name: command_tree(sub) for name, sub in action.choices.items()})
    return node


@dataclass(frozen=True)
class Snippet:
    """A piece of shell written in a document, with where it was written."""

    where: str
    text: str
    paragraph: int | None = None  # inline code: the prose paragraph it is in (None in a code block)


def snippets(path: Path) -> list[Snippet]:
    """The snippets of one page of the manual."""
    return snippets_of(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))


def snippets_of(text: str, name: str) -> list[Snippet]:
    """Every shell line of the fenced blocks (continuations joined), then every inline code span in order.

    Inline code is read per paragraph with its line breaks joined, so a span wrapped over two lines counts.
    """
    found = []
    for block in FENCE.finditer(text):
        first_line = text.count("\n", 0, block.start()) + 1
        lines = block.group(0).replace("\\\n", " ").split("\n")
        found += [Snippet(f"{name}:{first_line}", line) for line in lines[1:-1]]
    prose = FENCE.sub(lambda block: "\n" * block.group(0).count("\n"), text)
    line = 1
    for number, paragraph in enumerate(re.split(r"(\n[ \t]*\n)", prose)):
        if number % 2 == 0:  # even pieces are paragraphs, odd ones the blank lines between them
            found += [Snippet(f"{name}:{line}", code, paragraph=number)
                      for code in INLINE_CODE.findall(paragraph.replace("\n", " "))]
        line += paragraph.count("\n")
    return found


def words(shell: str) -> list[str]:
    """A shell line split as the shell would (falling back to spaces for placeholders like `it's`)."""
    try:
        return shlex.split(shell)
    except ValueError:
        return shell.split()


def invocations(snippet: Snippet, programs: set[str]) -> list[list[str]]:
    """The arguments after each mention of one of ``programs``, up to a comment or the next command."""
    calls = []
    for piece in COMMAND_END.split(snippet.text):
        tokens = words(piece)
        calls += [tokens[i + 1:] for i, token in enumerate(tokens) if token in programs]
    return calls


def flag_of(token: str) -> str | None:
    """``--device``, from ``--device``, ``[--device``, ``--device=cuda`` or ``(-k``; None for other words."""
    match = FLAG.match(token)
    return match.group(1) if match else None


def walk(arguments: list[str], root: Command) -> tuple[Command, list[str], list[str]]:
    """Follow one written ``upstream-compressed ...`` call down the parser: (last command, its path, problems)."""
    node, path = root, ["upstream-compressed"]
    for token in arguments:
        flag = flag_of(token)
        if flag is not None:
            if flag not in node.flags:
                return node, path, [f"`{' '.join(path)}` has no {flag} (it takes {', '.join(sorted(node.flags))})"]
        elif node.children:
            if token not in node.children:
                return node, path, [f"`{' '.join(path)} {token}`: no such subcommand "
                                    f"(there are {', '.join(sorted(node.children))})"]
            node, path = node.children[token], [*path, token]
    return node, path, []


def run_downstream_sh_flags() -> set[str]:
    """The options ``./run_downstream.sh --help`` lists."""
    help_text = subprocess.run(["bash", str(REPO / "run_downstream.sh"), "--help"], capture_output=True,
                               text=True, timeout=60, cwd=REPO).stdout
    return set(re.findall(r"^\s+(--[\w-]+)", help_text, re.M)) | {"--help", "-h"}


def script_problems(arguments: list[str], flags: set[str]) -> list[str]:
    """What is wrong with one written ``./run_downstream.sh ...`` call."""
    unknown = [flag for flag in map(flag_of, arguments) if flag is not None and flag not in flags]
    return [f"`./run_downstream.sh` has no {flag} (see ./run_downstream.sh --help)" for flag in unknown]


OTHER_PROGRAMS = {"run_downstream.py", "python", "torchrun", "pytest", "pip", "bash"}


def loose_flag_problems(found: list[Snippet], root: Command, script_flags: set[str]) -> list[str]:
    """Flags written alone in inline code (`--jobs N`), checked against the command named before them.

    Prose lists options as ``upstream-compressed experiment --corpus DIR`` followed by `--tasks pr,sid`,
    `--jobs N`, ...: such a flag belongs to the last CLI or ``./run_downstream.sh`` call written earlier in
    the same paragraph. Mentioning another program (``run_downstream.py``) ends that context. Only long
    flags are read this way: a short one alone in prose (`-u`, `-k`, `-m`) is S3PRL's runner's, nearly always.
    """
    problems: list[str] = []
    flags: set[str] | None = None  # those of the command named last in this paragraph
    paragraph = None
    for snippet in (s for s in found if s.paragraph is not None):
        if snippet.paragraph != paragraph:
            flags, paragraph = None, snippet.paragraph
        tokens = words(snippet.text)
        if tokens and tokens[0].lstrip("[(").startswith("--"):
            unknown = [] if flags is None else [f for f in map(flag_of, tokens) if f is not None and f not in flags]
            problems += [f"{snippet.where}: `{snippet.text}` follows a command that has no {f}" for f in unknown]
        elif any(token in OTHER_PROGRAMS for token in tokens):
            flags = None
        elif calls := invocations(snippet, CLI_NAMES):
            flags = walk(calls[-1], root)[0].flags
        elif invocations(snippet, SHELL_JOB):
            flags = script_flags
    return problems


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces to dashes)."""
    anchors: set[str] = set()
    prose = FENCE.sub("", path.read_text(encoding="utf-8"))
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*$", prose, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def link_problems(path: Path) -> list[str]:
    """Relative links and images of one page that point at no file (or no heading)."""
    problems = []
    prose = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    for target in LINK.findall(prose):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{path.relative_to(REPO)}: link {target}: {file_part} does not exist")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            problems.append(f"{path.relative_to(REPO)}: link {target}: no heading #{anchor} in {file_part or path.name}")
    return problems


def written_calls(programs: set[str]) -> list[tuple[str, list[str]]]:
    """Every call of ``programs`` written anywhere in the manual, with where."""
    return [(snippet.where, call) for document in DOCUMENTS for snippet in snippets(document)
            for call in invocations(snippet, programs)]


def test_the_manual_has_pages_and_commands() -> None:
    """The checks below see something: the README, several pages, and many CLI calls."""
    assert README.is_file() and len(DOC_PAGES) >= 5
    assert len(written_calls(CLI_NAMES)) >= 20


def test_every_cli_subcommand_and_flag_written_exists() -> None:
    root = command_tree(build_parser())
    problems = [f"{where}: {problem}" for where, call in written_calls(CLI_NAMES)
                for problem in walk(call, root)[2]]
    assert not problems, "the manual names what the CLI does not have:\n" + "\n".join(problems)


def test_every_run_downstream_sh_flag_written_exists() -> None:
    flags = run_downstream_sh_flags()
    assert "--plan" in flags  # the help was read
    problems = [f"{where}: {problem}" for where, call in written_calls(SHELL_JOB)
                for problem in script_problems(call, flags)]
    assert not problems, "\n".join(problems)


def test_every_flag_listed_after_a_command_in_prose_exists() -> None:
    root, script_flags = command_tree(build_parser()), run_downstream_sh_flags()
    problems = [problem for document in DOCUMENTS
                for problem in loose_flag_problems(snippets(document), root, script_flags)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_at_a_file(page: Path) -> None:
    problems = link_problems(page)
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_front_door_to_every_page() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in LINK.findall(text)}
    unlinked = [str(page.relative_to(REPO)) for page in DOC_PAGES if page.resolve() not in linked]
    assert not unlinked, f"README.md links no {', '.join(unlinked)}"


def test_the_checker_catches_a_bogus_flag_a_bogus_subcommand_and_a_nested_one() -> None:
    """The parsing itself: written calls with mistakes are reported, correct ones are not."""
    root = command_tree(build_parser())

    def check(line: str) -> list[str]:
        return [problem for call in invocations(Snippet("x", line), CLI_NAMES) for problem in walk(call, root)[2]]

    assert check("upstream-compressed compress r.yaml -o d.safetensors --keep-work") == []
    assert check("upstream-compressed profile -u NAME [-k CKPT] [--device cpu|cuda]  # --bogus in a comment") == []
    assert check("python -m upstream_compressed.cli analyse heads --audio DIR --diagonal-band=3") == []
    assert check("upstream-compressed compress r.yaml --bogus-flag")
    assert check("upstream-compressed compres r.yaml")
    assert check("upstream-compressed analyse head --audio DIR")
    assert check("upstream-compressed analyse heads --seconds 3")  # a flag of another subcommand
    assert check("cd x && upstream-compressed inspect d.safetensors --jsn")


def test_the_checker_reads_flags_listed_in_prose_and_wrapped_inline_code() -> None:
    root = command_tree(build_parser())
    page = ("Use `upstream-compressed\nexperiment --corpus DIR` with `--jobs N` or `--jobz N`.\n\n"
            "A new paragraph: `--jobz` alone, and `run_downstream.py -m train` then `--anything`.\n")
    found = snippets_of(page, "page.md")
    assert ["experiment", "--corpus", "DIR"] in [call for s in found for call in invocations(s, CLI_NAMES)]
    problems = loose_flag_problems(found, root, script_flags=set())
    assert len(problems) == 1 and "--jobz" in problems[0] and problems[0].startswith("page.md:1")
