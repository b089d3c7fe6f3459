"""One llama.cpp measurement in a fresh process, for bench_llamacpp.py: `python llamacpp_worker.py --worker SPEC_JSON`.

It imports only numpy and llama-cpp-python (its low-level ctypes API), so it runs under any interpreter that
has them, such as a separate venv where llama-cpp-python was built (`--llama-python`). Settings as in
research/perf.md §4.4: 2 threads, prompts fed in 512-token batches, one `llama_decode` per decode step with
the argmax taken in numpy (greedy). The K/V cache is float32 unless the spec says `kv: "f16"` (llama.cpp's own
default). Flash attention as the spec's `flash_attn` says ("auto", llama.cpp's default, "on" or "off"):
bench_llamacpp.py turns it off for decoding, where llama.cpp 0.3.36's CPU decode is faster without it here
(nemo50: 3.4 vs 4.1 ms per step at 512 tokens of context, 7.3 vs 14-19 ms at 16k). Prints one JSON line.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

UBATCH = 512  # prompt tokens per llama_decode call (llama.cpp's default micro-batch)
KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type ids of GGML_TYPE_F32 / GGML_TYPE_F16
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type


def peak_rss_mib() -> float | None:
    """VmHWM of this process (the GGUF is memory-mapped, so its pages count once touched)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


class Session:
    """A llama.cpp model and one context holding `n_seq` sequences, with greedy stepping."""

    def __init__(self, model, n_ctx: int, vocab: int, threads: int, kv: str, flash_attn: str, n_seq: int = 1):
        import llama_cpp as L

        self.L, self.vocab = L, vocab
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = max(UBATCH, n_seq)
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = KV_TYPES[kv]
        cp.flash_attn_type = FLASH_ATTN[flash_attn]
        self.ctx = L.llama_init_from_model(model, cp)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.batch = L.llama_batch_init(max(UBATCH, n_seq), 0, 1)
        self.pos = [0] * n_seq

    def _decode(self, tokens: list[int], seqs: list[int], sample: list[bool]) -> list[int]:
        """One llama_decode of tokens[i] for sequence seqs[i]; the greedy next token of each sampled row."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (t, s) in enumerate(zip(tokens, seqs)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(t), self.pos[s], 1, sample[i]
            b.seq_id[i][0] = s
            self.pos[s] += 1
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = []
        for i in (i for i, x in enumerate(sample) if x):
            logits = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,))
            out.append(int(logits.argmax()))
        return out

    def feed(self, tokens: list[int], seq: int = 0) -> int:
        """Decode `tokens` of one sequence at its next positions; returns the greedy next token after the last."""
        return self._decode(tokens, [seq] * len(tokens), [i == len(tokens) - 1 for i in range(len(tokens))])[0]

    def step(self, tokens: list[int]) -> list[int]:
        """One decode step of every sequence (token i to sequence i) in one batch; their greedy next tokens."""
        return self._decode(tokens, list(range(len(tokens))), [True] * len(tokens))

    def prefill(self, prompt: list[int], seq: int = 0) -> int:
        self.L.llama_memory_seq_rm(self.L.llama_get_memory(self.ctx), seq, -1, -1)
        self.pos[seq] = 0
        for a in range(0, len(prompt), UBATCH):
            tok = self.feed(prompt[a : a + UBATCH], seq)
        return tok


_QUIET = []  # the ctypes log callback, kept alive for the process


def load(path: str):
    import llama_cpp as L

    L.llama_backend_init()
    if not _QUIET:  # llama.cpp logs to stderr; only the result goes to stdout
        _QUIET.append(L.llama_log_callback(lambda level, text, data: None))
        L.llama_log_set(_QUIET[0], None)
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    return model


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def _random(n: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def decode(spec: dict) -> dict:
    """Batch-1 greedy decode of `new` tokens after spec["prompt_ids"]; the step times after the first `drop`."""
    vocab, prompt, new, drop = spec["vocab"], spec["prompt_ids"], spec["new"], spec["drop"]
    s = Session(load(spec["gguf"]), len(prompt) + new + 8, vocab, spec["threads"], spec["kv"], spec["flash_attn"])
    tok = s.prefill(_random(32, vocab, 7))  # warm-up
    for _ in range(3):
        tok = s.feed([tok])
    t0 = time.perf_counter()
    out = [s.prefill(prompt)]
    stamps = [time.perf_counter()]
    for _ in range(new - 1):
        out.append(s.feed([out[-1]]))
        stamps.append(time.perf_counter())
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    ms = _median(steps[drop:]) * 1e3
    return {"step_ms": [x * 1e3 for x in steps], "median_ms": ms, "tok_s": 1e3 / ms, "prefill_s": stamps[0] - t0,
            "tokens": out}  # fmt: skip


def prefill(spec: dict) -> dict:
    """Batch-1 prefill of `prompt` random tokens: one warm-up, then `calls` timed calls."""
    vocab, n, calls = spec["vocab"], spec["prompt"], spec["calls"]
    s = Session(load(spec["gguf"]), n + 8, vocab, spec["threads"], spec["kv"], spec["flash_attn"])
    times = []
    for i in range(calls + 1):
        p = _random(n, vocab, 200 + i)
        t0 = time.perf_counter()
        s.prefill(p)
        times.append(time.perf_counter() - t0)
    med = _median(times[1:])
    return {"warmup_s": times[0], "times_s": times[1:], "median_s": med, "tok_s": n / med}


def context_pair(spec: dict) -> dict:
    """Decode after a `base`- and a `prompt`-token context in one process (two contexts on one model),
    alternating blocks of `block` steps, like bench_engine's w_context_pair for ours."""
    vocab, base, long_, block, blocks = spec["vocab"], spec["base"], spec["prompt"], spec["block"], spec["blocks"]
    model = load(spec["gguf"])
    sessions, last = {}, {}
    t0 = time.perf_counter()
    for L in (base, long_):
        sessions[L] = Session(model, L + block * blocks + 8, vocab, spec["threads"], spec["kv"], spec["flash_attn"])
        last[L] = sessions[L].feed([sessions[L].prefill(_random(L, vocab, 300))])  # + one untimed decode step
    setup_s = time.perf_counter() - t0
    times: dict[int, list[float]] = {base: [], long_: []}
    for b in range(blocks):
        for L in (base, long_) if b % 2 == 0 else (long_, base):
            for _ in range(block):
                t1 = time.perf_counter()
                last[L] = sessions[L].feed([last[L]])
                times[L].append(time.perf_counter() - t1)
    ms = {L: _median(v) * 1e3 for L, v in times.items()}
    return {"base": base, "prompt": long_, "base_ms": ms[base], "long_ms": ms[long_], "growth": ms[long_] / ms[base],
            "steps_each": blocks * block, "step_ms": {str(L): [t * 1e3 for t in v] for L, v in times.items()},
            "setup_s": setup_s}  # fmt: skip


