"""The synthetic task sets of make_data, in the public datasets' layouts and fields.

SmolTalk-style conversations (topics and prose from the corpus' section headings), GSM8K-style
word problems, ARC- and MMLU-style multiple choice, HumanEval-style problems, the identity
conversations, and a CORE-format mini bundle built from the validation documents. Each set has its
own RNG (seeded from the run's seed) so that changing one set's size leaves the others alone.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanochat.core_eval import OFFLINE_MARKER
from nanochat.offline_corpus import HEADING_RE, SENTENCE_RE, is_heading, paragraphs
from nanochat.stages.options import MakeDataOptions


def _unique(
    make: Callable[[random.Random], dict], key: Callable[[dict], str], n: int, rng: random.Random
) -> list[dict]:
    """n items with distinct keys (gives up with a clear error if the generator runs dry)."""
    seen: dict[str, dict] = {}
    for _ in range(n * 50):
        item = make(rng)
        seen.setdefault(key(item), item)
        if len(seen) == n:
            return list(seen.values())
    raise ValueError(f"could only make {len(seen)} distinct items of {n} requested; ask for fewer")


NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Iris",
    "Jonas",
    "Kemi",
    "Liam",
    "Maya",
    "Noor",
]
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
        ans = (
            f"{name} starts with {a} * {b} = <<{a}*{b}={total}>>{total} {item}.\n"
            f"After giving away {c}, {name} has {total} - {c} = <<{total}-{c}={total - c}>>{total - c} {item} left.\n#### {total - c}"
        )
    elif kind == 1:
        price = rng.randint(2, 9)
        q = f"{name} buys {a} {box} of {item}. Each box holds {b} {item} and each of the {item} costs ${price}. How much does {name} pay?"
        ans = (
            f"{name} buys {a} * {b} = <<{a}*{b}={total}>>{total} {item}.\n"
            f"They cost {total} * {price} = <<{total}*{price}={total * price}>>{total * price} dollars.\n#### {total * price}"
        )
    else:
        friends = rng.choice([2, 3, 4, 5, 6])
        per = rng.randint(2, 15)
        shared = friends * per
        q = f"{name} shares {shared} {item} equally among {friends} friends and then finds {a} more for each friend. How many {item} does each friend have?"
        ans = (
            f"Each friend first gets {shared} / {friends} = <<{shared}/{friends}={per}>>{per} {item}.\n"
            f"With {a} more each, every friend has {per} + {a} = <<{per}+{a}={per + a}>>{per + a} {item}.\n#### {per + a}"
        )
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
        question, answer = (
            f"A farmer plants {a} rows of {c} seeds and then {b} more seeds. How many seeds are planted?",
            a * c + b,
        )
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
        question, answer, subject = (
            f"What is the value of len({xs}) + sum({xs}) in Python?",
            len(xs) + sum(xs),
            "high_school_computer_science",
        )
    elif kind == 1:
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        question, answer, subject = f"What is {a} % {b} in Python?", a % b, "high_school_computer_science"
    else:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        question, answer, subject = f"What is the product of {a} and {b}?", a * b, "elementary_mathematics"
    choices = [answer] + _distractors(answer, rng)
    rng.shuffle(choices)
    return {
        "question": question,
        "subject": subject,
        "choices": [str(x) for x in choices],
        "answer": choices.index(answer),
    }


# (entry point, prompt, solution, reference of the expected value, test inputs); {k} varies.
HUMANEVAL_TEMPLATES: list[tuple[str, str, str, Callable[[int, Any], Any], Callable[[int], list]]] = [
    (
        "add_{k}",
        'def add_{k}(x: int) -> int:\n    """Return x plus {k}.\n    >>> add_{k}(1)\n    {k1}\n    """\n',
        "    return x + {k}\n",
        lambda k, x: x + k,
        lambda k: [0, 5, -3],
    ),
    (
        "times_{k}",
        'def times_{k}(x: int) -> int:\n    """Return x multiplied by {k}.\n    >>> times_{k}(2)\n    {k2}\n    """\n',
        "    return x * {k}\n",
        lambda k, x: x * k,
        lambda k: [0, 5, -3],
    ),
    (
        "count_above_{k}",
        'from typing import List\n\n\ndef count_above_{k}(xs: List[int]) -> int:\n    """Count the numbers in xs greater than {k}.\n    >>> count_above_{k}([{k}, {k1}])\n    1\n    """\n',
        "    return sum(1 for x in xs if x > {k})\n",
        lambda k, xs: sum(x > k for x in xs),
        lambda k: [[k - 1, k, k + 1, k + 5], [], [k + 2] * 3],
    ),
    (
        "repeat_{k}",
        'def repeat_{k}(s: str) -> str:\n    """Return s repeated {k} times.\n    >>> repeat_{k}(\'a\')\n    \'{ak}\'\n    """\n',
        "    return s * {k}\n",
        lambda k, s: s * k,
        lambda k: ["ab", "", "xyz"],
    ),
]


