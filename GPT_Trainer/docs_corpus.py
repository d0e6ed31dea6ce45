"""An offline English corpus from Debian documentation packages, tokenised for train.py
(docs/training.md#an-offline-english-corpus-debian-documentation).

    python -m GPT_Trainer.docs_corpus build OUT_DIR [--debs DIR] [--vocab_size 32000] [--test_fraction 0.01]

Downloads the .deb files of SOURCES with `apt-get download` (no root needed; files already in --debs are
reused, so the corpus can be rebuilt with no network from a carried folder of .debs), unpacks them with
`dpkg-deb -x` into a temporary directory, turns each source's prose into plain text, drops code,
boilerplate and short fragments, de-duplicates documents by a hash of their normalised text, holds out a
seeded test split by document,
trains a Llama-2-sized byte-level BPE on the train split only and writes

    OUT_DIR/tokenizer/          the tokenizer (HF format, the built-in tokenizer's conventions)
    OUT_DIR/train.bin, test.bin uint16 token ids; each document is <s> text </s>
    OUT_DIR/documents.jsonl     one line per kept document: split, source, file, hash, words, tokens
    OUT_DIR/manifest.json       token and document counts, sources and their word counts, tokenizer, seed

train.py --dataset OUT_DIR reads the token files (data.load_token_dataset).
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import gzip
import hashlib
import html
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from GPT_Trainer.cli import UserError, run
from GPT_Trainer.data import TOKEN_FORMAT, TOKEN_MANIFEST, train_bpe_tokenizer

SEED = 1234
TEST_FRACTION = 0.01  # 0.5 % held out only ~70 documents (96K tokens): too few for a steady test loss
VOCAB_SIZE = 32_000  # Llama-2's
MIN_WORDS = 50  # shorter documents are headers, stubs and index pages
MAX_WORDS = 20_000  # longer ones are cut at paragraphs, so that no single file dominates the test split
DICT_GROUP_WORDS = 2_000  # dictionary entries are grouped into documents of about this many words
# GCIDE marks nearly every sense with its source ("[1913 Webster]": 205K times): boilerplate, not text.
DICT_SOURCE_TAGS = re.compile(r"\s*\[(1913 Webster|Webster 1913 Suppl\.|WordNet 1\.5|PJC|Century Dict\.)\]")


@dataclass(frozen=True)
class Source:
    """A Debian package and what to read in it. A meta-package (linux-doc) names in `concrete` the pattern of
    the versioned package it depends on (linux-doc-[0-9]*), which is what is downloaded."""

    package: str
    kind: str  # html, rst, markdown, pod, man, text, dict, entries (fortune files), bible
    patterns: tuple[str, ...]  # globs relative to the unpacked package
    exclude: str = r"(?!)"  # regex on the relative path of files to skip
    concrete: str | None = None


SOURCES = (
    Source("linux-doc", "rst", ("usr/share/doc/linux-doc-*/html/_sources/**/*.txt",),
           r"/translations/|/ABI/|/devicetree/",
           concrete="linux-doc-[0-9]*"),
    Source("python3-doc", "rst", ("usr/share/doc/python3.*/html/_sources/**/*.txt",), r"/whatsnew/changelog",
           concrete="python3.[0-9]*-doc"),
    Source("postgresql-doc", "html", ("usr/share/doc/postgresql-doc-*/html/*.html",), r"/(bookindex|release-)",
           concrete="postgresql-doc-[0-9]*"),
    Source("perl-doc", "pod", ("usr/share/perl/*/pod/*.pod",), r"/perl5\d+delta|perltoc"),
    Source("bible-kjv-text", "bible", ("usr/lib/bible.data",)),
    Source("debian-handbook", "html", ("usr/share/doc/debian-handbook/html/en-US/*.html",)),
    Source("debian-reference-en", "html", ("usr/share/debian-reference/*.en.html",)),
    Source("git-doc", "text", ("usr/share/doc/git-doc/*.txt",), r"RelNotes"),
    Source("manpages", "man", ("usr/share/man/man*/*.gz",)),
    Source("manpages-dev", "man", ("usr/share/man/man*/*.gz",)),
    Source("dict-gcide", "dict", ("usr/share/dictd/gcide.index",)),
    Source("dict-foldoc", "dict", ("usr/share/dictd/foldoc.index",)),
    Source("dict-jargon", "dict", ("usr/share/dictd/jargon.index",)),
    Source("anarchism", "markdown", ("usr/share/doc/anarchism/markdown/*.md.gz",)),
    Source("python-django-doc", "html", ("usr/share/doc/python-django-doc/html/**/*.html",),
           r"/releases/|/_modules/|genindex|py-modindex|search\.html"),
    Source("libreoffice-help-en-us", "html", ("usr/share/libreoffice/help/en-US/text/**/*.html",)),
    Source("debian-policy", "html", ("usr/share/doc/debian-policy/policy.html/*.html",), r"genindex|search\.html"),
    Source("developers-reference", "html", ("usr/share/developers-reference/*.html",), r"genindex|search\.html"),
    Source("maint-guide", "html", ("usr/share/doc/maint-guide/html/*.en.html",)),
    Source("debian-faq", "html", ("usr/share/doc/debian/FAQ/*.html",)),
    Source("harden-doc", "html", ("usr/share/doc/harden-doc/html/en-US/*.html",)),
    Source("gnu-standards", "text", ("usr/share/info/*.info.gz",)),
    Source("octave-doc", "html", ("usr/share/doc/octave/octave.html/*.html",), r"Index|index-"),
    Source("sqlite3-doc", "html", ("usr/share/doc/sqlite3/**/*.html",), r"/releaselog/|/c3ref/|changes\.html"),
    Source("rust-doc", "html", tuple(f"usr/share/doc/rust-doc/html/{book}/**/*.html" for book in
                                     ("book", "reference", "nomicon", "edition-guide", "rust-by-example", "rustc",
                                      "embedded-book")), r"/print\.html|/404\.html|toc\.html"),
    Source("apache2-doc", "html", ("usr/share/doc/apache2-doc/manual/en/**/*.html",), r"quickreference|sitemap"),
    Source("vim-runtime", "text", ("usr/share/vim/vim*/doc/*.txt",)),
    Source("gimp-help-en", "html", ("usr/share/gimp/2.0/help/en/*.html",)),
    Source("zsh-doc", "html", ("usr/share/doc/zsh-common/html/*.html",), r"index|Index|_toc"),
    Source("fortunes", "entries", ("usr/share/games/fortunes/*",), r"\.(dat|u8)$|art$"),
)

# ----------------------------------------------------------------------------------------------------
# Fetching


def _sh(args: list[str], **kw) -> str:
    try:
        return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout
    except FileNotFoundError as err:
        raise UserError(f"{args[0]} is not installed; building this corpus needs Debian's apt-get and dpkg-deb") from err
    except subprocess.CalledProcessError as err:
        lines = (err.stderr or err.stdout or "").strip().splitlines()
        raise UserError(f"`{' '.join(args)}` failed: {lines[-1] if lines else f'status {err.returncode}'}") from err


def _deb_for(debs: str, package: str) -> str | None:
    found = sorted(glob.glob(os.path.join(debs, f"{package}_*.deb")))
    return found[-1] if found else None


def resolve_package(source: Source, debs: str) -> str:
    """The package to download for a source: a meta-package's versioned one from a carried .deb if one is
    there (so a rebuild from carried .debs needs no apt lists), else from apt's Depends of the meta-package."""
    if source.concrete is None:
        return source.package
    carried = _deb_for(debs, source.concrete)
    if carried:
        return os.path.basename(carried).split("_")[0]
    for line in _sh(["apt-cache", "depends", source.package]).splitlines():
        key, _, value = line.strip().partition(": ")
        if key == "Depends" and fnmatch.fnmatch(value, source.concrete):
            return value
    raise UserError(f"apt-cache knows no package that the meta-package {source.package} depends on")


