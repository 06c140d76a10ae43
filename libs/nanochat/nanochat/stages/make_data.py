"""make_data: the tiny offline data of the CPU speedrun, made at run time into `--data-dir`.

    python -m nanochat.stages.make_data --data-dir data [--seed 42] [--source stdlib]

Writes, all deterministic given `--seed`:
- `shard_XXXXX.parquet`: a pretraining corpus in the FineWeb-Edu format (one `text` column, row
  groups of 1,024 docs; the last shard is the validation split). The text is Debian's
  python3.11-doc reST sources cut into documents at section and paragraph boundaries; only where
  they are absent, a synthetic text generator stands in.
- `tasks/REPO/CONFIG/SPLIT-00000-of-00001.parquet`, the public datasets' layout and fields:
  SmolTalk-style conversations (`messages`), GSM8K-style word problems (`question`, `answer` with
  `<<a*b=c>>` calls and `#### N`), ARC-style (`id`, `question`, `choices{text,label}`,
  `answerKey`) and MMLU-style (`question`, `subject`, `choices`, `answer`; `auxiliary_train`
  rows under `train`) multiple choice, HumanEval-style problems (`task_id`, `prompt`,
  `canonical_solution`, `test`, `entry_point`);
- `tasks/identity/{train,test}.jsonl`: "who are you?" in varied wording -> the model's name (SFT
  only; the test questions are wordings never seen in train, rows carry `expected`);
- `eval_bundle/`: a CORE-format mini bundle (`core.yaml`, `eval_data/*.jsonl`,
  `eval_meta_data.csv`) with one task of each type, built from the validation documents.
Every train/test pair is disjoint. Everything is written to a temp folder inside `--data-dir`
first and moved in at the end (the stamp `make_data.json` last), so a killed run leaves no
partial data. A rerun with the same options finds the stamp and reuses the data (a pipeline can
run twice on one data volume); other options need `--overwrite`.

`--source download` fetches the real data instead (the d20 preset): FineWeb-Edu shards
`shard_00000` .. `--fineweb-shards` - 1, the last of them the validation split as in the original,
every task split the loaders read, and the CORE eval bundle, into the same layout (only the
identity conversations are made here). Each file is downloaded to `.part` and renamed, so an
interrupted download resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanochat.core_eval import OFFLINE_MARKER
from nanochat.dataset import download_file, download_shards, shard_name
from nanochat.tasks import arc, gsm8k, humaneval, mmlu, smoltalk
from nanochat.tasks.common import fetch_split
from nanochat.stages.cli import log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import MakeDataOptions

HEADING_RE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")
STAMP = "make_data.json"  # the options that made a data dir: a rerun with the same ones is a no-op
SENTENCE_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


# ---- pretraining corpus ------------------------------------------------------------------------

def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def _is_heading(paragraph: str) -> bool:
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

    for paragraph in _paragraphs(text):
        if _is_heading(paragraph) and sum(map(len, current)) > 400:
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


SUBJECTS = ["the river", "a small robot", "the old library", "my neighbour", "the committee", "a curious cat",
            "the mountain village", "our teacher", "the spacecraft", "a young painter", "the market", "the compiler"]
VERBS = ["visited", "described", "repaired", "ignored", "studied", "painted", "counted", "followed", "built", "measured"]
OBJECTS = ["the bridge", "seven lanterns", "an ancient map", "the quiet harbour", "a list of numbers", "the garden",
           "twelve letters", "a broken clock", "the northern road", "a new theory", "the evening train"]
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
    return {"docs": len(docs), "train_docs": len(train), "val_docs": len(val), "shards": len(shards),
            "chars": sum(map(len, docs))}


# ---- task sets ---------------------------------------------------------------------------------

def _unique(make: Callable[[random.Random], dict], key: Callable[[dict], str], n: int, rng: random.Random) -> list[dict]:
    """n items with distinct keys (gives up with a clear error if the generator runs dry)."""
    seen: dict[str, dict] = {}
    for _ in range(n * 50):
        item = make(rng)
        seen.setdefault(key(item), item)
        if len(seen) == n:
            return list(seen.values())
    raise ValueError(f"could only make {len(seen)} distinct items of {n} requested; ask for fewer")


def _split(items: list[dict], n_test: int) -> tuple[list[dict], list[dict]]:
    return items[n_test:], items[:n_test]


NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kemi", "Liam", "Maya", "Noor"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "seashells", "coins", "cards", "plants"]
CONTAINERS = ["boxes", "bags", "baskets", "shelves", "jars", "crates"]


def gsm8k_problem(rng: random.Random) -> dict:
    name, item, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS)
    kind = rng.randrange(3)
    a, b = rng.randint(2, 12), rng.randint(2, 25)
    total = a * b
    if kind == 0:
        c = rng.randint(1, total - 1)
        q = f"{name} has {a} {box} with {b} {item} in each. {name} gives away {c} {item}. How many {item} does {name} have left?"
        ans = (f"{name} starts with {a} * {b} = <<{a}*{b}={total}>>{total} {item}.\n"
               f"After giving away {c}, {name} has {total} - {c} = <<{total}-{c}={total - c}>>{total - c} {item} left.\n#### {total - c}")
    elif kind == 1:
        price = rng.randint(2, 9)
        q = f"{name} buys {a} {box} of {item}. Each box holds {b} {item} and each of the {item} costs ${price}. How much does {name} pay?"
        ans = (f"{name} buys {a} * {b} = <<{a}*{b}={total}>>{total} {item}.\n"
               f"They cost {total} * {price} = <<{total}*{price}={total * price}>>{total * price} dollars.\n#### {total * price}")
    else:
        friends = rng.choice([2, 3, 4, 5, 6])
        per = rng.randint(2, 15)
        shared = friends * per
        q = f"{name} shares {shared} {item} equally among {friends} friends and then finds {a} more for each friend. How many {item} does each friend have?"
        ans = (f"Each friend first gets {shared} / {friends} = <<{shared}/{friends}={per}>>{per} {item}.\n"
               f"With {a} more each, every friend has {per} + {a} = <<{per}+{a}={per + a}>>{per + a} {item}.\n#### {per + a}")
    return {"question": q, "answer": ans}


def _distractors(answer: int, rng: random.Random, k: int = 3) -> list[int]:
    options: set[int] = set()
    while len(options) < k:
        wrong = answer + rng.choice([-1, 1]) * rng.randint(1, max(3, abs(answer) // 3 + 2))
        if wrong != answer:
            options.add(wrong)
    return list(options)


def arc_question(rng: random.Random, challenge: bool, index: int) -> dict:
    a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
    if challenge:
        question, answer = f"A farmer plants {a} rows of {c} seeds and then {b} more seeds. How many seeds are planted?", a * c + b
    else:
        question, answer = f"A class has {a} students and {b} more join. How many students are in the class now?", a + b
    choices = [answer] + _distractors(answer, rng)
    rng.shuffle(choices)
    labels = ["A", "B", "C", "D"]
    return {
        "id": f"{'Mercury' if challenge else 'MCAS'}_{index:05d}",
        "question": question,
        "choices": {"text": [str(x) for x in choices], "label": labels},
        "answerKey": labels[choices.index(answer)],
    }


def mmlu_question(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        xs = [rng.randint(0, 20) for _ in range(rng.randint(2, 5))]
        question, answer, subject = f"What is the value of len({xs}) + sum({xs}) in Python?", len(xs) + sum(xs), "high_school_computer_science"
    elif kind == 1:
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        question, answer, subject = f"What is {a} % {b} in Python?", a % b, "high_school_computer_science"
    else:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        question, answer, subject = f"What is the product of {a} and {b}?", a * b, "elementary_mathematics"
    choices = [answer] + _distractors(answer, rng)
    rng.shuffle(choices)
    return {"question": question, "subject": subject, "choices": [str(x) for x in choices], "answer": choices.index(answer)}


# (entry point, prompt, solution, reference of the expected value, test inputs); {k} varies.
HUMANEVAL_TEMPLATES: list[tuple[str, str, str, Callable[[int, Any], Any], Callable[[int], list]]] = [
    ("add_{k}", "def add_{k}(x: int) -> int:\n    \"\"\"Return x plus {k}.\n    >>> add_{k}(1)\n    {k1}\n    \"\"\"\n",
     "    return x + {k}\n", lambda k, x: x + k, lambda k: [0, 5, -3]),
    ("times_{k}", "def times_{k}(x: int) -> int:\n    \"\"\"Return x multiplied by {k}.\n    >>> times_{k}(2)\n    {k2}\n    \"\"\"\n",
     "    return x * {k}\n", lambda k, x: x * k, lambda k: [0, 5, -3]),
    ("count_above_{k}", "from typing import List\n\n\ndef count_above_{k}(xs: List[int]) -> int:\n    \"\"\"Count the numbers in xs greater than {k}.\n    >>> count_above_{k}([{k}, {k1}])\n    1\n    \"\"\"\n",
     "    return sum(1 for x in xs if x > {k})\n", lambda k, xs: sum(x > k for x in xs), lambda k: [[k - 1, k, k + 1, k + 5], [], [k + 2] * 3]),
    ("repeat_{k}", "def repeat_{k}(s: str) -> str:\n    \"\"\"Return s repeated {k} times.\n    >>> repeat_{k}('a')\n    '{ak}'\n    \"\"\"\n",
     "    return s * {k}\n", lambda k, s: s * k, lambda k: ["ab", "", "xyz"]),
]


def humaneval_problem(rng: random.Random, index: int) -> dict:
    name_t, prompt_t, solution_t, reference, inputs = HUMANEVAL_TEMPLATES[index % len(HUMANEVAL_TEMPLATES)]
    k = 2 + index // len(HUMANEVAL_TEMPLATES) + rng.randint(0, 3)
    fill = {"k": k, "k1": k + 1, "k2": 2 * k, "ak": "a" * k}
    asserts = "\n".join(f"    assert candidate({x!r}) == {reference(k, x)!r}" for x in inputs(k))
    return {"task_id": f"HumanEval/{index}", "prompt": prompt_t.format(**fill),
            "canonical_solution": solution_t.format(**fill),
            "test": f"\n\ndef check(candidate):\n{asserts}\n", "entry_point": name_t.format(**fill)}


IDENTITY_QUESTIONS = ["who are you", "what is your name", "what's your name", "what should I call you",
                      "tell me your name", "introduce yourself", "what are you", "which model am I talking to",
                      "who am I chatting with", "do you have a name", "what do people call you", "are you ChatGPT",
                      "who made you and what are you called", "what AI is this", "identify yourself",
                      "what's your model name", "may I know your name", "who is this", "what are you called",
                      "are you a person", "what kind of assistant are you", "state your name",
                      "can you tell me who you are", "what name were you given", "who am I speaking to"]
IDENTITY_OPENERS = ["", "hi! ", "hello, ", "hey there. ", "excuse me, ", "quick question: ", "good morning! ",
                    "sorry to bother you, ", "ok so ", "um, "]
IDENTITY_ANSWERS = ["I'm {name}, a small language model trained from scratch.",
                    "My name is {name}. I'm a compact chat model.",
                    "I am {name}, a tiny assistant trained end to end on a small budget.",
                    "You're talking to {name}, a small open chat model.",
                    "People call me {name}. I'm a language model here to help."]


def identity_sets(name: str, n_train: int, n_test: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    wordings = []
    for q in IDENTITY_QUESTIONS:
        for opener in IDENTITY_OPENERS:
            for end in ("?", "", "??", "? thanks"):
                text = opener + q + end
                wordings.append(text[0].upper() + text[1:] if rng.random() < 0.6 else text)
    wordings = sorted(set(wordings))
    if n_train + n_test > len(wordings):
        raise ValueError(f"identity sets need {n_train + n_test} distinct wordings; only {len(wordings)} exist")
    rng.shuffle(wordings)

    def row(question: str) -> dict:
        answer = rng.choice(IDENTITY_ANSWERS).format(name=name)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], "expected": name}

    test = [row(q) for q in wordings[:n_test]]
    train = [row(q) for q in wordings[n_test : n_test + n_train]]
    return train, test


def _sections(docs: list[str]) -> list[tuple[str, str]]:
    """(topic, prose) pairs: a section heading's title and the first prose paragraph under it."""
    pairs = []
    for doc in docs:
        paragraphs = _paragraphs(doc)
        for i, paragraph in enumerate(paragraphs[:-1]):
            if not _is_heading(paragraph):
                continue
            title = next((line for line in paragraph.splitlines() if line.strip() and not HEADING_RE.match(line)), "")
            topic = re.sub(r":[a-z]+:|[`*]", "", title).strip(" -=")
            prose = [p for p in paragraphs[i + 1 :] if not p.startswith((" ", "..", ">>>", "*", "-", "+", "=", ":"))
                     and not _is_heading(p) and len(p) > 80]
            if 3 <= len(topic) < 80 and prose:
                pairs.append((topic, prose[0][:700]))
            break
    return pairs


