"""SFT: assistant-only masking against a hand-computed reference, the masked loss on tiny tensors, the
reasoning-mode data (thinking off, truncated thinking), packing, the resumable stream, and a short
end-to-end run on the tiny preset (from a checkpoint directory) that lowers the assistant-token loss."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from nemotron3.cli import main
from nemotron3.config import preset
from nemotron3.io.checkpoint import save_checkpoint
from nemotron3.io.tokenizer import Tokenizer
from nemotron3.train.data import IGNORE_INDEX
from nemotron3.train.evaluate import task_prompt
from nemotron3.train.losses import token_cross_entropy
from nemotron3.train.pretrain import build_model
from nemotron3.train.sft import (
    CLOSE_TEXT,
    SFTConfig,
    SFTDataset,
    SFTExample,
    SFTTrainer,
    assistant_token_loss,
    build_examples,
    conversation_segments,
    pack_examples,
    thinking_off,
    tokenize_segments,
    truncate,
)
from nemotron3.train.tasks import generate, render_conversation
from nemotron3.train.tokenizer import SPECIAL_TOKENS, render_chat, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
ARITH = {"digits": [1, 2], "operations": ["add", "sub"]}


class CharTokenizer:
    """Added tokens get their fixed ids 0..10; every other character is one token, id ord(c) + 100."""

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in SPECIAL_TOKENS if text.startswith(s, i)), None)
            if special is not None:
                ids.append(SPECIAL_TOKENS.index(special))
                i += len(special)
            else:
                ids.append(ord(text[i]) + 100)
                i += 1
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(SPECIAL_TOKENS[i] if i < 100 else chr(i - 100) for i in ids)


def c(ch: str) -> int:
    return ord(ch) + 100


IM_START, IM_END, THINK, END_THINK = 3, 4, 5, 6


def test_masking_matches_a_hand_computed_reference() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok", "reasoning_content": "r"}]
    ids, trainable = tokenize_segments(CharTokenizer(), conversation_segments(messages))
    # <|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
    # <think>\nr\n</think>\nok<|im_end|>\n
    context = [IM_START, *map(c, "system\n"), IM_END, c("\n"), IM_START, *map(c, "user\nHi"), IM_END, c("\n"),
               IM_START, *map(c, "assistant\n")]  # fmt: skip
    body = [THINK, c("\n"), c("r"), c("\n"), END_THINK, c("\n"), c("o"), c("k"), IM_END]
    assert ids == context + body + [c("\n")]
    assert trainable == [False] * len(context) + [True] * len(body) + [False]
    # labels[t] = ids[t + 1] where token t+1 is an assistant token: positions 30..38 predict the body
    assert len(context) == 31
    expected = [IGNORE_INDEX] * 30 + body + [IGNORE_INDEX, IGNORE_INDEX]
    assert SFTExample(ids, trainable).labels == expected


def test_tool_turns_train_both_assistant_turns_and_not_the_tool_result(tokenizer) -> None:
    x = generate("tool_use", 1, seed=5)[0]
    segments = conversation_segments(x.as_messages(), x.tools)
    assert "".join(s for s, _ in segments) == render_conversation(x)
    trained = [s for s, ok in segments if ok]
    assert len(trained) == 2 and trained[0].startswith("<think>\n") and "<tool_call>" in trained[0]
    assert trained[1] == f"<think></think>{x.answer}<|im_end|>"
    assert all("<tool_response>" not in s and "<|im_start|>" not in s for s in trained)
    ids, _ = tokenize_segments(tokenizer, segments)
    assert ids == tokenizer.encode(render_conversation(x))  # pieces meet at added tokens: same tokens


def test_masked_loss_equals_hand_computed_cross_entropy() -> None:
    # position 1: uniform over 3 → −log(1/3) = ln 3; position 2: logits (ln 2, 0, 0), label 0 → ln(4/2) = ln 2
    logits = torch.tensor([[[50.0, 0.0, 0.0], [0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [0.0, 0.0, 50.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 2, 0, IGNORE_INDEX]])
    total, count = token_cross_entropy(logits, labels)
    assert count == 2
    assert float(total) / count == pytest.approx((math.log(3.0) + math.log(2.0)) / 2, abs=1e-6)
    ex = SFTExample([7, 8, 9, 10], [False, True, True, False])  # the same mask from an example
    assert ex.labels == [8, 9, IGNORE_INDEX, IGNORE_INDEX]


def test_thinking_off_and_truncated_thinking_have_the_mode_structure(tokenizer) -> None:
    x = generate("arithmetic", 1, seed=2, digits=3, operations=["add"])[0]
    off = conversation_segments(thinking_off(x.as_messages()))
    assert [s for s, ok in off if ok] == [f"<think></think>{x.answer}<|im_end|>"]
    prompt_off = render_chat(x.as_messages()[:1], add_generation_prompt=True, enable_thinking=False)
    assert "".join(s for s, _ in off).startswith(prompt_off)  # the thinking-off generation prompt, then the answer
    cuts = set()
    for seed in range(30):
        messages = truncate(x.as_messages(), tokenizer, random.Random(seed))
        segments = conversation_segments(messages)
        (head, ok1), (close, ok2), (answer, ok3) = segments[1:4]
        assert (ok1, ok2, ok3) == (True, False, True) and close == CLOSE_TEXT == "\n</think>\n"
        assert answer == f"{x.answer}<|im_end|>"
        prefix = head.removeprefix("<think>\n")
        assert head.startswith("<think>\n") and prefix and x.reasoning.startswith(prefix)
        assert len(prefix) < len(x.reasoning)
        assert segments[0][0] + "<think>\n" == task_prompt(x)  # the thinking-on prompt, then the cut trace
        cuts.add(len(prefix))
    assert len(cuts) > 10  # cut at many points


def test_mode_fractions_and_whole_conversation_packing(tokenizer) -> None:
    examples = build_examples(tokenizer, ["arithmetic", "sorting"], 200, 0, {"arithmetic": ARITH},
                              thinking_off_fraction=0.25, truncated_fraction=0.25)  # fmt: skip
    modes = [e.mode for e in examples]
    assert 30 <= modes.count("off") <= 70 and 30 <= modes.count("truncated") <= 70
    assert [e.domain for e in examples[:4]] == ["arithmetic", "sorting", "arithmetic", "sorting"]
    seq_len = 400
    sequences, dropped = pack_examples(examples, seq_len)
    kept = [e for e in examples if len(e.ids) <= seq_len]
    assert dropped == len(examples) - len(kept)
    # every kept conversation appears whole in exactly one sequence, with its own labels and doc id
    found = []
    for s in sequences:
        for d in range(int(s.doc_ids.max()) + 1):
            where = s.doc_ids == d
            found.append((s.input_ids[where].tolist(), s.labels[where].tolist()))
            assert s.position_in_doc[where].tolist() == list(range(int(where.sum())))
        assert (s.labels[s.doc_ids < 0] == IGNORE_INDEX).all()
    assert sorted(found) == sorted((e.ids, e.labels) for e in kept)


def test_sft_stream_resumes_exactly(tokenizer) -> None:
    examples = build_examples(tokenizer, ["arithmetic"], 60, 0, {"arithmetic": ARITH})
    sequences, _ = pack_examples(examples, 128)
    ds = SFTDataset(sequences, batch_size=4, seed=3)
    stream = iter(ds)
    full = [next(stream) for _ in range(2 * ds.items_per_epoch() + 3)]  # across two epoch ends
    for consumed in (1, ds.items_per_epoch(), ds.items_per_epoch() + 2):
        again = SFTDataset(sequences, batch_size=4, seed=3)
        again.load_state_dict(ds.state_dict(consumed=consumed))
        it = iter(again)
        for want in full[consumed : consumed + 3]:
            got = next(it)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(full[0].input_ids, full[ds.items_per_epoch()].input_ids)  # reshuffled per epoch
    with pytest.raises(ValueError, match="different data"):
        SFTDataset(sequences, batch_size=2, seed=3).load_state_dict(ds.state_dict(consumed=1))


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft_tok")
    docs = [
        render_conversation(x) for d, o in (("arithmetic", ARITH), ("sorting", {})) for x in generate(d, 150, 9, **o)
    ]
    (root / "train.txt").write_text("\f".join(docs), encoding="utf-8")
    return train_tokenizer([root / "train.txt"], 512, root / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def base_checkpoint(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny-preset model with seeded random weights saved as a nemotron_h directory with the tokenizer."""
    out = tmp_path_factory.mktemp("sft_base") / "model"
    config = preset("tiny").replace(vocab_size=512)
    save_checkpoint(build_model(config, seed=0).state_dict(), config, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / name, out / name)
    return out


