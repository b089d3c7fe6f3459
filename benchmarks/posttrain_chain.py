"""The post-training chain for the default model, timed end to end: SFT, domain teachers, RLVR, MOPD, evals.

    python benchmarks/posttrain_chain.py                          # everything, into runs/posttrain
    python benchmarks/posttrain_chain.py --seed 1                 # a second seed, into runs/posttrain-seed1
    python benchmarks/posttrain_chain.py --stages eval            # only the evaluations (models already trained)
    python benchmarks/posttrain_chain.py --skip-done              # keep stages whose model already exists
    python benchmarks/posttrain_chain.py --install-default        # then ship the MOPD student as "default"
    python benchmarks/posttrain_chain.py --seed 1 --teachers-from runs/posttrain   # seed 1, seed-0 teachers

Every stage is one `nemotron3` CLI command run in a subprocess (exactly what a user would type), with the
recipe from recipes/ and `--set` overrides for the output directory, the starting checkpoint and the seed:

    sft                 recipes/sft.yaml                 base → generalist SFT student (all domains)
    teacher_<domain>    recipes/teacher_<domain>.yaml    base → one teacher per domain (domain-only SFT)
    rl                  recipes/rl.yaml                  SFT student → GRPO with verifiable rewards
    mopd                recipes/mopd.yaml                SFT student → multi-teacher on-policy distillation
    eval                nemotron3 eval tasks / budget / ruler / perplexity on all of the above

`--seed S` shifts every data, rollout and run seed by 100·S, so seeds give independent task instances and
sampling. Wall-clock seconds per stage go to benchmarks/results/posttrain_chain[_seedS].json, with the
issue's acceptance claims checked on the evaluation results (`claims`); the evaluations write
benchmarks/results/posttrain_<eval>[_seedS].json and .png, and ROOT/tables.md the tables of the docs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEACHER_DOMAINS = ("arithmetic", "sorting", "tool_use")
BASE = "base"  # the pretrained checkpoint the chain starts from (nemotron3.default_model)


@dataclass
class Stage:
    """One training command: `nemotron3 train <trainer> --config <recipe>` + overrides."""

    name: str
    trainer: str
    recipe: str
    init_from: str
    seed_keys: tuple[str, ...]  # recipe keys shifted by 100·seed
    extra: dict[str, str] = field(default_factory=dict)


def stages(root: Path, teachers_root: Path | None = None) -> list[Stage]:
    """The chain in dependency order: SFT and teachers from the base, RL and MOPD from the SFT student.
    `teachers_root`: take the teachers from another run's root instead of training them here."""
    sft_model = str(root / "sft" / "model")
    teachers = {f"teachers.{d}": str((teachers_root or root) / f"teacher_{d}" / "model") for d in TEACHER_DOMAINS}
    sft_seeds, rl_seeds = ("data.seed", "run.seed"), ("rollout.seed", "run.seed")
    return [
        Stage("sft", "sft", "recipes/sft.yaml", BASE, sft_seeds),
        *[Stage(f"teacher_{d}", "sft", f"recipes/teacher_{d}.yaml", BASE, sft_seeds)
          for d in TEACHER_DOMAINS if teachers_root is None],
        Stage("rl", "rl", "recipes/rl.yaml", sft_model, rl_seeds),
        Stage("mopd", "mopd", "recipes/mopd.yaml", sft_model, rl_seeds, teachers),
    ]


def recipe_value(recipe: str, dotted: str) -> int:
    """The integer at `section.key` of a YAML recipe (0 when absent)."""
    import yaml

    section, key = dotted.split(".")
    return int((yaml.safe_load((ROOT / recipe).read_text()).get(section) or {}).get(key, 0))


def train_command(stage: Stage, root: Path, seed: int) -> list[str]:
    """The CLI command line of one stage."""
    sets = {"run.out_dir": str(root / stage.name), "model.init_from": stage.init_from, **stage.extra}
    sets.update({k: str(recipe_value(stage.recipe, k) + 100 * seed) for k in stage.seed_keys})
    cmd = [sys.executable, "-m", "nemotron3", "train", stage.trainer, "--config", str(ROOT / stage.recipe)]
    return cmd + [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]