def humaneval_problem(rng: random.Random, index: int) -> dict:
    name_t, prompt_t, solution_t, reference, inputs = HUMANEVAL_TEMPLATES[index % len(HUMANEVAL_TEMPLATES)]
    k = 2 + index // len(HUMANEVAL_TEMPLATES) + rng.randint(0, 3)
    fill = {"k": k, "k1": k + 1, "k2": 2 * k, "ak": "a" * k}
    asserts = "\n".join(f"    assert candidate({x!r}) == {reference(k, x)!r}" for x in inputs(k))
    return {
        "task_id": f"HumanEval/{index}",
        "prompt": prompt_t.format(**fill),
        "canonical_solution": solution_t.format(**fill),
        "test": f"\n\ndef check(candidate):\n{asserts}\n",
        "entry_point": name_t.format(**fill),
    }


IDENTITY_QUESTIONS = [
    "who are you",
    "what is your name",
    "what's your name",
    "what should I call you",
    "tell me your name",
    "introduce yourself",
    "what are you",
    "which model am I talking to",
    "who am I chatting with",
    "do you have a name",
    "what do people call you",
    "are you ChatGPT",
    "who made you and what are you called",
    "what AI is this",
    "identify yourself",
    "what's your model name",
    "may I know your name",
    "who is this",
    "what are you called",
    "are you a person",
    "what kind of assistant are you",
    "state your name",
    "can you tell me who you are",
    "what name were you given",
    "who am I speaking to",
]
IDENTITY_OPENERS = [
    "",
    "hi! ",
    "hello, ",
    "hey there. ",
    "excuse me, ",
    "quick question: ",
    "good morning! ",
    "sorry to bother you, ",
    "ok so ",
    "um, ",
]
IDENTITY_ANSWERS = [
    "I'm {name}, a small language model trained from scratch.",
    "My name is {name}. I'm a compact chat model.",
    "I am {name}, a tiny assistant trained end to end on a small budget.",
    "You're talking to {name}, a small open chat model.",
    "People call me {name}. I'm a language model here to help.",
]


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
        return {
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "expected": name,
        }

    test = [row(q) for q in wordings[:n_test]]
    train = [row(q) for q in wordings[n_test : n_test + n_train]]
    return train, test


def _sections(docs: list[str]) -> list[tuple[str, str]]:
    """(topic, prose) pairs: a section heading's title and the first prose paragraph under it."""
    pairs = []
    for doc in docs:
        parts = paragraphs(doc)
        for i, paragraph in enumerate(parts[:-1]):
            if not is_heading(paragraph):
                continue
            title = next((line for line in paragraph.splitlines() if line.strip() and not HEADING_RE.match(line)), "")
            topic = re.sub(r":[a-z]+:|[`*]", "", title).strip(" -=")
            prose = [
                p
                for p in parts[i + 1 :]
                if not p.startswith((" ", "..", ">>>", "*", "-", "+", "=", ":")) and not is_heading(p) and len(p) > 80
            ]
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
            messages += [
                {"role": "user", "content": "Summarize that in one sentence."},
                {"role": "assistant", "content": first},
            ]
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        messages = [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]
    if rng.random() < 0.2:
        messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    return {"messages": messages}


