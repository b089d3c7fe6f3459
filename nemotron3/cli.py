"""The `nemotron3` command. Each subcommand is an `add_<name>(subparsers)` that registers its parser
and a `cmd_<name>(args) -> int` that runs it; `main` parses and dispatches.

    nemotron3 info <preset|dir> [--json]     layer pattern, parameter counts, weight/cache memory
    nemotron3 eval tasks|budget|ruler|perplexity --model [LABEL=]PATH ... --out R.json   (JSON + R.png)

Exit codes: 0 success, 2 bad arguments (unknown model, unreadable config.json, usage errors).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nemotron3.config import PRESETS, ModelConfig, preset
from nemotron3.default_model import resolve_model
from nemotron3.summary import KIND_NAMES, ModelSummary, summarize

EXIT_OK, EXIT_USAGE = 0, 2


class ModelSpecError(ValueError):
    """The model argument names neither a preset nor a directory with a readable config.json."""


# --------------------------------------------------------------------------------------------- models


def resolve_config(spec: str) -> tuple[str, ModelConfig]:
    """(display name, config) for a preset name, an unambiguous preset prefix ("nano"), a directory
    holding config.json, or a config.json path. Only the config is read, never weights."""
    try:
        spec = str(resolve_model(spec))
    except FileNotFoundError as e:
        raise ModelSpecError(str(e)) from None
    path = Path(spec)
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        try:
            return str(path), ModelConfig.from_json(path)
        except (OSError, ValueError, TypeError) as e:
            raise ModelSpecError(f"cannot read the model config at {path}: {e}") from None
    if spec in PRESETS:
        return spec, preset(spec)
    matches = [name for name in PRESETS if name.startswith(spec)] if spec else []
    if len(matches) == 1:
        return matches[0], preset(matches[0])
    presets = ", ".join(PRESETS)
    if len(matches) > 1:
        raise ModelSpecError(f"model {spec!r} is ambiguous: it could be {', '.join(matches)}")
    raise ModelSpecError(
        f"unknown model {spec!r}: not a preset and not a directory with a config.json. Presets: {presets}"
    )


# --------------------------------------------------------------------------------------------- formatting


def human_count(n: int) -> str:
    """1234567 → '1.23M' (decimal units, as parameter counts are quoted)."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    """Binary units: 6442450944 → '6.00 GiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def human_tokens(n: int) -> str:
    """8192 → '8k', 1048576 → '1M' (the binary 'k' and 'M' of context lengths)."""
    if n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n % 2**10 == 0:
        return f"{n // 2**10}k"
    return str(n)


def human_weight_bytes(n: int) -> str:
    """Weights in GiB and GB (checkpoint sizes are usually quoted in decimal GB)."""
    return f"{human_bytes(n)} ({n / 1e9:,.1f} GB)" if n >= 10**8 else human_bytes(n)


PART_LABELS = {
    "embeddings": "input embeddings",
    "mamba": "mamba layers",
    "attention": "attention layers",
    "moe": "moe layers excl. routed experts",
    "mlp": "mlp layers",
    "moe_routed_experts": "moe routed experts",
    "norm_f": "final norm",
    "lm_head": "lm_head",
}


def shape_line(c: ModelConfig) -> str:
    latent = c.moe_latent_size if c.moe_latent_size is not None else "none"
    return (
        f"H {c.hidden_size} · vocab {c.vocab_size} · attention {c.num_attention_heads}q/{c.num_key_value_heads}kv"
        f"×{c.head_dim} · Mamba {c.mamba_num_heads}×{c.mamba_head_dim} heads, N {c.ssm_state_size}, G {c.n_groups}"
        f" · MoE {c.n_routed_experts} experts top-{c.num_experts_per_tok}, F {c.moe_intermediate_size},"
        f" shared {c.moe_shared_expert_intermediate_size}, latent {latent}"
    )


def _param_table(s: ModelSummary) -> Table:
    table = Table(title="Parameters")
    table.add_column("")
    table.add_column("≈", justify="right")
    table.add_column("exact", justify="right")
    rows = [
        ("total (excl. MTP)", s.total_params),
        ("active / token (incl. embedding)", s.active_params),
        ("active / token (excl. embedding)", s.active_params_excl_embedding),
    ]
    if s.mtp_blocks:
        rows += [("MTP block(s)", s.mtp_params), ("MTP active / token", s.mtp_active_params)]
    for label, n in rows:
        table.add_row(label, human_count(n), f"{n:,}")
    table.add_section()
    for part, n in s.params_by_part.items():
        if n:
            table.add_row(f"  {PART_LABELS.get(part, part)}", human_count(n), f"{n:,}")
    return table


