"""The model card (README.md) of a Hugging Face export: lineage, data, evals and `model-index` metadata.

`render_card(CardFacts(...))` writes the Hub's format: a YAML front matter (library, pipeline,
tags, license and `model-index` with one result per eval metric, built by huggingface_hub's
`ModelCardData`/`EvalResult`), then markdown: how to load it, the lineage (registry versions from
the root down, or "imported from ..."), the data each stage trained on, the eval table (the report
card's summary when the version has one, else its recorded metrics) and the architecture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from nanochat.report import SUMMARY_ROWS

# The public sets behind each metric (NANOCHAT_SPEC "Data" and "Evaluation"): (hub id, config, split).
EVAL_DATASETS: dict[str, tuple[str, str | None, str]] = {
    "val_bpb": ("karpathy/fineweb-edu-100b-shuffle", None, "validation"),
    "core": ("mlfoundations/dclm-core-eval-bundle", None, "test"),
    "ARC-Easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "ARC-Challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "MMLU": ("cais/mmlu", "all", "test"),
    "GSM8K": ("openai/gsm8k", "main", "test"),
    "HumanEval": ("openai/openai_humaneval", None, "test"),
}
STAGE_DATA = {
    "base": "pretraining on FineWeb-Edu (karpathy/fineweb-edu-100b-shuffle), or the offline corpus of a tiny run",
    "mid": "midtraining on SmolTalk, MMLU auxiliary_train and GSM8K conversations",
    "sft": "supervised fine-tuning on ARC-Easy, ARC-Challenge, GSM8K and SmolTalk",
    "rl": "reinforcement learning on GSM8K (on-policy REINFORCE)",
}


@dataclass
class CardFacts:
    """What the card says; everything but the name is optional."""

    name: str
    stage: str | None = None
    lineage: list[str] = field(default_factory=list)  # root first, e.g. ["nanochat:1 (tokenizer)", ...]
    stages: list[str] = field(default_factory=list)  # the stages of the lineage, for the data section
    metrics: dict[str, Any] = field(default_factory=dict)
    report_md: str | None = None
    architecture: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def summary_section(report_md: str) -> str | None:
    """The report card's "## Summary" section (its eval table), without the heading."""
    match = re.search(r"^## Summary\n(.*?)(?=^## |\Z)", report_md, flags=re.M | re.S)
    return match.group(1).strip() if match else None


def eval_rows(metrics: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(label, key, value) of each summary metric the version recorded, in the report card's order."""
    rows = []
    for label, key in SUMMARY_ROWS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((label, key, float(value)))
    return rows


def _card_data(facts: CardFacts) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    for label, key, value in eval_rows(facts.metrics):
        dataset = EVAL_DATASETS.get(key.split("/")[0])
        if dataset is None:
            continue
        dataset_id, config, split = dataset
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=dataset_id,
                dataset_name=label,
                dataset_config=config,
                dataset_split=split,
                metric_type="bpb" if key == "val_bpb" else "accuracy",
                metric_name=label,
                metric_value=round(value, 6),
            )
        )
    return ModelCardData(
        model_name=facts.name,
        library_name="transformers",
        pipeline_tag="text-generation",
        license="mit",
        language=["en"],
        tags=["nanochat", "nanochat-platform"] + ([facts.stage] if facts.stage else []),
        eval_results=results or None,
    )


def render_card(facts: CardFacts) -> str:
    """README.md text: YAML metadata (model-index included when there are evals), then the card."""
    lines = [
        f"# {facts.name}",
        "",
        "A nanochat model (Karpathy's nanochat recipe) trained or imported by nanochat-platform, exported "
        "for Hugging Face transformers (`model_type: nanochat`).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        'ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,',
        '                                    return_tensors="pt", return_dict=True)',
        "out = model.generate(**ids, max_new_tokens=64, do_sample=False)",
        "```",
        "",
        "## Lineage",
        "",
    ]
    lines += [f"{i + 1}. {step}" for i, step in enumerate(facts.lineage)] or ["Not recorded."]
    lines += ["", "## Data", ""]
    data = [f"- {stage}: {STAGE_DATA[stage]}" for stage in facts.stages if stage in STAGE_DATA]
    if facts.options.get("data_dir"):
        data.append(f"- data folder of the last stage: `{facts.options['data_dir']}`")
    lines += data or ["Not recorded."]
    lines += ["", "## Evaluation", ""]
    summary = summary_section(facts.report_md) if facts.report_md else None
    if summary:
        lines += ["From the lineage's report card:", "", summary]
    elif rows := eval_rows(facts.metrics):
        lines += ["| Metric | Value |", "|---|---|"] + [f"| {label} | {value:.4f} |" for label, _, value in rows]
    else:
        lines.append("No evals recorded for this version.")
    if facts.architecture:
        lines += ["", "## Architecture", ""]
        lines += [f"- {key}: {value}" for key, value in facts.architecture.items()]
    body = "\n".join(lines) + "\n"
    return f"---\n{_card_data(facts).to_yaml()}\n---\n\n{body}"
