"""Serving under concurrency: streaming time-to-first-token and throughput of `nemotron3 serve` (issue 7).

    python benchmarks/bench_serve.py [--model default] [--concurrency 1 4 16 64] [--max-tokens 64]

Starts the OpenAI-compatible server in this process (uvicorn on 127.0.0.1, the engine loop on its own
thread), then for each concurrency level C sends C streaming /v1/completions requests at once (loopback,
httpx) with distinct prompts, greedy, ignore_eos, `--max-tokens` each, `--rounds` times. Per request:
TTFT (send → first content chunk) and the inter-token gaps; per level: median and p90 TTFT, median
inter-token latency, aggregate generated tokens/s (all tokens / wall time of the round). Writes
benchmarks/results/serve.json and serve.png. The client runs on the same 2 cores as the server, so
the numbers include its cost; compare levels, not absolute values against other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from pathlib import Path

import httpx

from nemotron3.serve.api import ServeConfig, ServerThread, build_client, create_app

ROOT = Path(__file__).resolve().parents[1]


async def one_request(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("text") is not None:
                    stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"ttft": stamps[0] - t0 if stamps else None, "chunks": len(stamps), "gaps": gaps, "end": time.perf_counter()}


async def one_level(url: str, concurrency: int, max_tokens: int, round_index: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        prompts = [f"Request {round_index}-{i}: ROMEO.\n" for i in range(concurrency)]
        results = await asyncio.gather(*(one_request(http, url, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    gaps = [g for r in results for g in r["gaps"]]
    return {
        "concurrency": concurrency, "wall_s": wall, "tokens": concurrency * max_tokens,
        "tokens_per_s": concurrency * max_tokens / wall,
        "ttft_median_s": statistics.median(ttfts), "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        "itl_median_s": statistics.median(gaps) if gaps else None,
    }  # fmt: skip


def plot(levels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [x["concurrency"] for x in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.plot(c, [x["tokens_per_s"] for x in levels], "o-", color="#76b900")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrent streaming requests")
    a.set_ylabel("aggregate generated tokens/s")
    b.plot(c, [1000 * x["ttft_median_s"] for x in levels], "o-", label="TTFT median")
    b.plot(c, [1000 * x["ttft_p90_s"] for x in levels], "o--", label="TTFT p90")
    b.plot(c, [1000 * (x["itl_median_s"] or 0) for x in levels], "s-", label="inter-token median")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("concurrent streaming requests")
    b.set_ylabel("ms")
    b.legend()
    fig.suptitle("nemotron3 serve, streaming /v1/completions (loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="repeats per level; the median-throughput round is kept")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    client = build_client(args.model, max_num_seqs=args.max_num_seqs)
    app = create_app(client, ServeConfig(model_names=["bench"]))
    levels = []
    try:
        with ServerThread(app) as url:
            asyncio.run(one_level(url, 1, 4, -1))  # warm-up: first-call allocations, uvicorn
            for c in args.concurrency:
                rounds = [asyncio.run(one_level(url, c, args.max_tokens, r)) for r in range(args.rounds)]
                rounds.sort(key=lambda x: x["tokens_per_s"])
                levels.append({**rounds[len(rounds) // 2], "rounds_tokens_per_s": [x["tokens_per_s"] for x in rounds]})
                x = levels[-1]
                print(f"C={c:4d}: {x['tokens_per_s']:8.1f} tok/s  TTFT median {1000 * x['ttft_median_s']:7.1f} ms  "
                      f"p90 {1000 * x['ttft_p90_s']:7.1f} ms  ITL {1000 * (x['itl_median_s'] or 0):6.1f} ms", flush=True)  # fmt: skip
    finally:
        client.shutdown()
    result = {"model": args.model, "max_tokens": args.max_tokens, "levels": levels}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_plot:
        plot(levels, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
