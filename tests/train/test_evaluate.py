"""Evaluation helpers: chat prompts for tasks, exact-match accounting, held-out loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from nemotron3.config import preset
from nemotron3.model.nemotron import NemotronHForCausalLM
from nemotron3.train.corpus import iter_documents
from nemotron3.train.data import pack
from nemotron3.train.evaluate import held_out_loss, task_accuracy, task_prompt
from nemotron3.train.tasks import generate, gold_output
from nemotron3.train.tokenizer import DOC_END_ID, PAD_ID, render_chat, train_tokenizer


class _ScriptedLLM:
    """Answers every prompt with `answer(instance_prompt)`: stands in for the engine."""

    def __init__(self, answer):
        self.answer = answer

    def generate(self, prompts, params):
        return [SimpleNamespace(outputs=[SimpleNamespace(text=self.answer(p))]) for p in prompts]


def test_task_prompt_is_the_chat_generation_prompt() -> None:
    x = generate("arithmetic", 1, seed=5)[0]
    prompt = task_prompt(x)
    assert prompt == render_chat([{"role": "user", "content": x.prompt}], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")


def test_task_accuracy_counts_exact_matches() -> None:
    instances = {task_prompt(x): x for x in generate("arithmetic", 10, seed=7)}
    gold = task_accuracy(
        _ScriptedLLM(lambda p: gold_output(instances[p])[len("<think>\n") :]), "arithmetic", 10, seed=7
    )
    assert gold["correct"] == 10 and gold["accuracy"] == 1.0
    wrong = task_accuracy(_ScriptedLLM(lambda p: "</think>\n-1"), "arithmetic", 10, seed=7,
                          train_prompts={x.prompt for x in instances.values()})  # fmt: skip
    assert wrong["correct"] == 0 and wrong["seen_in_training"] == 10


def test_held_out_loss_matches_a_direct_computation(tmp_path) -> None:
    text = "\f".join(f"document {i}: " + "to be or not to be, " * (i + 3) for i in range(6))
    (tmp_path / "valid.txt").write_text(text)
    tok_dir = train_tokenizer([tmp_path / "valid.txt"], 300, tmp_path / "tok")
    from nemotron3.io.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tok_dir)
    model = NemotronHForCausalLM(preset("tiny").replace(vocab_size=300))
    model.init_weights(torch.Generator().manual_seed(0))
    result = held_out_loss(model, tok, [tmp_path / "valid.txt"], seq_len=16, sequences=3, batch=2)
    assert result["sequences"] == 3 and math.isclose(result["perplexity"], math.exp(result["loss"]))
    documents = [tok.encode(d) for d in iter_documents(tmp_path / "valid.txt")]  # as the corpus reader splits them
    seqs = list(pack(documents, 16, DOC_END_ID, pad_id=PAD_ID))[:3]
    total = count = 0
    with torch.no_grad():
        for q in seqs:  # one sequence at a time, each document masked on its own
            logits = model(q.input_ids[None], doc_ids=q.doc_ids[None]).logits[0]
            keep = q.labels != -100
            total += float(F.cross_entropy(logits[keep], q.labels[keep], reduction="sum"))
            count += int(keep.sum())
    assert result["tokens"] == count
    assert math.isclose(result["loss"], total / count, rel_tol=1e-6)
