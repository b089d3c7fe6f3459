"""Post-training evaluations, each returning a JSON-ready dict (the CLI writes it plus a PNG):

- `evaluate_tasks`: per-domain accuracy of several models, mean ± std over instance seeds;
- `evaluate_budget`: accuracy vs thinking budget (off, integer budgets, unbounded) and the token savings;
- `evaluate_ruler`: RULER-style key-value retrieval accuracy per (context length, needle depth);
- `evaluate_perplexity`: held-out next-token loss and perplexity.
"""

from nemotron3.eval.budget import BudgetConfig, evaluate_budget
from nemotron3.eval.common import ModelSpec
from nemotron3.eval.perplexity import PerplexityConfig, evaluate_perplexity
from nemotron3.eval.plots import write_result
from nemotron3.eval.ruler import RulerConfig, evaluate_ruler
from nemotron3.eval.tasks import TasksConfig, evaluate_tasks

__all__ = [
    "BudgetConfig", "ModelSpec", "PerplexityConfig", "RulerConfig", "TasksConfig", "evaluate_budget",
    "evaluate_perplexity", "evaluate_ruler", "evaluate_tasks", "write_result",
]  # fmt: skip