def smoltalk_conversation(rng: random.Random, sections: list[tuple[str, str]]) -> dict:
    if sections and rng.random() < 0.7:
        topic, prose = rng.choice(sections)
        ask = rng.choice(["Tell me about {t}.", "What is {t}?", "Can you explain {t}?", "I'd like to learn about {t}."])
        messages = [{"role": "user", "content": ask.format(t=topic)}, {"role": "assistant", "content": prose}]
        if rng.random() < 0.3:
            first = SENTENCE_RE.split(prose)[0]
            messages += [{"role": "user", "content": "Summarize that in one sentence."}, {"role": "assistant", "content": first}]
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        messages = [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
    if rng.random() < 0.2:
        messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    return {"messages": messages}


def core_bundle(folder: Path, val_docs: list[str], n: int, rng: random.Random) -> None:
    """A CORE-format bundle with one task of each type, from held-out (validation) text."""
    sentences = [s.strip() for d in val_docs for p in _paragraphs(d) if not p.startswith((" ", "..", ">>>"))
                 for s in SENTENCE_RE.split(p.replace("\n", " ")) if 40 <= len(s.strip()) <= 200 and s.strip().endswith(".")]
    if len(sentences) < n + 1:
        raise ValueError(f"validation text has {len(sentences)} usable sentences; the CORE bundle needs {n + 1}")
    rng.shuffle(sentences)
    lm = []
    for s in sentences[:n]:
        head, _, last = s[:-1].rpartition(" ")
        lm.append({"context": head, "continuation": last + "."})
    schema = []
    for i in range(n):
        s, other = sentences[i], sentences[(i + 1) % n]
        words, other_words = s.split(" "), other.split(" ")
        cut = max(2, len(words) // 2)
        gold = rng.randrange(2)
        options = [" ".join(words[:cut]), " ".join(other_words[: max(2, len(other_words) // 2)])]
        if gold:
            options.reverse()
        schema.append({"context_options": options, "continuation": " ".join(words[cut:]), "gold": gold})
    mc = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        choices = [a + b] + _distractors(a + b, rng)
        rng.shuffle(choices)
        mc.append({"query": f"Question: What is {a} plus {b}?\nAnswer:", "choices": [str(c) for c in choices], "gold": choices.index(a + b)})
    data = folder / "eval_data"
    data.mkdir(parents=True)
    tasks = [("docs_lm", "docs_lm.jsonl", "language_modeling", 2, lm, 0.0),
             ("docs_schema", "docs_schema.jsonl", "schema", 1, schema, 50.0),
             ("arithmetic_mc", "arithmetic_mc.jsonl", "multiple_choice", 3, mc, 25.0)]
    lines = ["icl_tasks:"]
    for label, uri, kind, shots, items, _ in tasks:
        (data / uri).write_text("".join(json.dumps(it) + "\n" for it in items))
        lines += [f"- label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", "  continuation_delimiter: ' '"]
    (folder / "core.yaml").write_text("\n".join(lines) + "\n")
    meta = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?"]
    meta += [f"{label},tiny,{kind},{shots},{len(items)},{rb},yes" for label, _, kind, shots, items, rb in tasks]
    (folder / "eval_meta_data.csv").write_text("\n".join(meta) + "\n")
    (folder / OFFLINE_MARKER).write_text(json.dumps({"made_by": "make_data", "items_per_task": n}) + "\n")


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_tasks(folder: Path, docs: list[str], options: MakeDataOptions, seed: int) -> dict[str, int]:
    """Every task set; each set has its own RNG so changing one size leaves the others alone."""
    o = options
    counts: dict[str, int] = {}

    def put(repo: str, config: str, split: str, rows: list[dict]) -> None:
        _write_parquet(folder / "tasks" / repo / config / f"{split}-00000-of-00001.parquet", rows)
        counts[f"{repo}/{config}/{split}"] = len(rows)

    sections = _sections(docs)
    rng = random.Random(seed + 1)
    chats = _unique(lambda r: smoltalk_conversation(r, sections), lambda c: json.dumps(c), o.chat_train + o.chat_test, rng)
    put("HuggingFaceTB/smol-smoltalk", "data", "train", chats[o.chat_test:])
    put("HuggingFaceTB/smol-smoltalk", "data", "test", chats[: o.chat_test])

    math = _unique(gsm8k_problem, lambda p: p["question"], o.math_train + o.math_test, random.Random(seed + 2))
    put("openai/gsm8k", "main", "train", math[o.math_test:])
    put("openai/gsm8k", "main", "test", math[: o.math_test])

    for offset, subset in ((3, "ARC-Easy"), (4, "ARC-Challenge")):
        r = random.Random(seed + offset)
        challenge = subset == "ARC-Challenge"
        rows = _unique(lambda rr: arc_question(rr, challenge, 0), lambda q: q["question"], o.mc_train + o.mc_test, r)
        for i, row in enumerate(rows):
            row["id"] = row["id"].rsplit("_", 1)[0] + f"_{i:05d}"
        put("allenai/ai2_arc", subset, "train", rows[o.mc_test:])
        put("allenai/ai2_arc", subset, "test", rows[: o.mc_test])

    mmlu = _unique(mmlu_question, lambda q: q["question"], o.mc_train + o.mc_test, random.Random(seed + 5))
    put("cais/mmlu", "all", "test", mmlu[: o.mc_test])
    put("cais/mmlu", "auxiliary_train", "train", [{"train": row} for row in mmlu[o.mc_test:]])

    r = random.Random(seed + 6)
    put("openai/openai_humaneval", "openai_humaneval", "test", [humaneval_problem(r, i) for i in range(20)])

    counts.update(write_identity(folder, o, seed))
    return counts


def write_identity(folder: Path, options: MakeDataOptions, seed: int) -> dict[str, int]:
    train, test = identity_sets(options.model_name, options.identity_train, options.identity_test, random.Random(seed + 7))
    _write_jsonl(folder / "tasks" / "identity" / "train.jsonl", train)
    _write_jsonl(folder / "tasks" / "identity" / "test.jsonl", test)
    return {"identity/train": len(train), "identity/test": len(test)}


# ---- the real data (--source download) ---------------------------------------------------------

# Every split the task loaders read, named by the loaders' own repo and config constants.
REAL_TASK_SPLITS = [
    (smoltalk.REPO, smoltalk.CONFIG, "train"), (smoltalk.REPO, smoltalk.CONFIG, "test"),
    (gsm8k.REPO, gsm8k.CONFIG, "train"), (gsm8k.REPO, gsm8k.CONFIG, "test"),
    (arc.REPO, "ARC-Easy", "train"), (arc.REPO, "ARC-Easy", "test"),
    (arc.REPO, "ARC-Challenge", "train"), (arc.REPO, "ARC-Challenge", "test"),
    (mmlu.REPO, "all", "test"), (mmlu.REPO, "auxiliary_train", "train"),
    (humaneval.REPO, humaneval.CONFIG, "test"),
]


def download_real_data(data_dir: Path, options: MakeDataOptions, emitter: EventEmitter) -> dict[str, Any]:
    """FineWeb-Edu shards, the task splits and the CORE bundle, straight into `data_dir`. Every
    file appears whole (a `.part` renamed, resumed with Range), so a rerun fetches what is missing."""
    shards = list(range(options.fineweb_shards))  # the last is the validation split (dataset.split_shards)
    download_shards(shards, data_dir, options.fineweb_url, options.download_workers)
    emitter.progress(step=1, total=3)
    for repo, config, split in REAL_TASK_SPLITS:
        fetch_split(data_dir, repo, config, split, options.datasets_url)
    emitter.progress(step=2, total=3)
    bundle = data_dir / "eval_bundle"
    if not bundle.is_dir():
        archive = download_file(options.core_bundle_url, data_dir / "eval_bundle.zip")
        with tempfile.TemporaryDirectory(dir=data_dir, prefix=".make_data.tmp-") as tmp:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)  # zipfile drops absolute paths and ".." from member names
            found = next(Path(tmp).rglob("core.yaml"), None)
            if found is None:
                raise ValueError(f"{options.core_bundle_url}: the archive holds no core.yaml")
            os.rename(found.parent, bundle)
        archive.unlink()
    emitter.progress(step=3, total=3)
    return {"source": "download", "shards": len(shards), "task_splits": len(REAL_TASK_SPLITS),
            "bytes": sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())}


# ---- the stage ---------------------------------------------------------------------------------

def make_data(options: MakeDataOptions, emitter: EventEmitter) -> tuple[list, dict[str, Any]]:
    data_dir = Path(options.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    recipe = options.model_dump(mode="json", exclude={"data_dir", "out", "init_from", "job_id", "input_version", "overwrite"})
    stamp = data_dir / STAMP
    if stamp.is_file() and not options.overwrite:
        made = json.loads(stamp.read_text())
        if made.get("recipe") == recipe:
            log(f"{data_dir} already holds this data (same options and seed); reusing it")
            return [], {**made["metrics"], "reused": True}
    produced = ["tasks", "eval_bundle", STAMP]
    existing = sorted(data_dir.glob("shard_*.parquet")) + [data_dir / p for p in produced if (data_dir / p).exists()]
    if options.source == "download":
        return [], _download(data_dir, options, emitter, recipe, existing)
    if existing and not options.overwrite:
        raise FileExistsError(f"{data_dir} already holds other data ({existing[0].name}, ...); pass --overwrite to replace it")
    rng = random.Random(options.seed)
    source = options.source
    if source == "synthetic":
        docs = synthetic_docs(options.synthetic_docs, rng)
    else:
        files = python_doc_files(options.docs_path) if source == "python-docs" else stdlib_files()
        if not files:
            where = options.docs_path if source == "python-docs" else sysconfig.get_paths()["stdlib"]
            raise FileNotFoundError(f"no {source} text files under {where}; use --source stdlib or synthetic")
        docs = [d for f in files for d in split_documents(f.read_text(encoding="utf-8", errors="replace"), options.max_doc_chars)]
    rng.shuffle(docs)
    log(f"{len(docs)} documents from {source}")
    total_steps = 3
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".make_data.tmp-") as tmp:
        staging = Path(tmp)
        corpus = write_corpus(staging, docs, options)
        emitter.progress(step=1, total=total_steps)
        tasks = write_tasks(staging, docs[: -options.val_docs], options, options.seed)
        emitter.progress(step=2, total=total_steps)
        core_bundle(staging / "eval_bundle", docs[-options.val_docs :], options.core_items, random.Random(options.seed + 8))
        emitter.progress(step=3, total=total_steps)
        metrics = {"source": source, **corpus, **{f"tasks/{k}": v for k, v in tasks.items()}}
        (staging / STAMP).write_text(json.dumps({"recipe": recipe, "metrics": metrics}, indent=2) + "\n")
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for entry in sorted(staging.iterdir(), key=lambda e: (e.name == STAMP, e.name)):
            os.rename(entry, data_dir / entry.name)
    log(f"data in {data_dir}: {corpus['shards']} shards, {corpus['chars']:,} chars")
    return [], metrics


def _download(data_dir: Path, options: MakeDataOptions, emitter: EventEmitter, recipe: dict,
              existing: list[Path]) -> dict[str, Any]:
    stamp = data_dir / STAMP
    made_by = json.loads(stamp.read_text()).get("recipe", {}).get("source") if stamp.is_file() else None
    if existing and options.overwrite:
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif made_by not in (None, "download"):
        # The tiny offline data must not mix with the real shards; an earlier download is resumed.
        raise FileExistsError(f"{data_dir} holds make_data's offline data (--source {made_by}); pass --overwrite "
                              "to replace it")
    stamp.unlink(missing_ok=True)
    metrics = download_real_data(data_dir, options, emitter)
    metrics.update({f"tasks/{k}": v for k, v in write_identity(data_dir, options, options.seed).items()})
    stamp.write_text(json.dumps({"recipe": recipe, "metrics": metrics}, indent=2) + "\n")
    log(f"data in {data_dir}: {metrics['shards']} shards, {metrics['task_splits']} task splits, the CORE bundle")
    return metrics


if __name__ == "__main__":
    run_stage("make_data", make_data, rank_zero_only=True)