def _config(base: Path, out: Path, **run) -> SFTConfig:
    return SFTConfig.from_dict({
        "model": {"init_from": str(base)},
        "data": {"task_documents": 120, "task_domains": ["arithmetic"], "task_options": {"arithmetic": ARITH},
                 "seq_len": 384, "batch_size": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "sft": {"valid_documents": 16, "thinking_off_fraction": 0.2, "truncated_fraction": 0.2},
        "run": {"steps": 12, "out_dir": str(out), "eval_every": 100, "checkpoint_every": 100, **run},
    })  # fmt: skip


def test_sft_run_from_a_checkpoint_lowers_the_assistant_token_loss(base_checkpoint, tmp_path) -> None:
    trainer = SFTTrainer(_config(base_checkpoint, tmp_path / "sft"), progress=False)
    from nemotron3 import load_model

    base = load_model(base_checkpoint)
    for (name, a), (_, b) in zip(base.state_dict().items(), trainer.model.state_dict().items()):
        assert torch.equal(a, b), name  # training starts from model.init_from
    before = trainer.evaluate()
    assert before == pytest.approx(assistant_token_loss(base, trainer.valid), rel=1e-6)
    # the loop's LM loss of a batch is the masked CE of its assistant tokens, computed directly
    batch = next(iter(SFTDataset(trainer.train_sequences, 4, seed=trainer.cfg.data.seed)))
    logits = trainer.model(batch.input_ids, doc_ids=batch.doc_ids).logits
    labelled = batch.labels != IGNORE_INDEX
    direct = torch.nn.functional.cross_entropy(logits[labelled], batch.labels[labelled])
    assert trainer.train_step(batch).lm_loss == pytest.approx(float(direct.detach()), rel=1e-5)
    trainer.optimizer.zero_grad(set_to_none=True)
    summary = trainer.run()
    assert summary["valid_loss"] < before - 0.3, (before, summary["valid_loss"])
    assert summary["data"]["train"]["conversations"] == 120 and summary["data"]["train"]["dropped_too_long"] == 0
    exported = Path(summary["model_dir"])
    assert (exported / "tokenizer_config.json").is_file() and load_model(exported).mtp is not None
    samples = json.loads((tmp_path / "sft" / "data" / "sft_samples.json").read_text())
    assert {s["mode"] for s in samples} == {"full", "off", "truncated"}


def test_cli_sft_and_recipe(base_checkpoint, tmp_path, capsys) -> None:
    import yaml

    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump(_config(base_checkpoint, tmp_path / "cli").to_dict()))
    assert main(["train", "sft", "--config", str(recipe), "--set", "run.steps=1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 1
    assert main(["train", "sft", "--config", str(recipe), "--set", "sft.truncated_fraction=1.5"]) == 2
    assert "truncated_fraction" in capsys.readouterr().err
    shipped = SFTConfig.from_file(ROOT / "recipes" / "sft.yaml")
    assert shipped.model.init_from == "base" and shipped.data.corpus_dir is None
    with pytest.raises(ValueError, match="corpus"):
        SFTConfig.from_dict({"data": {"corpus_dir": "x"}})
