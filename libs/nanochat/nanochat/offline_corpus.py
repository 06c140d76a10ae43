"""The offline pretraining text of make_data: where it comes from and how it is written.

Three sources, all local: the running interpreter's standard library (`stdlib`), Debian's
python3.11-doc reST sources (`python-docs`), each file cut into documents at section and paragraph
boundaries, and a small synthetic English generator (`synthetic`). `write_corpus` writes the
documents as FineWeb-Edu-format shards (the last one the validation split).
"""

from __future__ import annotations

import random
import re
import sysconfig
from pathlib import Path

from nanochat.dataset import shard_name
from nanochat.stages.options import MakeDataOptions

HEADING_RE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")
SENTENCE_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def is_heading(paragraph: str) -> bool:
    lines = paragraph.splitlines()
    return any(HEADING_RE.match(line) for line in lines[:3]) and len(lines) <= 3


def split_documents(text: str, max_chars: int) -> list[str]:
    """Cut one file (reST or Python) into documents: a new one at each section heading, or when adding
    the next paragraph (in code: the next blank-line-separated block) would pass `max_chars` (a
    longer paragraph is cut at line ends)."""
    docs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        doc = "\n\n".join(current).strip()
        if len(doc) >= 200:
            docs.append(doc)
        current.clear()

    for paragraph in paragraphs(text):
        if is_heading(paragraph) and sum(map(len, current)) > 400:
            flush()
        while len(paragraph) > max_chars:
            cut = paragraph.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            flush()
            current.append(paragraph[:cut])
            flush()
            paragraph = paragraph[cut:].lstrip("\n")
        if sum(map(len, current)) + len(paragraph) > max_chars:
            flush()
        current.append(paragraph)
    flush()
    return docs


def python_doc_files(docs_path: str | Path) -> list[Path]:
    root = Path(docs_path)
    return sorted(root.rglob("*.txt")) if root.is_dir() else []


# Parts of the standard library that are not text a person wrote: test suites, the codecs' generated
# mapping tables and the docs' pickled topic strings.
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library sources, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if not STDLIB_SKIP & set(p.relative_to(root).parts[:-1])]


SUBJECTS = [
    "the river",
    "a small robot",
    "the old library",
    "my neighbour",
    "the committee",
    "a curious cat",
    "the mountain village",
    "our teacher",
    "the spacecraft",
    "a young painter",
    "the market",
    "the compiler",
]
VERBS = [
    "visited",
    "described",
    "repaired",
    "ignored",
    "studied",
    "painted",
    "counted",
    "followed",
    "built",
    "measured",
]
OBJECTS = [
    "the bridge",
    "seven lanterns",
    "an ancient map",
    "the quiet harbour",
    "a list of numbers",
    "the garden",
    "twelve letters",
    "a broken clock",
    "the northern road",
    "a new theory",
    "the evening train",
]
CONNECTORS = ["Later,", "Meanwhile,", "After that,", "In the morning,", "Surprisingly,", "As expected,", "Then"]


def synthetic_docs(n: int, rng: random.Random) -> list[str]:
    """Generated corpus: grammatical, repetitive English with numbers (small and fast, for tests)."""
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(6, 24)):
            s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
            if rng.random() < 0.3:
                a, b = rng.randint(2, 99), rng.randint(2, 99)
                s += f" and counted {a} plus {b}, which is {a + b}"
            if rng.random() < 0.4:
                s = f"{rng.choice(CONNECTORS)} {s}"
            sentences.append(s[0].upper() + s[1:] + ".")
        title = f"{rng.choice(SUBJECTS).title()} and {rng.choice(OBJECTS)}"
        docs.append(title + "\n\n" + " ".join(sentences))
    return docs


def write_corpus(folder: Path, docs: list[str], options: MakeDataOptions) -> dict[str, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(docs) <= options.val_docs:
        raise ValueError(f"only {len(docs)} documents; val_docs={options.val_docs} leaves none for training")
    train, val = docs[: -options.val_docs], docs[-options.val_docs :]
    shards = [train[i : i + options.docs_per_shard] for i in range(0, len(train), options.docs_per_shard)] + [val]
    for index, shard in enumerate(shards):
        table = pa.table({"text": pa.array(shard, type=pa.string())})
        pq.write_table(table, folder / shard_name(index), row_group_size=options.row_group_size, compression="zstd")
    return {
        "docs": len(docs),
        "train_docs": len(train),
        "val_docs": len(val),
        "shards": len(shards),
        "chars": sum(map(len, docs)),
    }


def load_docs(options: MakeDataOptions, rng: random.Random) -> list[str]:
    """The documents of `options.source`, shuffled by `rng` (which also drives the generator)."""
    source = options.source
    if source == "synthetic":
        docs = synthetic_docs(options.synthetic_docs, rng)
    else:
        files = python_doc_files(options.docs_path) if source == "python-docs" else stdlib_files()
        if not files:
            where = options.docs_path if source == "python-docs" else sysconfig.get_paths()["stdlib"]
            raise FileNotFoundError(f"no {source} text files under {where}; use --source stdlib or synthetic")
        docs = [
            d
            for f in files
            for d in split_documents(f.read_text(encoding="utf-8", errors="replace"), options.max_doc_chars)
        ]
    rng.shuffle(docs)
    return docs
