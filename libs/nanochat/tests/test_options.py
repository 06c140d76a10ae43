"""nanochat.stages.options and cli: the registry, presets, JSON Schema, flag parsing, exit code 2."""

import json
import subprocess
import sys

import pytest
from nanochat.stages.cli import OptionsError, parse_options
from nanochat.stages.options import PIPELINES, PRESETS, STAGES, BaseTrainOptions, plan_horizon, stage_schemas

ALL_STAGES = [
    "make_data",
    "tok_train",
    "tok_eval",
    "base_train",
    "base_loss",
    "base_eval",
    "mid_train",
    "chat_sft",
    "chat_rl",
    "chat_eval",
    "report",
    "hf_export",
]


def test_registry_has_every_stage_with_contract_output_stages():
    assert sorted(STAGES) == sorted(ALL_STAGES)
    outputs = {name: info.output_stage for name, info in STAGES.items() if info.output_stage}
    assert outputs == {
        "tok_train": "tokenizer",
        "base_train": "base",
        "mid_train": "mid",
        "chat_sft": "sft",
        "chat_rl": "rl",
    }
    assert PIPELINES["speedrun"] == [
        "make_data",
        "tok_train",
        "tok_eval",
        "base_train",
        "base_loss",
        "base_eval",
        "mid_train",
        "chat_eval",
        "chat_sft",
        "chat_eval",
        "chat_rl",
        "chat_eval",
        "report",
    ]


def test_schemas_are_json_and_every_field_is_described():
    schemas = stage_schemas()
    assert [s["name"] for s in schemas] == list(STAGES)
    for entry in schemas:
        json.dumps(entry)
        assert entry["description"]
        for field, prop in entry["options_schema"]["properties"].items():
            assert prop.get("description"), f"{entry['name']}.{field} has no description"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_validate_for_every_stage(preset):
    assert set(PRESETS[preset]) == set(STAGES)
    for stage in STAGES:
        options = parse_options(stage, ["--preset", preset])
        for key, value in PRESETS[preset][stage].items():
            assert getattr(options, key) == value


def test_tiny_base_train_is_the_cpu_shape():
    options = parse_options("base_train", ["--preset", "tiny"])
    assert (options.depth, options.max_seq_len) == (4, 256)
    assert parse_options("tok_train", ["--preset", "tiny"]).vocab_size == 4096


def test_sft_mixture_is_the_originals_in_d20_and_identity_only_in_tiny():
    assert parse_options("chat_sft", []).identity_in_mixture is False
    assert parse_options("chat_sft", ["--preset", "d20"]).identity_in_mixture is False
    assert parse_options("chat_sft", ["--preset", "tiny"]).identity_in_mixture is True


def test_d20_derived_numbers_at_world_size_8():
    torch = pytest.importorskip("torch")
    from nanochat.gpt import GPT, GPTConfig

    options = parse_options("base_train", ["--preset", "d20"])
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(options.depth, 65536, options.max_seq_len))
    assert model.num_params() == 560_988_160
    horizon = plan_horizon(options, world_size=8, num_params=model.num_params())
    assert horizon.num_iterations == 21_400
    assert horizon.grad_accum_steps == 1
    assert horizon.tokens_per_micro_step == 32 * 2048 * 8


def test_horizon_accumulates_and_rejects_uneven_batches():
    options = BaseTrainOptions(device_batch_size=8, max_seq_len=256, total_batch_size=8192, num_iterations=10)
    assert plan_horizon(options, world_size=2).grad_accum_steps == 2
    assert plan_horizon(options, world_size=1).grad_accum_steps == 4
    with pytest.raises(ValueError, match="multiple of device_batch_size"):
        plan_horizon(options, world_size=3)


