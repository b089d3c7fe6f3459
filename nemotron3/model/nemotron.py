"""The Nemotron-H causal LM: embeddings → blocks → norm_f → lm_head, plus the optional MTP block.

Parameter names are the hub's (`backbone.*`, `lm_head.*`, `mtp.layers.*`; architecture.md §9) except
that routed experts are stacked per layer (`experts.up_proj` [E, F, L], `experts.down_proj` [E, L, F]);
nemotron3.io.checkpoint maps them to the per-expert tensors on disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.model.block import Block
from nemotron3.model.cache import ModelCache
from nemotron3.model.mamba2 import Mamba2Mixer, segments_of
from nemotron3.model.moe import Experts, Router
from nemotron3.model.mtp import MTP
from nemotron3.model.norm import GatedRMSNorm, RMSNorm

SSM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tensors kept in float32 whatever the model dtype: the router's selection bias (as the reference keeps
# it) and the Mamba per-head tensors that feed exp() of the recurrence (as vLLM keeps A). All are tiny.
FP32_TENSORS = ("e_score_correction_bias", "A_log", "D", "dt_bias")


def keeps_fp32(name: str) -> bool:
    """True for parameter/buffer names that stay float32 in a bf16/fp16 model."""
    return name.rsplit(".", 1)[-1] in FP32_TENSORS


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [b, t_kept, V] float32
    hidden_states: torch.Tensor  # [b, t, H] after norm_f (the MTP block's input)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth d: [b, t, V], predicts token t+1+d


class Backbone(nn.Module):
    """`backbone.*`: embeddings, the layer stack and the final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, kind) for kind in config.layers_block_type)
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class NemotronHForCausalLM(nn.Module):
    """Checkpoint-compatible Nemotron 3 (Nano / Super / Ultra and any smaller `nemotron_h` config)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = MTP(config) if config.num_nextn_predict_layers > 0 else None

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: the embedding table's (matrices may be stored narrower, engine/runner.py)."""
        return self.backbone.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self, batch_size: int) -> ModelCache:
        """An empty cache for `batch_size` sequences: K/V grow per step; Mamba states are preallocated."""
        dtype, device = self.dtype, self.device
        ssm_dtype = SSM_DTYPES[self.config.mamba_ssm_cache_dtype]
        states = []
        for block in self.backbone.layers:
            if isinstance(block.mixer, Mamba2Mixer):
                states.append(block.mixer.new_state(batch_size, dtype, device, ssm_dtype))
            else:
                states.append(block.new_state(batch_size, dtype, device))
        mtp_states = [layer.new_state(batch_size, dtype, device) for layer in self.mtp.layers] if self.mtp else []
        return ModelCache(layers=states, mtp_layers=mtp_states)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: ModelCache | None = None,
        logits_to_keep: int = 0,
        doc_ids: torch.Tensor | None = None,
        mtp_depths: int = 0,
    ) -> CausalLMOutput:
        """input_ids: [b, t] int64. With `cache`, continues from it and advances it in place.

        logits_to_keep > 0 computes logits for the last that many positions only (generation needs 1).
        doc_ids [b, t] (packed training, no cache): each run of equal ids is a separate document; no
        attention, conv or SSM state crosses from one into the next (nemotron3.train.data.pack).
        mtp_depths > 0 (training, no cache) also runs the MTP block(s) for depths 1 … mtp_depths
        (see `mtp_forward`); their logits come back in `mtp_logits`.
        Returns logits [b, t or logits_to_keep, V] float32 and the final-norm hidden states [b, t, H].
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"input_ids out of range: values must lie in [0, {self.config.vocab_size}), "
                f"got min {int(input_ids.min())} max {int(input_ids.max())}"
            )
        if cache is not None and len(cache.layers) != len(self.backbone.layers):
            raise ValueError(
                f"cache has {len(cache.layers)} layer states, model has {len(self.backbone.layers)} layers"
            )
        segments = None
        if doc_ids is not None:
            if doc_ids.shape != input_ids.shape:
                raise ValueError(
                    f"doc_ids shape {tuple(doc_ids.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
                )
            if cache is not None:
                raise ValueError("doc_ids (packed documents) cannot be combined with a cache")
            segments = segments_of(doc_ids)
        hidden = self.backbone.embeddings(input_ids)
        # One new token after cached history is a decode step; a first token is prefill (as in transformers).
        decode = cache is not None and cache.seq_len > 0 and input_ids.shape[1] == 1
        for i, block in enumerate(self.backbone.layers):
            hidden = block(hidden, cache.layers[i] if cache is not None else None, decode, segments)
        hidden = self.backbone.norm_f(hidden)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        mtp_logits = self.mtp_forward(hidden, input_ids, mtp_depths, segments) if mtp_depths > 0 else []
        return CausalLMOutput(logits=self.lm_head(kept).float(), hidden_states=hidden, mtp_logits=mtp_logits)

    def mtp_forward(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, depths: int, segments: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Training-time MTP over whole sequences: depth d (1 … depths) combines the previous depth's output
        (depth 1: the main final-norm `hidden`) with the embedding of token t+d and predicts token t+1+d.
        Depth d uses block min(d, num_blocks) − 1: one block applied recursively, as Megatron's
        `mtp_use_repeated_layer`. Positions whose token t+d lies past the end read token 0 (mask them).
        Returns float32 logits [b, t, V] per depth."""
        if self.mtp is None:
            raise ValueError("this model has no MTP block (num_nextn_predict_layers = 0)")
        out, h = [], hidden
        for d in range(1, depths + 1):
            next_ids = F.pad(input_ids[:, d:], (0, d), value=0)
            h = self.mtp(
                h, self.backbone.embeddings(next_ids), block_index=min(d, self.mtp.num_blocks) - 1, segments=segments
            )
            out.append(self.lm_head(h).float())
        return out

    def to_dtype(self, dtype: torch.dtype) -> NemotronHForCausalLM:
        """Cast floating weights to `dtype`, keeping FP32_TENSORS in float32 (use instead of .to(dtype))."""
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(torch.float32 if keeps_fp32(name) else dtype)
        return self

    # ------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random initialisation as the reference does for new models (architecture.md §14).

        Linear/conv/embedding/router/expert weights ~ N(0, initializer_range), biases 0, norms 1;
        Mamba A_log = log(1..nh), D = 1, dt_bias = softplus⁻¹(Δ) with Δ log-uniform in
        [time_step_min, time_step_max] (≥ time_step_floor); Mamba out_proj kaiming-uniform / √n_layers.
        """
        cfg = self.config
        std = cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                module.weight.fill_(1.0)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std, generator=generator)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                module.up_proj.normal_(0.0, std, generator=generator)
                module.down_proj.normal_(0.0, std, generator=generator)
        for module in self.modules():
            if isinstance(module, Mamba2Mixer):
                self._init_mamba(module, generator)

    def _init_mamba(self, mixer: Mamba2Mixer, generator: torch.Generator | None) -> None:
        cfg = self.config
        nh = mixer.num_heads
        mixer.A_log.copy_(torch.log(torch.arange(1, nh + 1, dtype=torch.float32)))
        mixer.D.fill_(1.0)
        lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
        u = torch.rand(nh, generator=generator, device=mixer.dt_bias.device if generator is None else generator.device)
        dt = torch.exp(u * (hi - lo) + lo).clamp(min=cfg.time_step_floor)
        mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        if cfg.rescale_prenorm_residual:
            w = mixer.out_proj.weight
            bound = 1.0 / math.sqrt(w.shape[1])  # kaiming_uniform_(a=√5) bound = 1/√fan_in
            # drawn and scaled in fp32, rounded once to the model dtype: the same seed gives the same model
            draw = torch.empty(w.shape, dtype=torch.float32, device=w.device).uniform_(
                -bound, bound, generator=generator
            )
            w.copy_(draw.div_(math.sqrt(cfg.num_hidden_layers)))