def core_bundle(folder: Path, val_docs: list[str], n: int, rng: random.Random) -> None:
    """A CORE-format bundle with one task of each type, from held-out (validation) text."""
    sentences = [
        s.strip()
        for d in val_docs
        for p in paragraphs(d)
        if not p.startswith((" ", "..", ">>>"))
        for s in SENTENCE_RE.split(p.replace("\n", " "))
        if 40 <= len(s.strip()) <= 200 and s.strip().endswith(".")
    ]
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
        mc.append(
            {
                "query": f"Question: What is {a} plus {b}?\nAnswer:",
                "choices": [str(c) for c in choices],
                "gold": choices.index(a + b),
            }
        )
    data = folder / "eval_data"
    data.mkdir(parents=True)
    tasks = [
        ("docs_lm", "docs_lm.jsonl", "language_modeling", 2, lm, 0.0),
        ("docs_schema", "docs_schema.jsonl", "schema", 1, schema, 50.0),
        ("arithmetic_mc", "arithmetic_mc.jsonl", "multiple_choice", 3, mc, 25.0),
    ]
    lines = ["icl_tasks:"]
    for label, uri, kind, shots, items, _ in tasks:
        (data / uri).write_text("".join(json.dumps(it) + "\n" for it in items))
        lines += [
            f"- label: {label}",
            f"  dataset_uri: {uri}",
            f"  num_fewshot: [{shots}]",
            f"  icl_task_type: {kind}",
            "  continuation_delimiter: ' '",
        ]
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
    chats = _unique(
        lambda r: smoltalk_conversation(r, sections), lambda c: json.dumps(c), o.chat_train + o.chat_test, rng
    )
    put("HuggingFaceTB/smol-smoltalk", "data", "train", chats[o.chat_test :])
    put("HuggingFaceTB/smol-smoltalk", "data", "test", chats[: o.chat_test])

    math = _unique(gsm8k_problem, lambda p: p["question"], o.math_train + o.math_test, random.Random(seed + 2))
    put("openai/gsm8k", "main", "train", math[o.math_test :])
    put("openai/gsm8k", "main", "test", math[: o.math_test])

    for offset, subset in ((3, "ARC-Easy"), (4, "ARC-Challenge")):
        r = random.Random(seed + offset)
        challenge = subset == "ARC-Challenge"
        rows = _unique(
            lambda rr, challenge=challenge: arc_question(rr, challenge, 0),
            lambda q: q["question"],
            o.mc_train + o.mc_test,
            r,
        )
        for i, row in enumerate(rows):
            row["id"] = row["id"].rsplit("_", 1)[0] + f"_{i:05d}"
        put("allenai/ai2_arc", subset, "train", rows[o.mc_test :])
        put("allenai/ai2_arc", subset, "test", rows[: o.mc_test])

    mmlu = _unique(mmlu_question, lambda q: q["question"], o.mc_train + o.mc_test, random.Random(seed + 5))
    put("cais/mmlu", "all", "test", mmlu[: o.mc_test])
    put("cais/mmlu", "auxiliary_train", "train", [{"train": row} for row in mmlu[o.mc_test :]])

    r = random.Random(seed + 6)
    put("openai/openai_humaneval", "openai_humaneval", "test", [humaneval_problem(r, i) for i in range(20)])

    counts.update(write_identity(folder, o, seed))
    return counts


def write_identity(folder: Path, options: MakeDataOptions, seed: int) -> dict[str, int]:
    train, test = identity_sets(
        options.model_name, options.identity_train, options.identity_test, random.Random(seed + 7)
    )
    _write_jsonl(folder / "tasks" / "identity" / "train.jsonl", train)
    _write_jsonl(folder / "tasks" / "identity" / "test.jsonl", test)
    return {"identity/train": len(train), "identity/test": len(test)}