def fetch(debs: str, unpacked: str) -> dict[str, str]:
    """{source package name: its root unpacked under `unpacked`}; downloads only the .debs not already in
    `debs`."""
    os.makedirs(debs, exist_ok=True)
    packages = {s.package: resolve_package(s, debs) for s in SOURCES}
    if any(s.kind == "bible" for s in SOURCES):
        packages["bible-kjv"] = "bible-kjv"  # the program that decodes bible-kjv-text's compressed text
    missing = [p for p in packages.values() if _deb_for(debs, p) is None]
    if missing:
        print(f"apt-get download {' '.join(missing)}", flush=True)
        _sh(["apt-get", "download", *missing], cwd=debs)
    roots = {}
    for name, package in packages.items():
        roots[name] = os.path.join(unpacked, package)
        os.makedirs(roots[name])
        _sh(["dpkg-deb", "-x", _deb_for(debs, package), roots[name]])
    return roots


# ----------------------------------------------------------------------------------------------------
# Plain text from each format. Every converter returns text whose paragraphs are separated by blank lines;
# `keep_prose` then drops the paragraphs that are not prose.


class _HTMLText(html.parser.HTMLParser):
    """Visible text with block elements as paragraph breaks; code, navigation and page furniture dropped."""

    SKIP = {"script", "style", "pre", "head", "nav", "footer", "header", "form", "button", "select", "textarea"}
    SKIP_CLASSES = {"navigation", "navheader", "navfooter", "related", "sphinxsidebar", "sidebar", "footer", "header",
                    "toc", "breadcrumb", "breadcrumbs", "highlight", "programlisting", "screen", "synopsis",
                    "literallayout", "nav-chapters", "nav-wrapper"}
    BLOCK = {"p", "div", "br", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "section",
             "blockquote", "ul", "ol", "dl", "article", "title", "td", "th"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # open elements: (tag, does it hide its content)

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCK:
            self.parts.append("\n\n")
        if tag in self.VOID:
            return
        cls = dict(attrs).get("class") or ""
        self.stack.append((tag, tag in self.SKIP or not self.SKIP_CLASSES.isdisjoint(cls.split())))

    def handle_endtag(self, tag):
        # Close up to the matching element: HTML may leave <p>, <li>, ... unclosed.
        if any(open_tag == tag for open_tag, _ in self.stack):
            while self.stack.pop()[0] != tag:
                pass
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not any(hidden for _, hidden in self.stack):
            self.parts.append(data)


def html_text(raw: str) -> str:
    parser = _HTMLText()
    parser.feed(raw)
    parser.close()
    return _reflow("".join(parser.parts))


_RST_DROP_DIRECTIVE = re.compile(r"^\s*\.\.\s+(code-block|code|sourcecode|literalinclude|toctree|kernel-doc|"
                                 r"index|highlight|c:|py:|productionlist|doctest|testcode|testoutput|"
                                 r"csv-table|list-table|table|image|figure|raw|include|only|_|\|)")


def rst_text(raw: str) -> str:
    """reStructuredText: literal blocks (after `::`), code/table/toctree directives, comments, section
    underlines and table borders go; inline markup keeps its words."""
    out, skip_indent = [], None
    for line in raw.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if _RST_DROP_DIRECTIVE.match(line) or (stripped.startswith("..") and "::" not in stripped):
            out.append("")  # the directive/comment and its indented body go; the paragraph ends
            skip_indent = indent
            continue
        if stripped.startswith(".."):  # other directives (note, warning, ...): keep the body
            out.append("")
            continue
        if stripped and re.fullmatch(r"([=\-~^\"'`#*+:._])\1{2,}|[+=|\- ]{4,}", stripped):
            continue
        if stripped.endswith("::"):  # "text::" reads "text:", then the literal block goes
            out += [line.rstrip()[:-1] if stripped != "::" else "", ""]
            skip_indent = indent
            continue
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r":[a-z:+-]+:`(?:[^`<]*<)?([^`>]*)>?`", r"\1", text)  # :role:`text <target>` -> text
    text = re.sub(r"`([^`<]+?)(?:\s*<[^>`]*>)?`_{0,2}", r"\1", text)  # `link <url>`_ -> link
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*", lambda m: m.group(1) or m.group(2), text)
    return _reflow(text)