def concurrency(spec: dict) -> dict:
    """`batch` sequences of `prompt` random tokens, each prefilled, then `new` steps that decode all of them in
    one batch; aggregate tok/s = batch / the median step time after the first `drop`."""
    vocab, B, n, new, drop = spec["vocab"], spec["batch"], spec["prompt"], spec["new"], spec["drop"]
    s = Session(load(spec["gguf"]), B * (n + new + 8), vocab, spec["threads"], spec["kv"], spec["flash_attn"], B)
    last = [s.prefill(_random(n, vocab, 100 + i), i) for i in range(B)]
    steps = []
    for _ in range(new - 1):
        t0 = time.perf_counter()
        last = s.step(last)
        steps.append(time.perf_counter() - t0)
    ms = _median(steps[drop:]) * 1e3
    return {"step_ms": [x * 1e3 for x in steps], "median_ms": ms, "tok_s": B / ms * 1e3}


SCENARIOS = {"decode": decode, "prefill": prefill, "context_pair": context_pair, "concurrency": concurrency}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: llamacpp_worker.py --worker SPEC_JSON", file=sys.stderr)
        return 2
    spec = json.loads(argv[1])
    t0 = time.perf_counter()
    res = SCENARIOS[spec["scenario"]](spec)
    res.update(worker_s=time.perf_counter() - t0, peak_rss_mib=peak_rss_mib(), spec={**spec, "prompt_ids": None})
    import llama_cpp

    res["llama_cpp_python"] = llama_cpp.__version__
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
