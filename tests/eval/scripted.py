"""A scripted stand-in for `generate_with_budget`: answers every task prompt with its gold (or a wrong) answer."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from nemotron3.engine.reasoning import BudgetedOutput
from nemotron3.eval.common import render_prompt
from nemotron3.train.tasks import TaskInstance


def scripted_generate(candidates: Callable[[], Iterable[TaskInstance]], correct: bool, calls: list | None = None):
    """A generate_with_budget replacement: finds each prompt's instance among `candidates()` (by its token
    ids) and answers with `</think>` + gold answer (correct) or -1; `calls` records each call's prompts."""

    def fake(llm, prompts, params, config, *, in_reasoning=True):
        tok = llm.get_tokenizer()
        table = {tuple(tok.encode(render_prompt(x, in_reasoning))): x for x in candidates()}
        if calls is not None:
            calls.append([table[tuple(p)].prompt for p in prompts])
        outs = []
        for p in prompts:
            answer = table[tuple(p)].answer if correct else "-1"
            text = ("reasoning\n</think>\n" if in_reasoning else "") + answer
            outs.append([BudgetedOutput(tok.encode(text), text, 3 if in_reasoning else 0, "stop")])
        return outs

    return fake