def markdown_text(raw: str) -> str:
    text = re.sub(r"```.*?```", "", raw, flags=re.S)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images keep their text
    text = re.sub(r"^\s{0,3}(#{1,6}|>|[-*+]\s)\s*", "", text, flags=re.M)
    text = re.sub(r"<[^>\n]+>", "", text)
    text = re.sub(r"(\*\*|__|\*|`)", "", text)
    return _reflow(html.unescape(text))


def pod_text(raw: str) -> str:
    """Perl POD: verbatim (indented) paragraphs are code and go; commands keep their text; X<...> codes
    keep their words (L<text|target> its text)."""
    out = []
    for para in re.split(r"\n\s*\n", raw):
        if not para.strip() or para[:1] in " \t":
            continue
        if para.startswith("="):
            command, _, rest = para.partition(" ")
            if command in ("=head1", "=head2", "=head3", "=head4", "=item"):
                out.append(rest.strip())
            continue
        out.append(para)
    text = "\n\n".join(out)
    text = re.sub(r"[A-Z]<<+\s+(.*?)\s+>>+", r"\1", text)
    for _ in range(4):  # nested codes, innermost first
        text = re.sub(r"L<([^<>|]*)\|[^<>]*>", r"\1", text)
        text = re.sub(r"[EZSX]<[^<>]*>", "", text)
        text = re.sub(r"[A-Z]<([^<>]*)>", r"\1", text)
    return _reflow(text)


