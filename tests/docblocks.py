"""Shell blocks of the Markdown docs, as tests/test_docs_run.py runs them.

A block is a fence tagged ``sh``/``shell``/``bash``/``console``, or an untagged one whose
lines start with ``$ `` (a transcript: its ``$ `` lines are the commands, the others the
output shown; the output is not compared, the exit status is: 0, or N where the command
line ends with a ``# exit N`` comment). Untagged fences without ``$ `` (a synopsis, an
output sample) and other languages are not shell.

Marks, as HTML comments (invisible when the page is rendered):
- ``<!-- doc-test: skip: REASON -->`` on the line before a fence skips that block, for
  the reason given (root, Xen, a guest);
- ``<!-- doc-test: setup ... -->`` (several lines) is run before each block of the page,
  in its fresh folder: the files that the examples name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
SHELL_LANGS = {"sh", "shell", "bash", "console"}
EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None = None

    @property
    def transcript(self) -> bool:
        return any(ln.startswith("$ ") for ln in self.text.splitlines())

    def script(self) -> str:
        """The bash to run: the block itself, or a transcript's commands, each checked
        for its exit status."""
        if not self.transcript:
            return self.text
        out = []
        for ln in self.text.splitlines():
            if not ln.startswith("$ "):
                continue
            cmd = ln[2:]
            m = EXIT.search(cmd)
            want = int(m.group(1)) if m else 0
            out.append(f"rc=0; ( {cmd}\n) >/dev/null || rc=$?; if [ $rc -ne {want} ]; then echo "
                       f"'doc-test: exit '$rc' (expected {want}) from: '{_quote(cmd)} >&2; "
                       f"exit 1; fi")
        return "\n".join(out) + "\n"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def blocks(markdown: str, section: str | None = None) -> list[Block]:
    """The shell blocks of ``markdown`` (of the ``## section`` only, if given, with its
    subsections)."""
    lines = markdown.splitlines()
    if section is not None:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == f"## {section}")
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].startswith("## ")), len(lines))
        offset, lines = start, lines[start:end]
    else:
        offset = 0
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not FENCE.match(lines[j]):
            j += 1
        body = "\n".join(lines[i + 1 : j]) + "\n"
        prev = lines[i - 1].strip() if i else ""
        skip = None
        sm = re.match(r"<!--\s*doc-test:\s*skip:\s*(.+?)\s*-->", prev)
        if sm:
            skip = sm.group(1)
        block = Block(offset + i + 1, m.group(2), body, skip)
        if block.lang in SHELL_LANGS or (block.lang == "" and block.transcript):
            out.append(block)
        i = j + 1
    return out


def setup(markdown: str) -> str:
    m = re.search(r"<!--\s*doc-test:\s*setup\s*\n(.*?)-->", markdown, re.S)
    return m.group(1) if m else ""
