"""The Nemotron-H model: exact math of every mixer, blocks, the causal LM and the MTP block."""

from nemotron3.model.cache import ModelCache
from nemotron3.model.nemotron import CausalLMOutput, NemotronHForCausalLM

__all__ = ["CausalLMOutput", "ModelCache", "NemotronHForCausalLM"]
