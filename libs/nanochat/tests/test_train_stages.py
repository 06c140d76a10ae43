"""The model stages' shared pieces and their CLI contract, in process: schedules, the progress
meter, bits-per-byte, ChatCORE's letter scoring, and option errors (exit 2
naming the field)."""

import contextlib
import json
import math
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from nanochat.gpt import GPT, GPTConfig
from nanochat.stages.base_eval import base_eval
from nanochat.stages.base_loss import base_loss
from nanochat.stages.base_train import base_train
from nanochat.stages.chat_eval import chat_eval, letter_ids, run_categorical
from nanochat.stages.chat_rl import chat_rl
from nanochat.stages.chat_sft import chat_sft
from nanochat.stages.cli import run_stage
from nanochat.stages.make_data import make_data
from nanochat.stages.mid_train import mid_train
from nanochat.stages.report import report
from nanochat.stages.tok_eval import tok_eval
from nanochat.stages.tok_train import tok_train
from nanochat.stages.train_loop import ProgressMeter, evaluate_bpb, linear_decay, muon_momentum, warmdown_lr
from nanochat.tasks.arc import ARC
from nanochat.tokenizer import Tokenizer
from nanochat_contracts.events import parse_events


def test_base_schedule_is_constant_then_warms_down_to_zero():
    assert warmdown_lr(0.0) == 1.0
    assert warmdown_lr(0.79) == 1.0
    assert warmdown_lr(0.9) == pytest.approx(0.5)
    assert warmdown_lr(1.0) == pytest.approx(0.0)
    assert warmdown_lr(1.0, final_lr_frac=0.1) == pytest.approx(0.1)
    assert warmdown_lr(0.05, warmup_ratio=0.1) == pytest.approx(0.5, abs=1e-6)