def _weight_table(s: ModelSummary) -> Table:
    table = Table(title="Weight memory (estimates, assumptions below)")
    table.add_column("format")
    table.add_column("main model", justify="right")
    if s.mtp_blocks:
        table.add_column("with MTP", justify="right")
    for w in s.weight_memory:
        cells = [w.format, human_weight_bytes(w.bytes)]
        cells += [human_weight_bytes(w.bytes_with_mtp)] if s.mtp_blocks else []
        table.add_row(*cells)
    return table


def _cache_table(s: ModelSummary) -> Table:
    table = Table(title="Cache per sequence (KV bf16; Mamba SSM + conv state)")
    table.add_column("context", justify="right")
    table.add_column("KV", justify="right")
    if s.mtp_blocks:
        table.add_column("MTP KV", justify="right")
    table.add_column("Mamba state", justify="right")
    table.add_column("total", justify="right")
    for c in s.contexts:
        cells = [human_tokens(c.tokens), human_bytes(c.kv_bytes)]
        cells += [human_bytes(c.mtp_kv_bytes)] if s.mtp_blocks else []
        cells += [human_bytes(c.mamba_state_bytes), human_bytes(c.total_bytes)]
        table.add_row(*cells)
    return table


def render_summary(console: Console, name: str, config: ModelConfig, s: ModelSummary) -> None:
    """Print the summary as rich tables (plain text when the output is not a terminal)."""
    chars = {name_: char for char, name_ in zip("M*E-", KIND_NAMES.values())}
    counts = ", ".join(f"{n} {kind} ({chars[kind]})" for kind, n in s.layer_counts.items() if n)
    console.print(f"[bold]{name}[/bold] — nemotron_h, {len(s.pattern)} layers: {counts}", highlight=False)
    console.print(shape_line(config), highlight=False)
    console.print(f"pattern {s.pattern}", soft_wrap=True, highlight=False)
    if s.mtp_blocks:
        console.print(f"MTP: {s.mtp_blocks} block(s) of pattern {s.mtp_pattern}", highlight=False)
    console.print(_param_table(s))
    console.print(_weight_table(s))
    for w in s.weight_memory:
        console.print(f"  {w.format}: {w.assumption}.", highlight=False)
    console.print(_cache_table(s))
    console.print(
        f"  KV {s.kv_bytes_per_token:,} B/token"
        + (f" (+{s.mtp_kv_bytes_per_token:,} B/token MTP)" if s.mtp_blocks else "")
        + f"; Mamba state {human_bytes(s.ssm_state_bytes)} SSM ({config.mamba_ssm_cache_dtype})"
        + f" + {human_bytes(s.conv_state_bytes)} conv (bf16), constant in length.",
        highlight=False,
    )


# --------------------------------------------------------------------------------------------- info


def add_info(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="layer pattern, parameter counts, weight and cache memory")
    presets = ", ".join(PRESETS)
    p.add_argument("model", nargs="?", default="default",
                   help=f"a preset ({presets}; a unique prefix works), a directory with config.json, or 'default' "
                   "(the embedded trained model; the default)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    try:
        name, config = resolve_config(args.model)
    except ModelSpecError as e:
        print(f"nemotron3 info: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    summary = summarize(config)
    if args.json:
        print(json.dumps({"model": name, **summary.to_dict()}, indent=2))
    else:
        render_summary(Console(), name, config, summary)
    return EXIT_OK


# --------------------------------------------------------------------------------------------- generate


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weight-dtype", default=None, choices=["bfloat16"],
                   help="weight-only bf16 on a float32 model: matrices in bf16, activations and state float32; "
                        "decode reads half the bytes (README, docs/benchmarks.md)")  # fmt: skip
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="K/V pool dtype (auto: the model's); bfloat16 holds twice the tokens")  # fmt: skip
    p.add_argument("--enforce-eager", action="store_true",
                   help="run decode steps op by op instead of replaying them as one native call "
                        "(vLLM's flag; the replay is the CPU counterpart of CUDA graphs)")  # fmt: skip
    p.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"],
                   help="prefill GEMMs, as torch.set_float32_matmul_precision: high / medium run them on AMX "
                        "tiles where the CPU has them, medium on AVX512-BF16 dot products without AMX (bf16 "
                        "products; docs/benchmarks.md)")  # fmt: skip


