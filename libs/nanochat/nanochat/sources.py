"""Where the public data of the recipe is downloaded from (the original's paths).

No imports: the stage options (torch-free, read by the trainer API) default to these, and the
downloaders in `nanochat.dataset` and `nanochat.tasks` use them.
"""

# FineWeb-Edu 100BT, shuffled and repacked: shard_00000.parquet .. shard_01822.parquet.
FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
FINEWEB_LAST_SHARD = 1822
# Hugging Face datasets: REPO/resolve/main/CONFIG/SPLIT-00000-of-00001.parquet.
HF_DATASETS_URL = "https://huggingface.co/datasets"
# The CORE eval bundle (DCLM's tasks in nanochat's layout): a zip holding eval_bundle/.
CORE_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