_ROFF_ESCAPES = ((r"\(em", "--"), (r"\(en", "-"), (r"\(aq", "'"), (r"\(dq", '"'), (r"\(lq", '"'), (r"\(rq", '"'),
                 (r"\(bu", ""), (r"\-", "-"), (r"\e", "\\"), (r"\&", ""), (r"\ ", " "), (r"\~", " "), (r"\|", ""),
                 (r"\^", ""), (r"\c", ""))


def man_text(raw: str) -> str:
    """A man page in roff: requests become paragraph breaks or keep their words; no-fill/example blocks
    (code, synopses) and comments go."""
    out, skipping = [], False
    for line in raw.splitlines():
        if line.startswith((".", "'")):
            request, _, args = line[1:].strip().partition(" ")
            if request in ("nf", "EX"):
                skipping = True
            elif request in ("fi", "EE"):
                skipping = False
            elif request in ("SH", "SS"):
                out.append("\n" + args.strip('"').capitalize() + "\n")
            elif request in ("B", "I", "SM", "SB") and not skipping:
                out.append(args.strip('"'))
            elif request in ("BR", "BI", "IR", "IB", "RB", "RI") and not skipping:
                out.append("".join(a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', args)))  # alternating fonts
            elif request in ("PP", "P", "LP", "TP", "IP", "sp", "br", "HP"):
                out.append("")
            continue
        if not skipping:
            out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\\f(\[[^]]*\]|\(..|.)", "", text)
    text = re.sub(r"\\[*n]\(..|\\[*n].", "", text)
    for escape, plain in _ROFF_ESCAPES:
        text = text.replace(escape, plain)
    text = re.sub(r"\\\(..|\\\[[^]]*\]", "", text)
    return _reflow(text)


def _reflow(text: str) -> str:
    """Paragraphs separated by one blank line, each paragraph's lines joined with single spaces."""
    paras = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text))
    return "\n\n".join(p for p in paras if p)


_CODE_CHARS = set("{}[]();=<>_\\|$@#&*/%^~`")


def is_prose(paragraph: str) -> bool:
    """A paragraph of words rather than code, tables, option lists or page furniture."""
    words = paragraph.split()
    if len(words) < 6:
        return False
    letters = sum(c.isalpha() for c in paragraph)
    visible = sum(not c.isspace() for c in paragraph)
    code = sum(c in _CODE_CHARS for c in paragraph)
    plain_words = sum(w.strip(".,;:!?\"'()").isalpha() for w in words)
    return letters >= 0.7 * visible and code <= 0.05 * visible and plain_words >= 0.6 * len(words)


def keep_prose(text: str) -> str:
    return "\n\n".join(p for p in text.split("\n\n") if is_prose(p))


# ----------------------------------------------------------------------------------------------------
# Documents of each source