def _add_prefix_caching_flag(p: argparse.ArgumentParser, default: bool | None) -> None:
    """default None: on, unless --speculative-config (the speculative engine does not cache prefixes)."""
    when = {True: "on", False: "off", None: "on, off with --speculative-config"}[default]
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=default,
                   help="keep K/V blocks and Mamba states of finished requests for prompts that start with the same "
                        f"tokens (vLLM's flag; docs/serving.md). Default: {when}")  # fmt: skip


def add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text or tokens with the engine")
    p.add_argument(
        "model",
        nargs="?",
        default="default",
        help="a checkpoint directory, a preset (random weights) or 'default' (the embedded model; the default)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a text prompt (repeat for a batch); needs tokenizer.json")
    src.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeat for a batch)")
    src.add_argument("--chat", action="append", help="a user message, wrapped in the checkpoint's chat template")
    p.add_argument("--no-thinking", action="store_true", help="with --chat: enable_thinking=False")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=None, help="each generated token's logprob (and top K, with --json)")
    p.add_argument("--prompt-logprobs", type=int, default=None,
                   help="score the prompt: each prompt token's logprob (and top K, with --json), their sum, perplexity")
    p.add_argument("--beam-width", type=int, default=None,
                   help="beam search: print the K most likely continuations of each prompt, best first")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="with --beam-width: rank by cumulative logprob / length ** this")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    _add_engine_flags(p)
    _add_prefix_caching_flag(p, default=False)
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    p.add_argument("--json", action="store_true", help="print outputs as JSON lines")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from nemotron3 import LLM

    try:
        if args.prompt_ids:
            prompts = [{"prompt_token_ids": [int(t) for t in ids.split(",")]} for ids in args.prompt_ids]
        else:
            prompts = args.prompt
        params = _generate_params(args)
        llm = LLM(
            args.model, dtype=args.dtype, weight_dtype=args.weight_dtype, kv_cache_dtype=args.kv_cache_dtype,
            enforce_eager=args.enforce_eager, matmul_precision=args.matmul_precision,
            enable_prefix_caching=args.enable_prefix_caching,
        )
        if args.chat:
            tok = llm.get_tokenizer()
            if tok is None:
                raise ValueError("--chat needs a checkpoint with tokenizer.json and a chat template")
            prompts = [tok.apply_chat_template([{"role": "user", "content": m}], enable_thinking=not args.no_thinking)
                       for m in args.chat]  # fmt: skip
        if args.stream:
            if len(prompts) != 1:
                raise ValueError("--stream takes exactly one prompt")
            for delta in llm.stream(prompts[0], params):
                c = delta.outputs[0]
                print(c.text if c.text else " ".join(map(str, c.token_ids)), end="" if c.text else " ", flush=True)
            print()
            return EXIT_OK
        outputs = llm.generate(prompts, params)
    except (ValueError, FileNotFoundError) as e:
        print(f"nemotron3 generate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for out in outputs:
        scored = _prompt_score(out.prompt_token_ids, out.prompt_logprobs)
        if scored and not args.json:
            print(f"prompt: logprob {scored['logprob']:.4f} over {scored['tokens']} tokens, "
                  f"perplexity {scored['perplexity']:.3f}")  # fmt: skip
        for c in out.outputs:
            if args.json:
                line = {"prompt": out.prompt, "index": c.index, "text": c.text, "token_ids": c.token_ids,
                        "finish_reason": c.finish_reason}  # fmt: skip
                if c.logprobs is not None:
                    line["cumulative_logprob"] = c.cumulative_logprob
                    line["logprobs"] = [_entry_json(e) for e in c.logprobs]
                if scored:
                    line["prompt_score"] = scored
                    line["prompt_logprobs"] = [None] + [_entry_json(e) for e in out.prompt_logprobs[1:]]
                print(json.dumps(line))
            else:
                print(c.text if c.text else " ".join(map(str, c.token_ids)))
                if c.logprobs is not None:
                    print(f"  logprob {c.cumulative_logprob:.4f} over {len(c.token_ids)} tokens")
    return EXIT_OK


def _generate_params(args: argparse.Namespace):
    """SamplingParams from the generate flags, or BeamSearchParams with --beam-width (which refuses the flags that
    only shape sampling)."""
    from nemotron3 import BeamSearchParams, SamplingParams

    if args.beam_width is None:
        return SamplingParams(
            n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
            seed=args.seed, max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos,
            logprobs=args.logprobs, prompt_logprobs=args.prompt_logprobs,
        )  # fmt: skip
    sampling_only = {"--stream": args.stream, "--stop": args.stop, "--prompt-logprobs": args.prompt_logprobs is not None,
                     "-n": args.n != 1, "--top-p": args.top_p != 1.0, "--top-k": args.top_k > 0,
                     "--min-p": args.min_p > 0}  # fmt: skip
    refused = [flag for flag, given in sampling_only.items() if given]
    if refused:
        raise ValueError(f"{', '.join(refused)}: not with --beam-width (beam search returns --beam-width beams)")
    return BeamSearchParams(beam_width=args.beam_width, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
                            temperature=args.temperature, length_penalty=args.length_penalty)  # fmt: skip


def _prompt_score(ids: list[int], entries: list | None) -> dict | None:
    """Sum of the prompt tokens' logprobs (after the first, which nothing predicts) and the perplexity exp(−mean)."""
    if not entries or len(ids) < 2:
        return None
    total = sum(e[t].logprob for e, t in zip(entries[1:], ids[1:]))
    n = len(ids) - 1
    return {"logprob": total, "tokens": n, "perplexity": math.exp(-total / n)}


def _entry_json(entry: dict) -> dict:
    """A {token_id: Logprob} entry as JSON: token id (a string key) → {logprob, rank}."""
    return {str(t): {"logprob": v.logprob, "rank": v.rank} for t, v in entry.items()}


# --------------------------------------------------------------------------------------------- bench


def add_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="measure the engine: prefill tok/s, decode tok/s, ms/step per batch size")
    p.add_argument(
        "model",
        nargs="?",
        default="default",
        help="a checkpoint directory, a preset (random weights) or 'default' (the embedded model; the default)",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], help="concurrent requests (default 1 8 32)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per request (default 512)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    p.add_argument("--reps", type=int, default=3, help="timed prefill repetitions (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    _add_engine_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from nemotron3.bench import build_model, run_bench

    err = Console(stderr=True)
    sizes = {"--prompt-len": [args.prompt_len], "--max-tokens": [args.max_tokens], "--reps": [args.reps]}
    sizes["--batch"] = args.batch
    bad = [f"{flag} must be >= 1" for flag, values in sizes.items() if any(v < 1 for v in values)]
    if bad:
        print(f"nemotron3 bench: error: {'; '.join(bad)}", file=sys.stderr)
        return EXIT_USAGE
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    try:
        name, model = build_model(args.model, dtype, args.seed)
        if args.prompt_len + args.max_tokens > model.config.max_position_embeddings:
            raise ValueError(
                f"--prompt-len + --max-tokens = {args.prompt_len + args.max_tokens} exceeds the model's "
                f"max_position_embeddings {model.config.max_position_embeddings}"
            )
        progress = None if args.json else (lambda msg: err.print(f"[dim]{msg}[/dim]", highlight=False))
        options = {
            "kv_cache_dtype": args.kv_cache_dtype, "enforce_eager": args.enforce_eager,
            "matmul_precision": args.matmul_precision,
        }  # fmt: skip
        if args.weight_dtype is not None:
            options["weight_dtype"] = args.weight_dtype
        result = run_bench(model, args.batch, args.prompt_len, args.max_tokens, args.reps, args.seed, progress, options)
    except (ValueError, FileNotFoundError, MemoryError) as e:
        print(f"nemotron3 bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    result = {"model": name, **result}
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    console = Console()
    pre = result["prefill"]
    console.print(
        f"[bold]{name}[/bold] — {result['params'] / 1e6:,.1f} M params, {result['dtype']}"
        f"{' (bf16 matrices)' if result['weight_dtype'] != result['dtype'] else ''}"
        f"{', K/V ' + result['kv_cache_dtype'] if result['kv_cache_dtype'] != 'auto' else ''}"
        f"{', eager' if result['enforce_eager'] else ''}"
        f"{', matmul ' + result['matmul_precision'] if result['matmul_precision'] != 'highest' else ''}, "
        f"{result['threads']} threads, torch {result['torch']}; prompt {args.prompt_len} tokens, "
        f"{args.max_tokens} new per request",
        highlight=False,
    )
    console.print(
        f"prefill (batch 1): {pre['tok_s']:,.0f} tok/s ({pre['median_s'] * 1e3:,.1f} ms, "
        f"median of {len(pre['times_s'])})",
        highlight=False,
    )
    table = Table(title="decode")
    for col in ("batch", "ms/step (median)", "decode tok/s", "end-to-end tok/s", "full-batch steps"):
        table.add_column(col, justify="right")
    for d in result["decode"]:
        ms, tok = d["median_ms_per_step"], d["decode_tok_s"]
        table.add_row(
            str(d["batch"]), "-" if ms is None else f"{ms:.2f}", "-" if tok is None else f"{tok:,.1f}",
            f"{d['e2e_tok_s']:,.1f}", str(d["full_batch_steps"]),
        )  # fmt: skip
    console.print(table)
    return EXIT_OK


# --------------------------------------------------------------------------------------------- quantize


def add_quantize(subparsers: argparse._SubParsersAction) -> None:
    from nemotron3.quant.recipe import RECIPES

    p = subparsers.add_parser("quantize", help="post-training quantization to ModelOpt's NVFP4/FP8 checkpoint layout")
    p.add_argument("src", help="a checkpoint directory or a preset (random weights)")
    p.add_argument("dst", help="output directory (must be empty or absent, unless --overwrite)")
    p.add_argument("--recipe", default="ultra", help=f"quantization recipe ({', '.join(RECIPES)}; default ultra)")
    p.add_argument("--calib", type=int, default=16, help="calibration samples (default 16; 0: weight-only)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sample (default 256)")
    p.add_argument("--calib-text", default=None, help="a UTF-8 text file to calibrate on (default: random tokens)")
    p.add_argument("--no-kv-cache", action="store_true", help="write no FP8 KV-cache scales")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from nemotron3.quant.ptq import quantize_checkpoint
    from nemotron3.quant.recipe import RECIPES

    def fail(msg: str) -> int:
        print(f"nemotron3 quantize: error: {msg}", file=sys.stderr)
        return EXIT_USAGE

    if args.recipe not in RECIPES:
        return fail(f"unknown recipe {args.recipe!r}; choose one of {', '.join(RECIPES)}")
    if args.calib < 0 or args.calib_len < 1:
        return fail("--calib must be >= 0 and --calib-len >= 1")
    if not Path(args.src).is_dir() and args.src not in PRESETS:
        return fail(f"{args.src!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        return fail(f"{dst} exists and is not empty (use --overwrite to replace it)")
    try:
        r = quantize_checkpoint(args.src, dst, args.recipe, calib=args.calib, seq_len=args.calib_len,
                                calib_text=args.calib_text, kv_cache=not args.no_kv_cache,
                                overwrite=args.overwrite, seed=args.seed)  # fmt: skip
    except (ValueError, FileNotFoundError, FileExistsError, MemoryError) as e:
        return fail(str(e))
    print(f"wrote {r.directory}: recipe {r.recipe}, {r.quant_algo}, {r.quantized_modules} quantized matrices, "
          f"{human_bytes(r.bytes_on_disk)} of safetensors; calibrated on {r.calib_samples} samples "
          f"({r.calib_tokens} tokens)")  # fmt: skip
    return EXIT_OK


def add_dequantize(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dequantize", help="quantized (ModelOpt) checkpoint -> plain bf16 nemotron_h checkpoint")
    p.add_argument("src", help="a quantized checkpoint directory")
    p.add_argument("dst", help="output directory (must be empty or absent, unless --overwrite)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(func=cmd_dequantize)


def cmd_dequantize(args: argparse.Namespace) -> int:
    import torch

    from nemotron3.quant.load import dequantize_checkpoint
    from nemotron3.quant.ptq import prepare_destination

    try:
        if not Path(args.src).is_dir():
            raise FileNotFoundError(f"{args.src}: no such checkpoint directory")
        dst = prepare_destination(args.dst, args.overwrite)
        dequantize_checkpoint(args.src, dst, dtype={"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype])
    except (ValueError, FileNotFoundError, FileExistsError, MemoryError) as e:
        print(f"nemotron3 dequantize: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {dst} ({args.dtype})")
    return EXIT_OK


# --------------------------------------------------------------------------------------------- entry


# --------------------------------------------------------------------------------------------- train


# (stage, help, example recipe, resume help, an example --set)
TRAIN_STAGES = (
    ("pretrain", "pretrain a Nemotron-3-architecture model from a YAML/TOML recipe", "recipes/default.yaml",
     "continue from the newest checkpoint in run.out_dir", "run.steps=50"),
    ("sft", "supervised fine-tuning on chat-formatted task conversations", "recipes/sft.yaml",
     "continue from the newest checkpoint in run.out_dir", "model.init_from=runs/x/model"),
    ("rl", "GRPO reinforcement learning with verifiable rewards", "recipes/rl.yaml",
     "continue from the newest checkpoint in run.out_dir (bit-exact when synchronous)", "grpo.kl_coef=0.01"),
    ("mopd", "multi-teacher on-policy distillation", "recipes/mopd.yaml",
     "continue from the newest checkpoint in run.out_dir (bit-exact when synchronous)",
     "teachers.arithmetic=runs/t/model"),
)  # fmt: skip


def add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="training stages: " + ", ".join(s[0] for s in TRAIN_STAGES))
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    commands = {"pretrain": cmd_train_pretrain, "sft": cmd_train_sft, "rl": cmd_train_rl, "mopd": cmd_train_mopd}
    for name, help_text, recipe, resume_help, example in TRAIN_STAGES:
        st = stages.add_parser(name, help=f"{help_text} ({recipe})")
        st.add_argument("--config", required=True, help=f"recipe file (.yaml/.yml/.toml), e.g. {recipe}")
        st.add_argument("--resume", action="store_true", help=resume_help)
        st.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override a recipe value (YAML syntax), e.g. --set {example}; repeatable")  # fmt: skip
        st.add_argument(
            "--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)"
        )
        st.set_defaults(func=commands[name])


def apply_overrides(raw: dict, assignments: list[str]) -> dict:
    """Apply `section.key=value` overrides (values parsed as YAML) to a raw recipe dict."""
    import yaml

    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        section, field = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"--set {item!r}: recipe section {section!r} is not a mapping")
        raw[section][field] = yaml.safe_load(value)
    return raw


def _run_training(args: argparse.Namespace, stage: str, config_cls, run) -> int:
    """Read the recipe (+ --set overrides) as `config_cls` and `run` it; errors exit 2 naming the problem."""
    import dataclasses

    try:
        config = config_cls.from_file(args.config)
        if args.set:
            config = config_cls.from_dict(apply_overrides(dataclasses.asdict(config), args.set))
        summary = run(config, resume=args.resume, progress=not args.no_progress)
    except (OSError, ValueError) as e:  # includes FileNotFoundError / FileExistsError
        print(f"nemotron3 train {stage}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(json.dumps(summary, indent=1))
    return EXIT_OK


def cmd_train_pretrain(args: argparse.Namespace) -> int:
    from nemotron3.train.config import PretrainConfig
    from nemotron3.train.pretrain import pretrain

    return _run_training(args, "pretrain", PretrainConfig, pretrain)


def cmd_train_sft(args: argparse.Namespace) -> int:
    from nemotron3.train.sft import SFTConfig, sft

    return _run_training(args, "sft", SFTConfig, sft)


def cmd_train_rl(args: argparse.Namespace) -> int:
    from nemotron3.train.rl import RLConfig, rl

    return _run_training(args, "rl", RLConfig, rl)


def cmd_train_mopd(args: argparse.Namespace) -> int:
    from nemotron3.train.mopd import MOPDConfig, mopd

    return _run_training(args, "mopd", MOPDConfig, mopd)


# --------------------------------------------------------------------------------------------- eval


EVALS = (
    ("tasks", "per-domain accuracy of several models, mean ± std over instance seeds"),
    ("budget", "accuracy vs thinking budget (off, integer budgets, unbounded) and token savings"),
    ("ruler", "RULER-style key-value retrieval accuracy per (context length, needle depth)"),
    ("perplexity", "held-out next-token loss and perplexity"),
)


def add_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="post-training evaluations, each writing JSON and a PNG")
    evals = p.add_subparsers(dest="eval", required=True, metavar="EVAL")
    commands = {"tasks": cmd_eval_tasks, "budget": cmd_eval_budget, "ruler": cmd_eval_ruler,
                "perplexity": cmd_eval_perplexity}  # fmt: skip
    for name, help_text in EVALS:
        e = evals.add_parser(name, help=help_text)
        e.add_argument("--model", action="append", default=None, metavar="[LABEL=]PATH",
                       help="a checkpoint directory or 'default' (the embedded model), optionally labelled; "
                       + ("one model" if name == "ruler" else "repeatable"))  # fmt: skip
        e.add_argument("--out", default=f"benchmarks/results/eval_{name}.json",
                       help=f"JSON result path; the PNG goes next to it (default benchmarks/results/eval_{name}.json)")  # fmt: skip
        e.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
        e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        if name in ("tasks", "budget"):
            e.add_argument("--seeds", type=int, default=3, help="instance seeds EVAL_SEED+0.. (default 3)")
            e.add_argument("--task-options", default=None, metavar="RECIPE",
                           help="take task options from a recipe (data.task_options or rollout.task_options)")  # fmt: skip
            e.add_argument("--set-option", action="append", default=[], metavar="DOMAIN.KEY=VALUE",
                           help="override a task option (YAML value), e.g. arithmetic.digits=[1,2]; repeatable")  # fmt: skip
        if name in ("tasks", "ruler"):
            e.add_argument("--thinking", default="on", choices=["on", "off"] + (["both"] if name == "tasks" else []))
        if name == "tasks":
            e.add_argument("--domains", default="arithmetic:100,sorting:50,tool_use:50,retrieval:50",
                           help="DOMAIN:N,... instances per seed (default arithmetic:100,sorting:50,tool_use:50,retrieval:50)")  # fmt: skip
            e.add_argument("--max-tokens", type=int, default=384, help="with thinking on (default 384)")
            e.add_argument("--max-tokens-off", type=int, default=64, help="with thinking off (default 64)")
        elif name == "budget":
            e.add_argument("--label", default=None, help="label of a single unlabelled --model")
            e.add_argument("--domain", default="arithmetic")
            e.add_argument("-n", "--n", type=int, default=100, help="instances per seed (default 100)")
            e.add_argument("--budgets", default="off,16,48,96,unbounded",
                           help="off, unbounded, integers >= 0 or level names (default off,16,48,96,unbounded)")  # fmt: skip
            e.add_argument("--levels", default="low=16,medium=48,high=96", help="level names -> budgets")
            e.add_argument("--max-tokens", type=int, default=384, help="reasoning + answer (default 384)")
        elif name == "ruler":
            e.add_argument("--lengths", default="256,512,1024,2048,4096", help="context lengths in tokens")
            e.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
            e.add_argument("-n", "--n", type=int, default=8, help="questions per cell (default 8)")
            e.add_argument("--max-tokens", type=int, default=None, help="default 128 (thinking on) or 32 (off)")
            e.add_argument("--max-model-len", type=int, default=None,
                           help="engine context limit (capped at the model's max_position_embeddings)")  # fmt: skip
        else:
            e.add_argument("--files", nargs="+", default=None, help="held-out text files (default: the "
                           "pretraining corpus's valid.txt)")  # fmt: skip
            e.add_argument("--seq-len", type=int, default=256)
            e.add_argument("--sequences", type=int, default=64)
        e.set_defaults(func=commands[name])


def _eval_task_options(args: argparse.Namespace) -> dict:
    from nemotron3.eval.common import load_task_options, set_task_option

    options = load_task_options(args.task_options) if args.task_options else {}
    for item in args.set_option:
        options = set_task_option(options, item)
    return options


def _run_eval(args: argparse.Namespace, evaluate) -> int:
    """Set threads, run `evaluate()` -> result dict, write JSON + PNG; errors exit 2 naming the problem."""
    import torch

    from nemotron3.eval import write_result

    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if not str(args.out).endswith(".json"):
            raise ValueError(f"--out must name a .json file, got {args.out}")
        result = evaluate()
        out, png = write_result(result, args.out)
    except (ValueError, FileNotFoundError, MemoryError) as e:
        print(f"nemotron3 eval {args.eval}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return EXIT_OK


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    from nemotron3.eval import TasksConfig, evaluate_tasks
    from nemotron3.eval.tasks import parse_domains

    def run() -> dict:
        config = TasksConfig(parse_domains(args.domains), args.seeds, args.thinking, _eval_task_options(args),
                             args.max_tokens, args.max_tokens_off)  # fmt: skip
        return evaluate_tasks(args.model or ["default"], config, dtype=args.dtype)

    return _run_eval(args, run)


def cmd_eval_budget(args: argparse.Namespace) -> int:
    from nemotron3.eval import BudgetConfig, evaluate_budget
    from nemotron3.eval.budget import parse_levels

    def run() -> dict:
        models = args.model or ["default"]
        if args.label is not None:
            if len(models) != 1 or "=" in models[0]:
                raise ValueError("--label names a single unlabelled --model; use --model LABEL=PATH for several")
            models = [f"{args.label}={models[0]}"]
        config = BudgetConfig(args.domain, args.n, args.seeds, [b for b in args.budgets.split(",") if b.strip()],
                              parse_levels(args.levels), args.max_tokens, _eval_task_options(args))  # fmt: skip
        return evaluate_budget(models, config, dtype=args.dtype)

    return _run_eval(args, run)


def cmd_eval_ruler(args: argparse.Namespace) -> int:
    from nemotron3.eval import RulerConfig, evaluate_ruler
    from nemotron3.eval.common import parse_int_list

    def run() -> dict:
        models = args.model or ["default"]
        if len(models) != 1:
            raise ValueError(f"--model: eval ruler takes one model, got {len(models)}")
        try:
            depths = [float(x) for x in args.depths.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--depths expects comma-separated numbers in [0, 1], got {args.depths!r}") from None
        config = RulerConfig(parse_int_list(args.lengths, "--lengths"), depths, args.n, args.thinking == "on",
                             args.max_tokens)  # fmt: skip
        opts = {"dtype": args.dtype}
        if args.max_model_len is not None:
            opts["max_model_len"] = args.max_model_len
        return evaluate_ruler(models[0], config, **opts)

    return _run_eval(args, run)


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    import torch

    from nemotron3.eval import PerplexityConfig, evaluate_perplexity

    def run() -> dict:
        config = PerplexityConfig(args.files or [], args.seq_len, args.sequences)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        return evaluate_perplexity(args.model or ["default"], config, dtype=dtype)

    return _run_eval(args, run)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="default",
                   help="a checkpoint directory, a preset (random weights) or 'default' (the embedded model)")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    _add_engine_flags(p)
    _add_prefix_caching_flag(p, default=None)  # serve and chat: repeated prefixes (turns, system prompts) are the rule
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='MTP speculative decoding, as vLLM: \'{"method": "mtp", "num_speculative_tokens": 3}\'')  # fmt: skip


def _llm_options(args: argparse.Namespace) -> dict:
    """LLM(...) options from the shared model flags; a malformed --speculative-config is a ValueError."""
    opts = {"dtype": args.dtype, "device": args.device, "max_num_seqs": args.max_num_seqs}
    if args.weight_dtype is not None:
        opts["weight_dtype"] = args.weight_dtype
    opts["kv_cache_dtype"] = args.kv_cache_dtype
    opts["enforce_eager"] = args.enforce_eager
    opts["matmul_precision"] = args.matmul_precision
    caching = args.enable_prefix_caching
    opts["enable_prefix_caching"] = args.speculative_config is None if caching is None else caching
    if args.max_model_len is not None:
        opts["max_model_len"] = args.max_model_len
    if args.speculative_config is not None:
        try:
            opts["speculative_config"] = json.loads(args.speculative_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--speculative-config is not valid JSON: {e}") from None
    return opts


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, reasoning, tools)")
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", action="append", default=None, help="name(s) clients use (default: MODEL)")
    p.add_argument("--api-key", default=os.environ.get("NEMOTRON3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $NEMOTRON3_API_KEY)")  # fmt: skip
    p.add_argument("--cors", action="append", default=None, metavar="ORIGIN",
                   help="allow cross-origin requests from ORIGIN ('*' for any); repeatable")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from nemotron3.serve.api import serve

    try:
        serve(args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
              api_key=args.api_key, cors_origins=args.cors, log_level=args.log_level, **_llm_options(args))  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"nemotron3 serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def add_chat(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="interactive terminal chat (thinking shown dimmed)")
    _add_model_options(p)
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--no-thinking", action="store_true", help="start with thinking off (/think on to change)")
    p.add_argument("--budget", type=int, default=None, help="reasoning-token budget (/budget N to change)")
    p.add_argument("--tools", action="store_true",
                   help="offer the demo tools (calculator, lookup) and run the model's calls (/tools on|off)")  # fmt: skip
    p.add_argument("--max-tool-rounds", type=int, default=3, help="tool call → answer rounds per user turn")
    p.add_argument("--message", action="append", default=None, metavar="TEXT",
                   help="run this user turn (or /command) instead of reading stdin; repeatable, then exit")  # fmt: skip
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from nemotron3.serve.chat import run_chat

    try:
        return run_chat(args.model, system=args.system, max_tokens=args.max_tokens, temperature=args.temperature,
                        top_p=args.top_p, thinking=not args.no_thinking, budget=args.budget, tools=args.tools,
                        max_tool_rounds=args.max_tool_rounds, messages=args.message,
                        **_llm_options(args))  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"nemotron3 chat: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemotron3", description="Nemotron 3 (nemotron_h) in PyTorch.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_info(subparsers)
    add_generate(subparsers)
    add_bench(subparsers)
    add_quantize(subparsers)
    add_dequantize(subparsers)
    add_train(subparsers)
    add_serve(subparsers)
    add_chat(subparsers)
    add_eval(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point (`nemotron3 = "nemotron3.cli:main"`); returns the exit code instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    return args.func(args)