def eval_commands(root: Path, seed: int, n: int, teachers_root: Path | None = None) -> dict[str, list[str]]:
    """`nemotron3 eval` command lines: tasks (all models), budget (SFT, RL, MOPD), ruler and perplexity."""
    suffix = f"_seed{seed}" if seed else ""
    models = {"base": BASE, "sft": root / "sft" / "model", "rl": root / "rl" / "model",
              "mopd": root / "mopd" / "model", **{f"teacher_{d}": (teachers_root or root) / f"teacher_{d}" / "model"
                                                 for d in TEACHER_DOMAINS}}  # fmt: skip
    flags = lambda names: [a for m in names for a in ("--model", f"{m}={models[m]}")]  # noqa: E731
    out = lambda name: ["--out", str(RESULTS / f"posttrain_{name}{suffix}.json")]  # noqa: E731
    cli = [sys.executable, "-m", "nemotron3", "eval"]
    options = ["--task-options", str(ROOT / "recipes" / "sft.yaml")]
    domains = f"arithmetic:{n},sorting:{n // 2},tool_use:{n // 2},retrieval:{n // 2}"
    return {
        "tasks": cli + ["tasks", *flags(models), "--domains", domains, "--seeds", "3", *options,
                        *out("tasks")],
        "budget": cli + ["budget", *flags(["sft", "rl", "mopd"]), "--domain", "arithmetic", "--n", str(n),
                         "--seeds", "3", "--budgets", "off,low,medium,high,unbounded",
                         "--levels", "low=16,medium=48,high=96", *options, *out("budget")],
        "ruler": cli + ["ruler", "--model", f"mopd={models['mopd']}", "--lengths", "128,256,512,1024,2048,3584",
                        *out("ruler")],
        "perplexity": cli + ["perplexity", *flags(["base", "sft", "rl", "mopd"]), *out("perplexity")],
    }  # fmt: skip


RL_DOMAINS = ("arithmetic", "sorting")  # recipes/rl.yaml's rollout domains


def accuracy(tasks: dict, model: str, domain: str) -> tuple[float, float]:
    """(mean, std over eval seeds) of one model's thinking-on accuracy on one domain ("average": all)."""
    mode = tasks["models"][model]["modes"]["on"]
    row = mode["average"] if domain == "average" else mode["domains"][domain]
    return row["accuracy_mean"], row["accuracy_std"]


def claims(tasks: dict, budget: dict | None, margin: float) -> dict:
    """The issue's acceptance claims, each with its numbers and whether it holds on this run.

    Teacher domains only for the MOPD comparisons (MOPD distils arithmetic, sorting and tool use); the
    averages are over those three domains so every student is scored on what it was trained for."""
    mean = lambda m, ds: sum(accuracy(tasks, m, d)[0] for d in ds) / len(ds)  # noqa: E731
    out: dict = {"margin": margin}
    out["sft_gt_base"] = {m: mean(m, TEACHER_DOMAINS) for m in ("base", "sft")}
    out["sft_gt_base"]["holds"] = out["sft_gt_base"]["sft"] > out["sft_gt_base"]["base"]
    out["rl_gt_sft"] = {d: {m: accuracy(tasks, m, d)[0] for m in ("sft", "rl")} for d in RL_DOMAINS}
    out["rl_gt_sft"]["holds"] = mean("rl", RL_DOMAINS) > mean("sft", RL_DOMAINS)
    best = max(("sft", "rl"), key=lambda m: mean(m, TEACHER_DOMAINS))
    out["mopd_ge_best_single_stage"] = {"best": best, best: mean(best, TEACHER_DOMAINS),
                                        "mopd": mean("mopd", TEACHER_DOMAINS)}  # fmt: skip
    out["mopd_ge_best_single_stage"]["holds"] = mean("mopd", TEACHER_DOMAINS) >= mean(best, TEACHER_DOMAINS)
    gaps = {d: accuracy(tasks, f"teacher_{d}", d)[0] - accuracy(tasks, "mopd", d)[0] for d in TEACHER_DOMAINS}
    out["mopd_within_margin_of_teachers"] = {"gap": gaps, "holds": all(g <= margin for g in gaps.values())}
    if budget is not None:
        for label, model in budget["models"].items():
            points = {p["budget"]: p for p in model["points"]}
            acc = [points[b]["accuracy_mean"] for b in ("off", "low", "medium", "high", "unbounded")]
            out[f"budget_{label}"] = {
                "accuracy": acc, "monotone": all(a <= b + 1e-9 for a, b in zip(acc, acc[1:])),
                "medium_token_saving": points["medium"]["token_saving_vs_unbounded"],
            }  # fmt: skip
    return out


