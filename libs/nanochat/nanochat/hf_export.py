"""Export a checkpoint (a local folder or a registry version) as a Hugging Face transformers folder.

    python -m nanochat.hf_export CHECKPOINT_FOLDER --out hf/
    python -m nanochat.hf_export --registry URL --name nanochat [--version 7 | --alias serving] --out hf/

The folder holds what `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` read: `config.json`
(`model_type: nanochat`), `model.safetensors` (fp32, transformers' tensor names),
`generation_config.json` (stops at `<|assistant_end|>` or `<|bos|>`), `tokenizer.json` +
`tokenizer_config.json` + `chat_template.jinja` (`nanochat.hf_tokenizer`), and the model card
`README.md` (`nanochat.model_card`). It is written to a temp folder and renamed into place only
after a check: transformers loads it back, its chat template renders a probe conversation to our
ids, and its logits on that probe equal ours within 1e-4. A model whose tensors or settings have
no counterpart in transformers' NanoChat is refused with a message naming each difference
(`nanochat.hf_mapping`). transformers is nanochat's optional extra `hf`, imported lazily; the
registry export needs the `registry-client` package (the trainer and the dev environment have it).
The registry URL and token default to $NANOCHAT_REGISTRY_URL and $NANOCHAT_REGISTRY_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from nanochat.artifacts import atomic_folder
from nanochat.checkpoint import META_FILE, VOCAB_ROWS, Checkpoint, load_checkpoint
from nanochat.gpt import GPTConfig
from nanochat.hf_mapping import ArchitectureMismatch, check_same_shapes, hf_config, hf_name
from nanochat.hf_tokenizer import TokenizerMismatch, check_same_encoding, require_hf, to_hf_tokenizer
from nanochat.imported import registry_client, registry_errors
from nanochat.model_card import CardFacts, render_card

LOGIT_TOLERANCE = 1e-4
PROBE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 7*3? Answer briefly, please."},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me compute it: "},
            {"type": "python", "text": "7*3"},
            {"type": "python_output", "text": "21"},
            {"type": "text", "text": " so it is 21."},
        ],
    },
    {"role": "user", "content": "Thanks! And  the   spaces\n\nand newlines? 12345 héllo"},
]


def export_checkpoint(
    folder: str | os.PathLike, out: str | os.PathLike, facts: CardFacts | None = None, replace: bool = False
) -> Path:
    """Write the transformers folder of checkpoint `folder` to `out`, checked before it appears."""
    check_paths(folder, out, replace)
    require_hf("the Hugging Face export")
    from transformers import GenerationConfig, NanoChatForCausalLM

    ckpt = load_checkpoint(folder)
    if ckpt.tokenizer is None:
        raise ValueError(f"{folder} holds no tokenizer/ folder; an export needs the model's tokenizer")
    vocab = ckpt.config.vocab_size
    state = {n: (t[:vocab] if n in VOCAB_ROWS else t).detach().float() for n, t in ckpt.model.state_dict().items()}
    fc1 = state.get("transformer.h.0.mlp.c_fc.weight")
    config = hf_config(
        ckpt.config, ckpt.tokenizer, mlp_width=fc1.shape[0] if fc1 is not None else 4 * ckpt.config.n_embd
    )
    with torch.device("meta"):
        hf_model = NanoChatForCausalLM(config)
    theirs = {n: t.shape for n, t in hf_model.state_dict().items()}
    check_same_shapes({n: t.shape for n, t in state.items()}, theirs, "export")
    hf_model.load_state_dict({hf_name(n): t.contiguous() for n, t in state.items()}, strict=True, assign=True)
    assistant_end = ckpt.tokenizer.encode_special("<|assistant_end|>")
    hf_model.generation_config = GenerationConfig(
        bos_token_id=ckpt.tokenizer.bos_token_id,
        eos_token_id=[assistant_end, ckpt.tokenizer.bos_token_id],
        pad_token_id=assistant_end,
    )
    facts = facts or facts_from_meta(Path(folder).name, ckpt.meta)
    facts.architecture = facts.architecture or architecture_facts(ckpt.config, sum(t.numel() for t in state.values()))
    with atomic_folder(out, replace=replace) as tmp:
        hf_model.save_pretrained(tmp)
        to_hf_tokenizer(ckpt.tokenizer).save_pretrained(tmp)
        (tmp / "README.md").write_text(render_card(facts), encoding="utf-8")
        verify_export(tmp, ckpt)
    return Path(out)


def check_paths(folder: str | os.PathLike | None, out: str | os.PathLike, replace: bool) -> None:
    """Fail in a moment, before transformers is imported or a model loaded, on a path that cannot work."""
    if folder is not None and not Path(folder).is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if Path(out).exists() and not replace:
        raise FileExistsError(f"output folder {out} already exists (pass --replace to overwrite)")


def verify_export(folder: Path, ckpt: Checkpoint) -> float:
    """Load `folder` with transformers; raise unless it renders and scores the probe as we do.
    Returns the largest logit difference."""
    from transformers import AutoTokenizer, NanoChatForCausalLM

    hf_tok = AutoTokenizer.from_pretrained(folder)
    ours = ckpt.tokenizer
    check_same_encoding(ours, hf_tok, [PROBE[1]["content"], PROBE[3]["content"], " leading space, trailing \n"])
    renders = {False: ours.render_conversation(PROBE, max_tokens=None)[0], True: ours.render_for_completion(PROBE)}
    for add_prompt, want in renders.items():
        got = list(hf_tok.apply_chat_template(PROBE, tokenize=True, add_generation_prompt=add_prompt)["input_ids"])
        if got != want:
            raise TokenizerMismatch(
                f"the exported chat template renders the probe to {got[:16]}..., ours {want[:16]}..."
            )
    model = NanoChatForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([ours.render_conversation(PROBE, max_tokens=ckpt.config.sequence_len)[0]])
    with torch.no_grad():
        diff = float((model(ids).logits.float() - ckpt.model(ids)).abs().max())
    if not diff <= LOGIT_TOLERANCE:
        raise ArchitectureMismatch(
            f"export: transformers' NanoChat scores the probe {diff:.3g} away from our GPT (tolerance "
            f"{LOGIT_TOLERANCE}): the tensors map one to one, so the computation differs (has gpt.py changed?)"
        )
    return diff


def architecture_facts(c: GPTConfig, parameters: int) -> dict[str, Any]:
    return {
        "parameters": f"{parameters:,}",
        "layers": c.n_layer,
        "width": c.n_embd,
        "heads (query / key-value)": f"{c.n_head} / {c.n_kv_head}",
        "vocabulary": c.vocab_size,
        "training context": c.sequence_len,
    }


def facts_from_meta(name: str, meta: dict[str, Any]) -> CardFacts:
    """Card facts of a local checkpoint from its meta.json (its lineage: where it was imported
    from, its parent version, itself)."""
    stage = meta.get("stage")
    steps = [s for s in (meta.get("lineage"), meta.get("parent")) if s]
    made = f"{name} ({stage}, made by {meta.get('made_by', 'unknown')})"
    return CardFacts(
        name=name,
        stage=stage,
        lineage=[*steps, made],
        stages=_stages_up_to(stage),
        metrics=dict(meta.get("metrics") or {}),
        options=dict(meta.get("options") or {}),
    )


def _stages_up_to(stage: str | None) -> list[str]:
    order = ["base", "mid", "sft", "rl"]
    return order[: order.index(stage) + 1] if stage in order else []


def export_version(
    out: str | os.PathLike,
    name: str,
    version: int | None = None,
    alias: str | None = None,
    stage: str | None = None,
    registry: str | None = None,
    token: str | None = None,
    cache_dir: str | None = None,
    replace: bool = False,
) -> Path:
    """Export a registry version (a number, an alias, or the serving rule over `stage`)."""
    check_paths(None, out, replace)
    with registry_client(registry, token, cache_dir) as rc:
        info = rc.get_version(name, version) if version is not None else rc.resolve(name, stage, alias)
        folder = rc.download(name, info.version)
        family = rc.lineage(name, info.version)
        chain = [*reversed(family["parents"]), family["version"]]
        report = _report_card(rc, [family["version"], *family["parents"], *family["children"]])
    meta = json.loads((folder / META_FILE).read_text())
    facts = facts_from_meta(f"{name}-v{info.version}", {**meta, "metrics": {**meta.get("metrics", {}), **info.metrics}})
    facts.lineage = [f"{v['name']}:{v['version']} ({v['stage']})" for v in chain]
    if meta.get("lineage"):
        facts.lineage.insert(0, meta["lineage"])
    facts.stages = [v["stage"] for v in chain]
    facts.report_md = report
    return export_checkpoint(folder, out, facts, replace=replace)


def _report_card(rc: Any, versions: list[dict[str, Any]]) -> str | None:
    """The first report card attached to one of `versions` (the version itself first)."""
    for v in versions:
        if any(a["path"] == "report.md" for a in v.get("attachments", [])):
            return rc.read_attachment(v["name"], v["version"], "report.md").decode("utf-8", "replace")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanochat.hf_export", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", help="a local checkpoint folder (or use --name with a registry)")
    p.add_argument("--out", required=True, help="the transformers folder to write")
    p.add_argument("--replace", action="store_true", help="replace --out when it exists")
    p.add_argument("--registry", help="registry URL (default $NANOCHAT_REGISTRY_URL)")
    p.add_argument("--token", help="registry token (default $NANOCHAT_REGISTRY_TOKEN)")
    p.add_argument("--name", help="registry model name")
    p.add_argument("--version", type=int, help="registry version number")
    p.add_argument("--alias", help="registry alias, e.g. serving")
    p.add_argument("--stage", help="registry stages for the serving rule, e.g. sft,rl (default sft,rl)")
    p.add_argument("--cache-dir", help="registry download cache")
    args = p.parse_args(argv)
    if (args.folder is None) == (args.name is None):
        p.error("give either a checkpoint FOLDER or --name (a registry model)")
    try:
        if args.folder:
            out = export_checkpoint(args.folder, args.out, replace=args.replace)
        else:
            out = export_version(
                args.out,
                args.name,
                args.version,
                args.alias,
                args.stage,
                args.registry,
                args.token,
                args.cache_dir,
                args.replace,
            )
    except (ValueError, OSError, ImportError, *registry_errors()) as e:
        print(f"hf_export: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