def test_muon_momentum_ramps_over_300_steps_and_sft_decays_linearly():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)
    assert [linear_decay(s, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_progress_meter_debiases_the_ema_and_counts_every_token():
    meter = ProgressMeter(total_steps=10, flops_per_token=100.0, peak=1e6, world_size=2)
    first = meter.update(0, loss=4.0, tokens=2000, seconds=0.5)
    assert first["loss"] == pytest.approx(4.0)  # debiased: the first value is the loss itself
    assert first["tok_per_s"] == pytest.approx(4000.0)
    assert first["mfu"] == pytest.approx(100.0 * 4000.0 / 2e6)
    second = meter.update(1, loss=2.0, tokens=2000, seconds=0.5)
    assert second["loss"] == pytest.approx((0.9 * 0.1 * 4.0 + 0.1 * 2.0) / (1 - 0.9**2))
    assert second["eta_s"] == pytest.approx(8 * 0.5)
    resumed = ProgressMeter(10, None, None, 1, state=meter.state_dict())
    assert resumed.update(2, 3.0, 10, 1.0)["mfu"] is None


def test_bits_per_byte_matches_a_direct_computation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    token_bytes = torch.randint(0, 4, (50,))
    x = torch.randint(0, 50, (3, 16))
    y = torch.randint(0, 50, (3, 16))
    y[0, :4] = -1
    got = evaluate_bpb(model, [(x, y)], token_bytes, contextlib.nullcontext())
    with torch.no_grad():
        logits = model(x)
    nats = bytes_ = 0.0
    for b in range(3):
        for t in range(16):
            target = int(y[b, t])
            if target >= 0 and token_bytes[target] > 0:
                nats += float(F.cross_entropy(logits[b, t][None], torch.tensor([target])))
                bytes_ += int(token_bytes[target])
    assert got == pytest.approx(nats / (math.log(2) * bytes_), rel=1e-6)


BAD_OPTIONS = [
    ("make_data", make_data, ["--source", "web"], "--source"),
    ("tok_train", tok_train, ["--vocab-size", "10"], "--vocab-size"),
    ("tok_eval", tok_eval, ["--max-chars", "0"], "--max-chars"),
    ("base_train", base_train, ["--depth", "0"], "--depth"),
    ("base_loss", base_loss, ["--split-tokens", "0"], "--split-tokens"),
    ("base_eval", base_eval, ["--max-per-task", "-5"], "--max-per-task"),
    ("mid_train", mid_train, ["--total-batch-size", "zero"], "--total-batch-size"),
    ("chat_sft", chat_sft, ["--init-lr-frac", "0"], "--init-lr-frac"),
    ("chat_rl", chat_rl, ["--num-samples", "0"], "--num-samples"),
    ("chat_eval", chat_eval, ["--tasks", "Nope"], "--tasks"),
    ("report", report, ["--title", "x" * 300], "--title"),
]


@pytest.mark.parametrize("stage,body,argv,field", BAD_OPTIONS, ids=[b[0] for b in BAD_OPTIONS])
def test_bad_option_exits_2_naming_the_field(stage, body, argv, field, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_stage(stage, body, argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert field in err and len(err.strip().splitlines()) == 1
    events = list(parse_events(out.splitlines()))
    assert [e.type for e in events] == ["error"] and field in events[0].message


@pytest.mark.parametrize(
    "stage,body",
    [
        ("tok_train", tok_train),
        ("base_train", base_train),
        ("mid_train", mid_train),
        ("chat_sft", chat_sft),
        ("chat_rl", chat_rl),
        ("report", report),
    ],
)
def test_missing_out_exits_2_naming_it(stage, body, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_stage(stage, body, ["--init-from", str(tmp_path)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    events = list(parse_events(out.splitlines()))
    assert [e.type for e in events] == ["error"] and "--out" in events[0].message
    assert "--out" in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def tiny_tokenizer(tmp_path):
    folder = tmp_path / "tok"
    Tokenizer.train_from_iterator(iter(["the quick brown fox jumps over the lazy dog " * 50]), vocab_size=300).save(
        folder / "tokenizer"
    )
    return folder


def test_batch_that_does_not_divide_over_the_ranks_exits_2(tiny_tokenizer, tmp_path, capsys):
    # Each option is valid alone; together with this world size (1) they are not.
    with pytest.raises(SystemExit) as exit_info:
        run_stage(
            "base_train",
            base_train,
            [
                "--init-from",
                str(tiny_tokenizer),
                "--out",
                str(tmp_path / "base"),
                "--depth",
                "2",
                "--max-seq-len",
                "64",
                "--device-batch-size",
                "3",
                "--total-batch-size",
                "256",
            ],
        )
    assert exit_info.value.code == 2
    events = list(parse_events(capsys.readouterr().out.splitlines()))
    assert events[-1].type == "error" and events[-1].message.startswith("invalid option --total-batch-size")
    assert not (tmp_path / "base").exists()


def test_eval_stage_on_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_stage("base_loss", base_loss, ["--init-from", str(tmp_path / "nope")])
    assert exit_info.value.code == 1
    events = list(parse_events(capsys.readouterr().out.splitlines()))
    assert events[-1].type == "error" and "does not exist" in events[-1].message
    assert json.loads(events[-1].model_dump_json())["type"] == "error"


def test_letter_scoring_takes_the_best_answer_letter_at_each_prompts_last_position(tiny_tokenizer, tmp_path):
    tok = Tokenizer.load(tiny_tokenizer / "tokenizer")
    rows = [
        {
            "id": f"q{i}",
            "question": "the fox " * (i + 1) + "?",
            "answerKey": key,
            "choices": {"text": ["red", "brown", "grey", "blue"], "label": ["A", "B", "C", "D"]},
        }
        for i, key in enumerate("BDAC")
    ]
    folder = tmp_path / "tasks" / "allenai/ai2_arc" / "ARC-Easy"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "test-00000-of-00001.parquet")
    task = ARC(tmp_path, "ARC-Easy", "test")
    items = [task[i] for i in range(len(task))]
    prompts = [tok.render_for_completion(item) for item in items]
    assert len({len(p) for p in prompts}) == len(prompts)  # padded rows: each read at its own end
    letters = letter_ids(tok, ["A", "B", "C", "D"])
    # The loader's seed-42 order, default_rng(42).permutation(4) = [3, 2, 1, 0], has keys C, A, D, B.
    assert [item["messages"][1]["content"] for item in items] == ["C", "A", "D", "B"]
    picks = ["C", "A", "B", "B"]  # right, right, wrong, right
    non_letter = tok.encode("fox")[0]

    def model_for(first: int):
        """A stand-in model for the batches starting at item `first`, one batch of all the rest."""

        def model(idx):
            logits = torch.zeros(idx.shape[0], idx.shape[1], tok.vocab_size)
            for i in range(idx.shape[0]):
                end, pick = len(prompts[first + i]) - 1, picks[first + i]
                logits[i, :, letters[0]] = 90.0  # "A" everywhere else: the wrong position
                logits[i, end, letters[0]] = 0.0
                logits[i, end, letters["ABCD".index(pick)]] = 50.0
                logits[i, end, non_letter] = 100.0  # not an answer letter: ignored
            return logits

        return model

    compute = SimpleNamespace(device=torch.device("cpu"))
    assert run_categorical(model_for(0), tok, compute, contextlib.nullcontext(), items, task, batch_size=4) == 3
    assert run_categorical(model_for(2), tok, compute, contextlib.nullcontext(), items[2:], task, batch_size=2) == 1
