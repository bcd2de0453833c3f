"""Building pre-LayerNorm RoBERTa encoders from a preset's shapes, and counting their parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM

from atm_ray.config import ModelShape
from atm_ray.data.tokenizer import SpecialTokens


def roberta_config(shape: ModelShape, vocab_size: int, special: SpecialTokens = SpecialTokens()) -> RobertaPreLayerNormConfig:
    return RobertaPreLayerNormConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size,
        # RoBERTa offsets positions by padding_idx + 1.
        max_position_embeddings=shape.max_positions + special.pad + 1,
        hidden_dropout_prob=shape.dropout,
        attention_probs_dropout_prob=shape.dropout,
        type_vocab_size=1,
        pad_token_id=special.pad,
        bos_token_id=special.bos,
        eos_token_id=special.eos,
        tie_word_embeddings=True,
    )


def build_masked_lm(shape: ModelShape, vocab_size: int, seed: int | None = None,
                    special: SpecialTokens = SpecialTokens()) -> RobertaPreLayerNormForMaskedLM:
    if seed is not None:
        torch.manual_seed(seed)
    return RobertaPreLayerNormForMaskedLM(roberta_config(shape, vocab_size, special))


@dataclass(frozen=True)
class ParameterCount:
    embedding: int
    non_embedding: int

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding


def count_parameters(shape: ModelShape, vocab_size: int) -> ParameterCount:
    """Count an encoder's parameters on the meta device: no weight is allocated, so 9B shapes are free.

    Embedding parameters are the word, position and token-type tables (the LM head is tied to the
    word table, its bias and transform are counted as non-embedding), as in the paper's convention.
    """
    with torch.device("meta"):
        model = RobertaPreLayerNormForMaskedLM(roberta_config(shape, vocab_size))
    embedding_tables = model.roberta_prelayernorm.embeddings
    embedding_ids = {
        id(parameter)
        for module in (
            embedding_tables.word_embeddings,
            embedding_tables.position_embeddings,
            embedding_tables.token_type_embeddings,
        )
        for parameter in module.parameters()
    }
    embedding = non_embedding = 0
    for parameter in model.parameters():  # tied weights appear once
        if id(parameter) in embedding_ids:
            embedding += parameter.numel()
        else:
            non_embedding += parameter.numel()
    return ParameterCount(embedding=embedding, non_embedding=non_embedding)