def _read(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _entries(path: str) -> list[str]:
    """A fortune file's entries (separated by lines of `%`)."""
    return [_reflow(e) for e in re.split(r"\n%\n", _read(path))]


CONVERTERS = {"html": html_text, "rst": rst_text, "markdown": markdown_text, "pod": pod_text, "man": man_text,
              "text": _reflow}


def _files(source: Source, root: str) -> list[str]:
    found = set()
    for pattern in source.patterns:
        found.update(glob.glob(os.path.join(root, pattern), recursive=True))
    exclude = re.compile(source.exclude)
    return sorted(f for f in found if os.path.isfile(f) and not exclude.search("/" + os.path.relpath(f, root)))


def _grouped(entries, name: str):
    """Short entries (of a dictionary, of fortunes) grouped into documents of about DICT_GROUP_WORDS words."""
    group, words, part = [], 0, 0
    for entry in entries:
        group.append(entry)
        words += len(entry.split())
        if words >= DICT_GROUP_WORDS:
            yield f"{name}#{part}", "\n\n".join(group)
            group, words, part = [], 0, part + 1
    if group:
        yield f"{name}#{part}", "\n\n".join(group)


def _dict_entries(index_path: str):
    """The entries of a dictd database (an index of base-64 offsets into a dictzip file) in file order."""
    digits = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}

    def number(b64):
        value = 0
        for c in b64:
            value = value * 64 + digits[c]
        return value

    with open(index_path, encoding="utf-8", errors="replace") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    # "00-database-*" entries describe the database itself
    entries = sorted({(number(r[1]), number(r[2])) for r in rows if len(r) >= 3 and not r[0].startswith("00")})
    with gzip.open(index_path[: -len(".index")] + ".dict.dz", "rb") as f:
        data = f.read()
    return [_reflow(DICT_SOURCE_TAGS.sub("", data[offset : offset + length].decode("utf-8", errors="replace")))
            for offset, length in entries]