def test_flags_config_and_precedence(tmp_path):
    config = tmp_path / "opts.json"
    config.write_text(json.dumps({"depth": 6, "max_seq_len": 128, "resume": True}))
    options = parse_options(
        "base_train",
        [
            "--preset",
            "tiny",
            "--config",
            str(config),
            "--max-seq-len",
            "64",
            "--no-resume",
            "--input-version",
            "tok:1",
            "--input-version",
            "base:2",
            "--init-from",
            "a",
            "b",
        ],
    )
    assert (options.depth, options.max_seq_len, options.resume) == (6, 64, False)
    assert options.input_version == ["tok:1", "base:2"] and options.init_from == ["a", "b"]
    assert parse_options("chat_eval", ["--tasks", "MMLU", "GSM8K"]).tasks == ["MMLU", "GSM8K"]


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--depth", "0"], "--depth"),
        (["--device-batch-size", "many"], "--device-batch-size"),
        (["--input-version", "nanochat"], "--input-version"),
        (["--device", "tpu"], "--device"),
        (["--warp-speed", "9"], "--warp-speed"),
    ],
)
def test_bad_options_name_the_field(argv, field):
    with pytest.raises(OptionsError) as info:
        parse_options("base_train", argv)
    message = str(info.value)
    assert field in message and "\n" not in message


def test_bad_config_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(OptionsError, match="JSON object"):
        parse_options("tok_train", ["--config", str(bad)])
    bad.write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(OptionsError, match="--vocab-size"):
        parse_options("tok_train", ["--config", str(bad)])


def test_stage_cli_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "nanochat.stages.tok_train", "--vocab-size", "10"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--vocab-size" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["type"] == "error"


def test_print_schema_and_import_without_torch():
    code = (
        "import sys, json; import nanochat.stages.options, nanochat.stages.events, nanochat.stages.cli; "
        "from nanochat.stages.cli import parse_options; parse_options('base_train', ['--print-schema']); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["properties"]["depth"]["default"] == 20


def test_depth_option_agrees_with_the_model_shape_rule():
    from nanochat.gpt import GPTConfig
    from nanochat.stages.options import BaseTrainOptions
    from pydantic import ValidationError

    for depth in range(1, 129):
        try:
            GPTConfig.from_depth(depth, vocab_size=512)
            buildable = True
        except ValueError:
            buildable = False
        try:
            BaseTrainOptions(depth=depth)
            accepted = True
        except ValidationError as e:
            assert "power of two" in str(e)
            accepted = False
        assert accepted == buildable, depth


@pytest.mark.parametrize(
    "argv, refused",
    [
        (["--synthetic-docs", "5"], "--synthetic-docs: only read by --source synthetic, not --source stdlib"),
        (["--source", "synthetic", "--docs-path", "/x"], "--docs-path: only read by --source python-docs"),
        (
            ["--source", "download", "--core-items", "10", "--val-docs", "3"],
            "--core-items, --val-docs: only read by --source stdlib or python-docs or synthetic, not --source download",
        ),
        (["--fineweb-shards", "3"], "--fineweb-shards: only read by --source download, not --source stdlib"),
    ],
)
def test_make_data_refuses_an_option_its_source_never_reads(argv, refused):
    with pytest.raises(OptionsError, match=refused):
        parse_options("make_data", argv)


def test_make_data_takes_the_options_of_its_source():
    options = parse_options("make_data", ["--source", "synthetic", "--synthetic-docs", "5", "--core-items", "10"])
    assert (options.synthetic_docs, options.core_items) == (5, 10)
    assert parse_options("make_data", ["--source", "download", "--fineweb-shards", "3"]).fineweb_shards == 3
    # Shards 0..N-1 with the last as validation: all 1,823 can be asked for, but never fewer than train + val.
    assert parse_options("make_data", ["--source", "download", "--fineweb-shards", "1823"]).fineweb_shards == 1823
    for refused in ("1", "1824"):
        with pytest.raises(OptionsError, match="--fineweb-shards"):
            parse_options("make_data", ["--source", "download", "--fineweb-shards", refused])


def test_make_data_accepts_every_option_at_its_default_as_the_trainer_passes_them():
    from nanochat.stages.options import MakeDataOptions

    dumped = {**MakeDataOptions().model_dump(), "source": "synthetic", "synthetic_docs": 50}
    assert MakeDataOptions(**dumped).synthetic_docs == 50
    with pytest.raises(ValueError, match="--fineweb-shards: only read by --source download"):
        MakeDataOptions(**{**dumped, "fineweb_shards": 9})
