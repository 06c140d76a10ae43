"""How our GPT maps onto transformers' NanoChat architecture, and what does not map.

Both are the nanochat model (NANOCHAT_SPEC "Model"): untied embedding and lm_head, parameter-free
rmsnorm after the embedding, before each sublayer and before lm_head, rotary (half split, base
10,000) applied before the per-head QK-norm, grouped-query attention, a relu(x)^2 MLP without
biases, logits soft-capped at 15. The names differ (`transformer.h.{i}.attn.c_q` is
`model.layers.{i}.self_attn.q_proj`, ...), and one constant: our rmsnorm's epsilon is the dtype's
(torch's default, 1.19e-7 in fp32), transformers' a config value, so an export writes
`rms_norm_eps` = fp32's epsilon and an import accepts epsilons up to `MAX_EPS` (their effect is
far below 1e-4 on normed activations).

`check_same_shapes` compares the tensors the two models hold, name by name, so a model of another
shape (an extra tensor, a missing one, another width) is refused with a message naming each
difference; `hf_config` and `gpt_config` translate the configs and refuse the settings ours cannot
express (another activation, softcap, rotary, biases).
"""

from __future__ import annotations

from typing import Any

import torch

from nanochat.gpt import ROTARY_BASE, SOFTCAP, GPTConfig
from nanochat.tokenizer import Tokenizer

MODEL_TYPE = "nanochat"
FP32_EPS = float(torch.finfo(torch.float32).eps)
MAX_EPS = 1e-5
LAYER_NAMES = {
    "attn.c_q.weight": "self_attn.q_proj.weight",
    "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_proj.weight": "mlp.fc2.weight",
}
TOP_NAMES = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}


class ArchitectureMismatch(ValueError):
    """The two architectures differ; the message names each difference."""


def hf_name(ours: str) -> str | None:
    """The transformers name of one of our tensor names (None when it has no counterpart)."""
    if ours in TOP_NAMES:
        return TOP_NAMES[ours]
    parts = ours.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["transformer", "h"] and parts[2].isdigit() and parts[3] in LAYER_NAMES:
        return f"model.layers.{parts[2]}.{LAYER_NAMES[parts[3]]}"
    return None


def our_name(hf: str) -> str | None:
    """The inverse of `hf_name`."""
    for ours, theirs in TOP_NAMES.items():
        if hf == theirs:
            return ours
    parts = hf.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        for ours, theirs in LAYER_NAMES.items():
            if parts[3] == theirs:
                return f"transformer.h.{parts[2]}.{ours}"
    return None


def check_same_shapes(ours: dict[str, torch.Size], theirs: dict[str, torch.Size], direction: str) -> None:
    """Raise ArchitectureMismatch naming every tensor one side has and the other lacks or shapes otherwise.

    `ours` is keyed by our names, `theirs` by transformers' names; `direction` says which way the
    weights go, for the message."""
    problems = []
    mapped = {}
    for name, shape in ours.items():
        target = hf_name(name)
        if target is None:
            problems.append(f"our tensor {name} {tuple(shape)} has no counterpart in transformers' NanoChat")
        else:
            mapped[target] = (name, shape)
    for target, shape in theirs.items():
        if target not in mapped:
            problems.append(f"transformers' tensor {target} {tuple(shape)} has no counterpart in our GPT")
        elif tuple(mapped[target][1]) != tuple(shape):
            problems.append(f"{mapped[target][0]} is {tuple(mapped[target][1])} here but {target} is {tuple(shape)}")
    problems += [
        f"our tensor {name} has no place in transformers' model" for t, (name, _) in mapped.items() if t not in theirs
    ]
    if problems:
        raise ArchitectureMismatch(f"{direction}: the architectures differ: " + "; ".join(sorted(problems)))


def hf_config(config: GPTConfig, tokenizer: Tokenizer, mlp_width: int) -> Any:
    """The transformers NanoChatConfig of our model and tokenizer."""
    from transformers import NanoChatConfig

    if tokenizer.vocab_size != config.vocab_size:
        raise ArchitectureMismatch(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab is {config.vocab_size}"
        )
    return NanoChatConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=mlp_width,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.sequence_len,
        hidden_act="relu2",
        rms_norm_eps=FP32_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": float(ROTARY_BASE)},
        final_logit_softcapping=SOFTCAP,
        attention_bias=False,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.encode_special("<|assistant_end|>"),
        pad_token_id=tokenizer.encode_special("<|assistant_end|>"),
        architectures=["NanoChatForCausalLM"],
    )


def gpt_config(hf: Any) -> GPTConfig:
    """Our GPTConfig of a transformers NanoChatConfig; settings ours cannot run are refused by name."""
    problems = []
    if getattr(hf, "model_type", None) != MODEL_TYPE:
        problems.append(f"model_type is {getattr(hf, 'model_type', None)!r}, not {MODEL_TYPE!r}")
    if hf.hidden_act != "relu2":
        problems.append(f"hidden_act is {hf.hidden_act!r}; ours is relu2 (relu(x)^2)")
    if hf.attention_bias:
        problems.append("attention_bias is set; ours has no biases")
    if hf.final_logit_softcapping != SOFTCAP:
        problems.append(f"final_logit_softcapping is {hf.final_logit_softcapping}; ours is {SOFTCAP}")
    rope = dict(hf.rope_parameters or {})
    if rope.get("rope_type", "default") != "default" or float(rope.get("rope_theta", 0)) != float(ROTARY_BASE):
        problems.append(f"rope_parameters are {rope}; ours are the default rotary with theta {ROTARY_BASE}")
    if not 0 < hf.rms_norm_eps <= MAX_EPS:
        problems.append(
            f"rms_norm_eps is {hf.rms_norm_eps}; ours is fp32's epsilon ({FP32_EPS:.3g}), at most {MAX_EPS}"
        )
    if hf.intermediate_size != 4 * hf.hidden_size:
        problems.append(f"intermediate_size is {hf.intermediate_size}; ours is 4 x hidden_size = {4 * hf.hidden_size}")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim is not None and head_dim * hf.num_attention_heads != hf.hidden_size:
        problems.append(f"head_dim {head_dim} x {hf.num_attention_heads} heads is not hidden_size {hf.hidden_size}")
    if problems:
        raise ArchitectureMismatch("import: the architectures differ: " + "; ".join(problems))
    config = GPTConfig(
        sequence_len=hf.max_position_embeddings,
        vocab_size=hf.vocab_size,
        n_layer=hf.num_hidden_layers,
        n_head=hf.num_attention_heads,
        n_kv_head=hf.num_key_value_heads or hf.num_attention_heads,
        n_embd=hf.hidden_size,
    )
    try:
        config.validate()
    except ValueError as e:
        raise ArchitectureMismatch(f"import: {e}") from e
    return config
