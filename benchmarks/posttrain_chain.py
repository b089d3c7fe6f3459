"""The post-training chain for the default model, timed end to end: SFT, domain teachers, RLVR, MOPD, evals.

    python benchmarks/posttrain_chain.py                          # everything, into runs/posttrain
    python benchmarks/posttrain_chain.py --seed 1                 # a second seed, into runs/posttrain-seed1
    python benchmarks/posttrain_chain.py --stages eval            # only the evaluations (models already trained)
    python benchmarks/posttrain_chain.py --skip-done              # keep stages whose model already exists

Every stage is one `nemotron3` CLI command run in a subprocess (exactly what a user would type), with the
recipe from recipes/ and `--set` overrides for the output directory, the starting checkpoint and the seed:

    sft                 recipes/sft.yaml                 base → generalist SFT student (all domains)
    teacher_<domain>    recipes/teacher_<domain>.yaml    base → one teacher per domain (domain-only SFT)
    rl                  recipes/rl.yaml                  SFT student → GRPO with verifiable rewards
    mopd                recipes/mopd.yaml                SFT student → multi-teacher on-policy distillation
    eval                nemotron3 eval tasks / budget / ruler / perplexity on all of the above

`--seed S` shifts every data, rollout and run seed by 100·S, so seeds give independent task instances and
sampling. Wall-clock seconds per stage go to benchmarks/results/posttrain_chain[_seedS].json; the
evaluations write benchmarks/results/posttrain_<eval>[_seedS].json and .png.
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


def stages(root: Path) -> list[Stage]:
    """The chain in dependency order: SFT and teachers from the base, RL and MOPD from the SFT student."""
    sft_model = str(root / "sft" / "model")
    teachers = {f"teachers.{d}": str(root / f"teacher_{d}" / "model") for d in TEACHER_DOMAINS}
    sft_seeds, rl_seeds = ("data.seed", "run.seed"), ("rollout.seed", "run.seed")
    return [
        Stage("sft", "sft", "recipes/sft.yaml", BASE, sft_seeds),
        *[Stage(f"teacher_{d}", "sft", f"recipes/teacher_{d}.yaml", BASE, sft_seeds) for d in TEACHER_DOMAINS],
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


def eval_commands(root: Path, seed: int, n: int) -> dict[str, list[str]]:
    """`nemotron3 eval` command lines: tasks (all models), budget (SFT, RL, MOPD), ruler and perplexity."""
    suffix = f"_seed{seed}" if seed else ""
    models = {"base": BASE, "sft": root / "sft" / "model", "rl": root / "rl" / "model",
              "mopd": root / "mopd" / "model", **{f"teacher_{d}": root / f"teacher_{d}" / "model"
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
                         "--seeds", "3", *options, *out("budget")],
        "ruler": cli + ["ruler", "--model", f"mopd={models['mopd']}", *out("ruler")],
        "perplexity": cli + ["perplexity", *flags(["base", "sft", "rl", "mopd"]), *out("perplexity")],
    }  # fmt: skip


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
    p.add_argument("--eval-n", type=int, default=100, help="arithmetic instances per eval seed (others n/2)")
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
    for stage in stages(root):
        if not chosen & {"all", "train", stage.name}:
            continue
        if args.skip_done and (root / stage.name / "model" / "config.json").is_file():
            print(f"skip {stage.name}: {root / stage.name / 'model'} exists", flush=True)
            continue
        seconds[stage.name] = run(train_command(stage, root, args.seed), log)
        report_path.write_text(json.dumps(report, indent=1) + "\n")
    for name, cmd in eval_commands(root, args.seed, args.eval_n).items():
        if chosen & {"all", "eval", f"eval_{name}"}:
            seconds[f"eval_{name}"] = run(cmd, log)
            report_path.write_text(json.dumps(report, indent=1) + "\n")
    train = [v for k, v in seconds.items() if not k.startswith("eval_")]
    report["train_minutes"] = sum(train) / 60
    report["total_minutes"] = sum(seconds.values()) / 60
    RESULTS.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