def _bible_documents(data_path: str, program_root: str):
    """The King James Bible, one document per chapter, decoded by bible-kjv's own program."""
    program = os.path.join(program_root, "usr", "bin", "bible")
    text = _sh([program, "-p", os.path.dirname(data_path), "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL)
    chapters = re.split(r"\n\n(?=\S[^\n]* \d+\n)", "\n" + text.strip())
    for chapter in chapters:
        title, _, body = chapter.strip().partition("\n")
        verses = re.split(r"\n\s+\d+ ", "\n" + body)
        yield f"bible#{title}", title + "\n\n" + "\n".join(re.sub(r"\s+", " ", v).strip() for v in verses if v.strip())


def _split_long(text: str) -> list[str]:
    """Documents of at most about MAX_WORDS words, cut at paragraph boundaries."""
    parts, current, words = [], [], 0
    for para in text.split("\n\n"):
        current.append(para)
        words += len(para.split())
        if words >= MAX_WORDS:
            parts.append("\n\n".join(current))
            current, words = [], 0
    if current:
        parts.append("\n\n".join(current))
    return parts


def source_documents(source: Source, root: str, roots: dict[str, str]):
    """(name, cleaned text) of each document of a source."""
    for path in _files(source, root):
        rel = os.path.relpath(path, root)
        if source.kind in ("dict", "entries"):
            entries = _dict_entries(path) if source.kind == "dict" else _entries(path)
            yield from ((n, keep_prose(t)) for n, t in _grouped(entries, rel))
        elif source.kind == "bible":
            yield from _bible_documents(path, roots["bible-kjv"])  # verses are prose however short
        else:
            text = keep_prose(CONVERTERS[source.kind](_read(path)))
            parts = _split_long(text)
            for i, part in enumerate(parts):
                yield (rel if len(parts) == 1 else f"{rel}#{i}"), part


def normalised_hash(text: str) -> str:
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def collect(sources: list[tuple[Source, str]], roots: dict[str, str]) -> tuple[list[dict], dict]:
    """Documents [{source, file, hash, words, text}] after the length filter and de-duplication, and
    per-source counts."""
    docs, seen, stats = [], set(), {}
    for source, root in sources:
        counts = stats.setdefault(source.package, {"package": os.path.basename(root), "documents": 0, "words": 0,
                                                   "short_dropped": 0, "duplicates_dropped": 0})
        for name, text in source_documents(source, root, roots):
            words = len(text.split())
            if words < MIN_WORDS:
                counts["short_dropped"] += 1
                continue
            digest = normalised_hash(text)
            if digest in seen:
                counts["duplicates_dropped"] += 1
                continue
            seen.add(digest)
            docs.append({"source": source.package, "file": name, "hash": digest, "words": words, "text": text})
            counts["documents"] += 1
            counts["words"] += words
    return docs, stats


def split_documents(docs: list[dict], test_fraction: float, seed: int) -> None:
    """Mark each document train or test: the test documents are those first in an order seeded by
    (seed, document hash), so the split does not depend on the order of the sources. At least one of each."""
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha1(f"{seed}:{docs[i]['hash']}".encode()).digest())
    num_test = min(len(docs) - 1, max(1, round(test_fraction * len(docs))))
    test = set(order[:num_test])
    for i, doc in enumerate(docs):
        doc["split"] = "test" if i in test else "train"


def write_tokens(docs: list[dict], tokenizer, path: str) -> int:
    """<s> ids </s> of each document, appended to `path` as uint16; returns the token count and records
    each document's."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    total = 0
    with open(path, "wb") as f:
        for start in range(0, len(docs), 1000):
            batch = docs[start : start + 1000]
            for doc, enc in zip(batch, tokenizer.backend_tokenizer.encode_batch([d["text"] for d in batch],
                                                                                add_special_tokens=False)):
                ids = np.asarray([bos, *enc.ids, eos], dtype=np.uint16)
                f.write(ids.tobytes())
                doc["tokens"] = len(ids)
                total += len(ids)
    return total


def build(out_dir: str, debs: str | None = None, vocab_size: int = VOCAB_SIZE, test_fraction: float = TEST_FRACTION,
          seed: int = SEED, sources: list[tuple[Source, str]] | None = None) -> dict:
    """Build the corpus in out_dir and return its manifest. `sources` ([(Source, unpacked root)]) skips
    the Debian packages (the tests pass their own files)."""
    started = time.time()
    os.makedirs(out_dir, exist_ok=True)
    if sources is None:
        # Unpacked outside the repository (about 1 GB, and tests walk the working tree); only the .debs stay.
        with tempfile.TemporaryDirectory(prefix="docs_corpus_") as unpacked:
            roots = fetch(debs or os.path.join(out_dir, "debs"), unpacked)
            docs, stats = collect([(s, roots[s.package]) for s in SOURCES], roots)
    else:
        docs, stats = collect(sources, {})
    if len(docs) < 2:
        raise UserError(f"only {len(docs)} document(s) of at least {MIN_WORDS} words were found; a corpus needs 2")
    split_documents(docs, test_fraction, seed)
    print(f"{len(docs)} documents, {sum(d['words'] for d in docs):,} words after {time.time() - started:.0f} s; "
          "training the tokenizer", flush=True)
    tokenizer_dir = os.path.join(out_dir, "tokenizer")
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    tokenizer = train_bpe_tokenizer((d["text"] for d in docs if d["split"] == "train"), vocab_size, tokenizer_dir)
    if len(tokenizer) > np.iinfo(np.uint16).max + 1:
        raise UserError(f"a vocabulary of {len(tokenizer)} tokens does not fit the uint16 token files")
    splits = {}
    for split in ("train", "test"):
        part = [d for d in docs if d["split"] == split]
        tokens = write_tokens(part, tokenizer, os.path.join(out_dir, f"{split}.bin"))
        splits[split] = {"file": f"{split}.bin", "tokens": tokens, "documents": len(part),
                         "words": sum(d["words"] for d in part)}
        for doc in part:
            stats[doc["source"]].setdefault(f"{split}_tokens", 0)
            stats[doc["source"]][f"{split}_tokens"] += doc["tokens"]
    with open(os.path.join(out_dir, "documents.jsonl"), "w") as f:
        for doc in docs:
            f.write(json.dumps({k: doc[k] for k in ("split", "source", "file", "hash", "words", "tokens")}) + "\n")
    manifest = {
        "format": TOKEN_FORMAT, "dtype": "uint16", "tokenizer": "tokenizer", "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "document_layout": "<s> text </s>", "seed": seed, "test_fraction": test_fraction, "min_words": MIN_WORDS,
        "splits": splits, "sources": stats, "build_seconds": round(time.time() - started, 1),
    }
    with open(os.path.join(out_dir, TOKEN_MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(os.path.join(out_dir, TOKEN_MANIFEST + ".tmp"), os.path.join(out_dir, TOKEN_MANIFEST))
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="docs_corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build"])
    parser.add_argument("out_dir", help="where the corpus is written (e.g. data/docs_corpus)")
    parser.add_argument("--debs", help="folder of .deb files to reuse or download into (default: OUT_DIR/debs)")
    parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--test_fraction", type=float, default=TEST_FRACTION)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        parser.error(f"--test_fraction must be in (0, 1), got {args.test_fraction}")
    m = build(args.out_dir, args.debs, args.vocab_size, args.test_fraction, args.seed)
    print(f"wrote {m['splits']['train']['tokens']:,} train / {m['splits']['test']['tokens']:,} test tokens "
          f"({m['splits']['train']['documents']} / {m['splits']['test']['documents']} documents) to {args.out_dir} "
          f"in {m['build_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="docs_corpus"))
