"""Import a Hugging Face transformers NanoChat model (a folder or a Hub repo) as our checkpoint.

    python -m nanochat.hf_import ./some-hf-folder --out ckpt/ [--register nanochat] [--stage sft]
    python -m nanochat.hf_import karpathy/nanochat-d32 --revision main --out ckpt/ --register nanochat

A source that is not a local folder is a Hub repo id, fetched with huggingface_hub's
`snapshot_download` (config, weights, tokenizer files only). The config must be one our GPT runs
(`nanochat.hf_mapping.gpt_config` names what it cannot), transformers must load every weight with
none missing, unexpected or reshaped, the tensors must match ours name for name, and the tokenizer
must be a nanochat BPE (`nanochat.hf_tokenizer.from_hf_tokenizer`). Before the checkpoint is
written, our GPT and transformers' model score a probe conversation and must agree within 1e-4.
The result is an ordinary checkpoint folder (inference serves it), optionally registered as a
version (stage sft unless --stage; lineage "imported from <source>", see `nanochat.imported`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from nanochat.gpt import GPTConfig
from nanochat.hf_export import LOGIT_TOLERANCE, PROBE, check_paths
from nanochat.hf_mapping import FP32_EPS, ArchitectureMismatch, check_same_shapes, gpt_config, our_name
from nanochat.hf_tokenizer import check_same_encoding, from_hf_tokenizer, require_hf
from nanochat.imported import (
    add_register_args,
    build_gpt,
    check_stage,
    expected_shapes,
    import_meta,
    register,
    registry_errors,
    write_imported,
)
from nanochat.tokenizer import Tokenizer

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.md"]


def fetch(source: str, revision: str | None = None, cache_dir: str | None = None) -> tuple[Path, dict[str, Any]]:
    """A local folder for `source` (a folder, or a Hub repo id downloaded) and where it came from."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path, {"format": "transformers", "path": str(path.resolve())}
    if not REPO_ID.match(source):
        raise FileNotFoundError(f"{source} is neither a folder nor a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    local = snapshot_download(repo_id=source, revision=revision, allow_patterns=HUB_FILES, cache_dir=cache_dir)
    return Path(local), {"format": "transformers", "hub_repo": source, "revision": revision or "main"}


def check_tokenizer(folder: Path, tokenizer: Tokenizer) -> bool | None:
    """Refuse a tokenizer.json that encodes text otherwise than our reading of it; say whether the
    source's chat template (None: it has none) renders a conversation to our ids, as what inference
    serves is our rendering."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(folder)
    check_same_encoding(tokenizer, hf_tok, [m["content"] for m in PROBE if isinstance(m["content"], str)])
    if not getattr(hf_tok, "chat_template", None):
        return None
    conversation = [PROBE[1], {"role": "assistant", "content": "It is 21."}, PROBE[3]]
    try:
        rendered = hf_tok.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
    except Exception:  # a template's own raise_exception or a Jinja error: it does not render ours
        return False
    return list(rendered["input_ids"]) == tokenizer.render_for_completion(conversation)


def load_hf_model(folder: Path) -> tuple[GPTConfig, Any]:
    """Our config and transformers' NanoChatForCausalLM (fp32) of `folder`; a config ours cannot
    run is refused before any weight is read, and so is any weight transformers skipped or invented."""
    from transformers import NanoChatConfig, NanoChatForCausalLM

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    config = gpt_config(NanoChatConfig.from_pretrained(folder))
    try:
        model, info = NanoChatForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    except RuntimeError as e:
        raise ArchitectureMismatch(f"import: transformers could not load the weights of {folder}: {e}") from e
    problems = [f"{kind} {', '.join(map(str, keys))}" for kind, keys in info.items() if keys and kind != "error_msgs"]
    if problems or info.get("error_msgs"):
        raise ArchitectureMismatch(
            f"import: transformers could not load {folder} weight for weight: "
            + "; ".join(problems + list(info.get("error_msgs") or []))
        )
    return config, model.eval()


def import_hf(
    source: str,
    out: str | os.PathLike,
    stage: str = "sft",
    revision: str | None = None,
    cache_dir: str | None = None,
    replace: bool = False,
) -> Path:
    """Write our checkpoint folder of the transformers NanoChat `source` to `out`."""
    check_paths(None, out, replace)
    require_hf("the Hugging Face import")
    check_stage(stage)
    folder, details = fetch(source, revision, cache_dir)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{source} has no tokenizer.json; a nanochat import needs the model's tokenizer")
    tokenizer = from_hf_tokenizer(folder / "tokenizer.json")
    template_matches = check_tokenizer(folder, tokenizer)
    config, hf_model = load_hf_model(folder)
    theirs = dict(hf_model.state_dict())
    check_same_shapes(expected_shapes(config), {n: t.shape for n, t in theirs.items()}, "import")
    # Tied embeddings (a config may ask for them) are one tensor; ours are two, so lm_head gets a copy.
    model = build_gpt(config, {our_name(n): t.clone() for n, t in theirs.items()}, source)
    checks = compare_on_probe(hf_model, model, tokenizer)
    label = f"hf:{details['hub_repo']}@{details['revision']}" if "hub_repo" in details else f"hf:{details['path']}"
    details = {**details, **checks, "chat_template_matches_ours": template_matches}
    meta = import_meta(label, "hf_import", stage, details)
    return write_imported(out, model, tokenizer, meta, replace)


def compare_on_probe(hf_model: Any, model: Any, tokenizer: Any) -> dict[str, float]:
    """Score the probe with both models; refuse when the weights did not carry over exactly.

    Our rmsnorm's epsilon is fp32's; the source's may be larger (transformers' default is 1e-6),
    a real but tiny difference in the computation. The weights are checked with transformers'
    norms set to our epsilon (within 1e-4); the difference the epsilon makes is recorded."""
    ids = torch.tensor([tokenizer.render_conversation(PROBE, max_tokens=model.config.sequence_len)[0]])
    norms = [m for m in hf_model.modules() if type(m).__name__ == "NanoChatRMSNorm"]
    source_eps = hf_model.config.rms_norm_eps
    with torch.no_grad():
        ours = model(ids)
        with_source_eps = float((hf_model(ids).logits.float() - ours).abs().max())
        for norm in norms:
            norm.variance_epsilon = FP32_EPS
        diff = float((hf_model(ids).logits.float() - ours).abs().max())
    if not diff <= LOGIT_TOLERANCE:
        raise ArchitectureMismatch(
            f"import: our GPT scores the probe {diff:.3g} away from transformers' model (tolerance {LOGIT_TOLERANCE})"
        )
    return {"probe_max_logit_diff": diff, "source_rms_norm_eps": source_eps, "probe_diff_source_eps": with_source_eps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanochat.hf_import", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a transformers folder, or a Hugging Face Hub repo id (owner/name)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of a repo id")
    p.add_argument("--cache-dir", help="huggingface_hub cache folder")
    p.add_argument("--stage", default="sft", help="registry stage of the imported model (default sft)")
    add_register_args(p)
    args = p.parse_args(argv)
    try:
        folder = import_hf(args.source, args.out, args.stage, args.revision, args.cache_dir, args.replace)
        print(register(folder, args))
    except (ValueError, OSError, ImportError, *registry_errors()) as e:
        print(f"hf_import: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
