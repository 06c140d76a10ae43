"""Task loaders: public datasets' formats read from a local folder, rendered as conversations.

Each module holds one dataset (`smoltalk`, `mmlu`, `arc`, `gsm8k`, `humaneval`, `customjson` for
JSONL conversations and the identity set); `common` has the `Task` base, the file layout, the
multiple-choice rendering and `TaskMixture`; `mixtures` builds the mid and SFT mixtures of the spec.
"""
