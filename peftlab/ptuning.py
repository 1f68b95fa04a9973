"""P-tuning: prompt tuning whose virtual tokens come out of a small prompt encoder, not learned directly.

Prompt tuning learns the (P x d) virtual tokens themselves. P-tuning learns an embedding ``E``
(P x d) and a small network that maps it to the virtual tokens, ``prompt = f(E)``: an MLP
(``Linear -> ReLU -> Linear -> ReLU -> Linear``) or a bidirectional LSTM followed by an MLP. The
encoder couples the virtual tokens (the LSTM lets each see its neighbours), which Liu et al.
found to train faster and more stably than independent vectors. After training only ``f(E)``
is needed: the file holds the virtual tokens, and loading it gives a plain soft prompt.

As in HF peft the virtual tokens are prepended to the input; the paper also places them at
template positions inside the text, which this module does not do.

References:
    - Liu et al., "GPT Understands, Too" (P-tuning), arXiv:2103.10385.
    - HF peft ``tuners/p_tuning`` (``PromptEncoder``; the parameter names here match it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from . import files
from .heads import TASK_TYPES
from .prompt import PromptTuningModel, is_prompt_model, load_prompt, save_prompt
from .validate import in_range, one_of, positive_int

ENCODER_TYPES = ("MLP", "LSTM")


@dataclass
class PTuningConfig:
    """P-tuning hyper-parameters (HF peft's ``PromptEncoderConfig`` field names).

    >>> PTuningConfig(encoder_reparameterization_type="GRU")
    Traceback (most recent call last):
    ...
    ValueError: encoder_reparameterization_type must be one of ('MLP', 'LSTM'), got 'GRU'
    """

    peft_type: ClassVar[str] = "P_TUNING"
    num_virtual_tokens: int = 20  # P
    encoder_reparameterization_type: str = "MLP"  # "MLP" | "LSTM"
    encoder_hidden_size: int | None = None  # None: the model's embedding width d
    encoder_num_layers: int = 2  # LSTM layers (the MLP always has 3 linear layers)
    encoder_dropout: float = 0.0  # between LSTM layers
    task_type: str | None = None  # "SEQ_CLS" or "CAUSAL_LM"; None: read from the model

    def __post_init__(self):
        positive_int("num_virtual_tokens", self.num_virtual_tokens)
        one_of("encoder_reparameterization_type", self.encoder_reparameterization_type, ENCODER_TYPES)
        if self.encoder_hidden_size is not None:
            positive_int("encoder_hidden_size", self.encoder_hidden_size)
        positive_int("encoder_num_layers", self.encoder_num_layers)
        in_range("encoder_dropout", self.encoder_dropout, 0, 1)
        one_of("task_type", self.task_type, TASK_TYPES)


class PromptEncoder(nn.Module):
    """``E`` (P x d) and the network ``f``; ``forward()`` returns the (P, d) virtual tokens ``f(E)``.

    >>> enc = PromptEncoder(PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8), token_dim=16)
    >>> tuple(enc().shape)
    (4, 16)
    >>> sum(p.numel() for p in enc.parameters())  # E + (16*8+8) + (8*8+8) + (8*16+16)
    416
    """

    def __init__(self, config: PTuningConfig, token_dim: int):
        super().__init__()
        d, h = token_dim, config.encoder_hidden_size or token_dim
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.num_virtual_tokens, d)
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, d))

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight  # (P, d)
        if self.encoder_type == "LSTM":
            e = self.lstm_head(e.unsqueeze(0))[0].squeeze(0)  # (P, 2h): each token sees both neighbours
        return self.mlp_head(e)  # (P, d)


def apply_ptuning(model: nn.Module, config: PTuningConfig) -> PromptTuningModel:
    """Freeze ``model`` and prepend virtual tokens made by a :class:`PromptEncoder`.

    Save and load it with :func:`peftlab.prompt.save_prompt` / :func:`peftlab.prompt.load_prompt`
    (or ``peftlab.save_adapter`` / ``load_adapter``): the file holds the virtual tokens ``f(E)``, so it
    loads as a plain soft prompt. Run the base alone with :func:`peftlab.prompt.disable_prompt`.

    >>> from peftlab.models import build_from_config
    >>> m = apply_ptuning(build_from_config("tiny-llama"), PTuningConfig(num_virtual_tokens=3))
    >>> m(torch.tensor([[5, 6]])).logits.shape
    torch.Size([1, 5, 256])
    """
    encoder = PromptEncoder(config, model.get_input_embeddings().embedding_dim)
    return PromptTuningModel(model, config, prompt_encoder=encoder)


# A P_TUNING file (ours or HF peft's, peft_type "P_TUNING") loads as a plain soft prompt.
files.register(PTuningConfig.peft_type, save=save_prompt, load=load_prompt,
               applied=lambda model: is_prompt_model(model, PTuningConfig.peft_type))