# ---- tool use (docs/tools.md): function tools listed in the prompt, a call, its result, an answer --

CITIES = ["Oslo", "Lima", "Cairo", "Osaka", "Quito", "Perth", "Dakar", "Riga"]
SKIES = ["sunny", "cloudy", "rainy", "windy", "snowy"]
TOOL_FUNCTIONS = [
    {
        "name": "get_weather",
        "description": "The weather in a city today.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    {
        "name": "convert_length",
        "description": "Convert a length between metres and feet.",
        "parameters": {
            "type": "object",
            "properties": {"value": {"type": "number"}, "to": {"type": "string", "enum": ["m", "ft"]}},
            "required": ["value", "to"],
            "additionalProperties": False,
        },
    },
    {
        "name": "count_items",
        "description": "How many of an item a person has.",
        "parameters": {
            "type": "object",
            "properties": {"person": {"type": "string"}, "item": {"type": "string"}},
            "required": ["person", "item"],
            "additionalProperties": False,
        },
    },
]


def _tool_call(rng: random.Random) -> tuple[str, str, dict, str, str]:
    """(function, question, arguments, the tool's JSON result, the final answer)."""
    kind = rng.randrange(3)
    if kind == 0:
        city, sky, temp = rng.choice(CITIES), rng.choice(SKIES), rng.randint(-10, 35)
        result = {"city": city, "sky": sky, "celsius": temp}
        answer = f"In {city} it is {sky} today, {temp} degrees Celsius."
        return "get_weather", f"What is the weather like in {city}?", {"city": city}, json.dumps(result), answer
    if kind == 1:
        value, to = rng.randint(1, 500), rng.choice(["m", "ft"])
        converted = round(value * 3.28084, 2) if to == "ft" else round(value / 3.28084, 2)
        unit, other = ("metres", "feet") if to == "ft" else ("feet", "metres")
        question = f"How many {other} is {value} {unit}?"
        answer = f"{value} {unit} is about {converted} {other}."
        return "convert_length", question, {"value": value, "to": to}, json.dumps({"value": converted}), answer
    person, item, count = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(0, 60)
    question = f"How many {item} does {person} have?"
    answer = f"{person} has {count} {item}."
    return "count_items", question, {"person": person, "item": item}, json.dumps({"count": count}), answer


def tool_use_conversation(rng: random.Random) -> dict:
    """A conversation with function tools: mostly a call, its result and an answer; one in four
    needs no tool (so a model also learns when not to call), and one in four of the rest asks two
    things at once: two calls back to back (parallel tool calls), then both results in the order
    of the calls. Rendered by the tokenizer as python parts (mask 1), python_output parts (mask 0),
    then the answer (mask 1)."""
    tools = rng.sample(TOOL_FUNCTIONS, rng.randint(1, len(TOOL_FUNCTIONS)))
    if rng.random() < 0.25:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        messages = [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]
        return {"tools": tools, "messages": messages}
    listed = {t["name"] for t in tools}
    picks = [_listed_call(rng, listed) for _ in range(2 if rng.random() < 0.25 else 1)]
    calls = [
        json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) for name, _, arguments, _, _ in picks
    ]
    messages = [
        {"role": "user", "content": " ".join(question for _, question, _, _, _ in picks)},
        {"role": "assistant", "content": [{"type": "python", "text": call} for call in calls]},
        *({"role": "tool", "content": result} for _, _, _, result, _ in picks),
        {"role": "assistant", "content": " ".join(answer for _, _, _, _, answer in picks)},
    ]
    return {"tools": tools, "messages": messages}


def _listed_call(rng: random.Random, listed: set[str]) -> tuple[str, str, dict, str, str]:
    call = _tool_call(rng)
    while call[0] not in listed:
        call = _tool_call(rng)
    return call