def markdown(tasks: dict, budget: dict | None) -> str:
    """The per-domain accuracy table (mean ± std over eval seeds) and the budget table, for the docs."""
    domains = list(tasks["domains"])
    lines = ["| model | " + " | ".join(domains) + " | average |", "|---" * (len(domains) + 2) + "|"]
    for label in tasks["models"]:
        cells = [accuracy(tasks, label, d) for d in [*domains, "average"]]
        lines.append(f"| {label} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cells) + " |")
    if budget is not None:
        lines += ["", "| model | " + " | ".join(p["budget"] for p in next(iter(budget["models"].values()))["points"])
                  + " |", "|---" * (1 + len(budget["budgets"])) + "|"]  # fmt: skip
        for label, model in budget["models"].items():
            cells = [f"{p['accuracy_mean']:.3f} ({p['mean_reasoning_tokens']:.0f} tok)" for p in model["points"]]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def install_default(root: Path, report: dict) -> Path:
    """Copy the MOPD student into nemotron3/assets/default-model (the embedded default) with its provenance."""
    import shutil

    from nemotron3.default_model import DEFAULT_MODEL_DIR

    source = root / "mopd" / "model"
    if not (source / "config.json").is_file():
        raise SystemExit(f"--install-default: no MOPD student at {source}")
    shutil.rmtree(DEFAULT_MODEL_DIR, ignore_errors=True)
    shutil.copytree(source, DEFAULT_MODEL_DIR)
    summary = {"built_by": "benchmarks/posttrain_chain.py", "source": str(source.relative_to(ROOT)),
               "chain": {k: report.get(k) for k in ("seed", "seconds", "claims")}}  # fmt: skip
    (DEFAULT_MODEL_DIR / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return DEFAULT_MODEL_DIR


def run(cmd: list[str], log: Path) -> float:
    """Run one command with its output appended to `log`; returns wall seconds; raises on failure."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"stage failed (exit {code}) after {seconds:.0f} s: {' '.join(cmd)}; see {log}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="output root (default runs/posttrain, runs/posttrain-seedS)")
    p.add_argument("--stages", default="all", help="comma list of stage names, 'train', 'eval' or 'all'")
    p.add_argument("--skip-done", action="store_true", help="skip training stages whose model already exists")
    p.add_argument("--teachers-from", default=None, help="reuse the teachers of this run root (e.g. runs/posttrain)")
    p.add_argument("--install-default", action="store_true",
                   help="finally copy the MOPD student into nemotron3/assets/default-model")
    p.add_argument("--margin", type=float, default=0.10, help="stated MOPD-vs-teacher accuracy margin")
    p.add_argument("--eval-n", type=int, default=60, help="arithmetic instances per eval seed (others n/2)")
    args = p.parse_args()
    root = ROOT / (args.root or ("runs/posttrain" + (f"-seed{args.seed}" if args.seed else "")))
    root.mkdir(parents=True, exist_ok=True)
    log = root / "chain.log"
    chosen = set(args.stages.split(","))
    suffix = f"_seed{args.seed}" if args.seed else ""
    report_path = RESULTS / f"posttrain_chain{suffix}.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.update({"seed": args.seed, "root": str(root.relative_to(ROOT))})
    seconds = report.setdefault("seconds", {})
    teachers_root = ROOT / args.teachers_from if args.teachers_from else None
    for stage in stages(root, teachers_root):
        if not chosen & {"all", "train", stage.name}:
            continue
        if args.skip_done and (root / stage.name / "model" / "config.json").is_file():
            print(f"skip {stage.name}: {root / stage.name / 'model'} exists", flush=True)
            continue
        seconds[stage.name] = run(train_command(stage, root, args.seed), log)
        report_path.write_text(json.dumps(report, indent=1) + "\n")
    for name, cmd in eval_commands(root, args.seed, args.eval_n, teachers_root).items():
        if chosen & {"all", "eval", f"eval_{name}"}:
            seconds[f"eval_{name}"] = run(cmd, log)
            report_path.write_text(json.dumps(report, indent=1) + "\n")
    tasks_json, budget_json = (RESULTS / f"posttrain_{n}{suffix}.json" for n in ("tasks", "budget"))
    if tasks_json.is_file():
        budget = json.loads(budget_json.read_text()) if budget_json.is_file() else None
        report["claims"] = claims(json.loads(tasks_json.read_text()), budget, args.margin)
        (root / "tables.md").write_text(markdown(json.loads(tasks_json.read_text()), budget) + "\n")
    train = [v for k, v in seconds.items() if not k.startswith("eval_")]
    report["train_minutes"] = sum(train) / 60
    report["total_minutes"] = sum(seconds.values()) / 60
    RESULTS.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    if args.install_default:
        print(f"installed the MOPD student as the default model: {install_default(root, report)}")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
