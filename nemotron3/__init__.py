"""nemotron3: NVIDIA Nemotron 3 (nemotron_h) as open, readable PyTorch."""

from nemotron3.config import ModelConfig
from nemotron3.engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from nemotron3.engine.llm import LLM
from nemotron3.engine.outputs import CompletionOutput, RequestOutput
from nemotron3.engine.sampling_params import SamplingParams, StructuredOutputsParams
from nemotron3.io.checkpoint import save_checkpoint
from nemotron3.loader import load_model

__all__ = [
    "LLM", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "CompletionOutput", "ModelConfig", "RequestOutput", "SamplingParams", "StructuredOutputsParams",
    "load_model", "save_checkpoint",
]  # fmt: skip
