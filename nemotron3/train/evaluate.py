"""Quick evaluations of a trained model: held-out perplexity and exact-match accuracy on synthetic tasks.

`task_accuracy` prompts the model with the chat template (generation prompt, thinking on), decodes
greedily with the engine, and checks the answer with the domain's verifier (nemotron3.train.tasks).
Instances come from a seed the training mix never used, so they are in-distribution but unseen (short
arithmetic problems can coincide with training ones by chance; the report says how many did).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nemotron3.engine.llm import LLM
from nemotron3.engine.sampling_params import SamplingParams
from nemotron3.train.data import StreamingTextDataset
from nemotron3.train.losses import token_cross_entropy
from nemotron3.train.tasks import generate, verify
from nemotron3.train.tokenizer import render_chat

EVAL_SEED = 20261129  # never a training seed


def task_prompt(instance) -> str:
    """The chat-template prompt for one task instance, ending with the assistant generation prompt."""
    messages = [m for m in instance.as_messages() if m["role"] in ("system", "user")][:2]
    return render_chat(messages, tools=instance.tools or None, add_generation_prompt=True)


def task_accuracy(
    llm: LLM,
    domain: str,
    n: int,
    *,
    seed: int = EVAL_SEED,
    max_tokens: int = 256,
    options: dict | None = None,
    train_prompts: set[str] | None = None,
) -> dict[str, Any]:
    """Greedy exact-match accuracy on `n` fresh `domain` instances; returns counts, accuracy and examples."""
    instances = generate(domain, n, seed, **(options or {}))
    outputs = llm.generate([task_prompt(x) for x in instances], SamplingParams(temperature=0.0, max_tokens=max_tokens))
    correct = [verify(x, out.outputs[0].text) for x, out in zip(instances, outputs)]
    seen = sum(x.prompt in train_prompts for x in instances) if train_prompts is not None else None
    return {
        "domain": domain, "n": n, "correct": sum(correct), "accuracy": sum(correct) / n,
        "seen_in_training": seen, "options": options or {},
        "examples": [{"prompt": x.prompt, "gold": x.answer, "output": o.outputs[0].text, "correct": c}
                     for x, o, c in list(zip(instances, outputs, correct))[:3]],
    }  # fmt: skip


@torch.no_grad()
def held_out_loss(model, tokenizer, files: Sequence[str | Path], seq_len: int, sequences: int, batch: int = 8) -> dict:
    """Mean next-token CE (nats/token) and perplexity over the first `sequences` packed sequences of `files`."""
    ds = StreamingTextDataset(list(files), tokenizer, seq_len, shuffle_buffer=1, epochs=1, shuffle_documents=False)
    rows = []
    for seq in ds:
        rows.append(seq)
        if len(rows) == sequences:
            break
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        ids = torch.stack([r.input_ids for r in part])
        docs = torch.stack([r.doc_ids for r in part])
        labels = torch.stack([r.labels for r in part])
        s, c = token_cross_entropy(model(ids, doc_ids=docs).logits, labels)
        total, count = total + float(s), count + c
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "sequences": len(rows)}
