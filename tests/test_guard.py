"""Perplexity, LM loss, KL and the perplexity gate against hand computations."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from recsys_core.train.guard import kl_to_reference, lm_loss, perplexity, ppl_gate

pytestmark = pytest.mark.unit


class Uniform(torch.nn.Module):
    """Every next token equally likely among V: perplexity is exactly V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class Copy(torch.nn.Module):
    """p(next = current token) = 1/2, the other V-1 tokens share the rest equally."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        p = torch.full((*input_ids.shape, self.vocab), 0.5 / (self.vocab - 1))
        p.scatter_(-1, input_ids.unsqueeze(-1), 0.5)
        return SimpleNamespace(logits=p.log())


def test_perplexity_of_uniform_model_is_vocab_size():
    ids = torch.randint(0, 7, (23,))
    for window, stride in [(4, 2), (5, 5), (23, 1), (30, 30)]:
        assert perplexity(Uniform(7), ids, window, stride) == pytest.approx(7.0)


def test_perplexity_hand_computed_with_sliding_window():
    # tokens 1,1,2,2 under Copy(V=5): next==current for 1->1 and 2->2 (p=1/2), 1->2 has p=1/8
    ids = torch.tensor([1, 1, 2, 2])
    expected = math.exp(-(math.log(0.5) + math.log(0.125) + math.log(0.5)) / 3)
    for window, stride in [(2, 1), (3, 2), (4, 4)]:
        assert perplexity(Copy(5), ids, window, stride) == pytest.approx(expected)


def test_perplexity_matches_transformers_loss_on_one_window():
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_layer=1, n_embd=16, n_head=2, n_positions=32)).eval()
    ids = torch.randint(0, 50, (20,))
    with torch.no_grad():
        ref = math.exp(float(lm(input_ids=ids[None], labels=ids[None]).loss))
    assert perplexity(lm, ids, window=32, stride=32) == pytest.approx(ref, rel=1e-5)


def test_lm_loss_ignores_padding():
    ids = torch.tensor([[1, 2, 0], [2, 1, 1]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # p(2 | first) = 3/6 = 1/2
    # targets: (0,1)=2 with p 1/2; (1,1)=1 and (1,2)=1 with p 1/4 each; (0,2) is padding
    expected = -(math.log(0.5) + 2 * math.log(0.25)) / 3
    assert float(lm_loss(logits, ids, mask)) == pytest.approx(expected)


def test_kl_to_reference_hand_value_and_zero_for_same_model():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    ref = torch.log(torch.tensor([[[0.25, 0.75], [0.9, 0.1]]]))
    mask = torch.tensor([[1, 0]])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(kl_to_reference(logits, ref, mask)) == pytest.approx(expected)
    assert float(kl_to_reference(ref, ref, torch.ones(1, 2))) == pytest.approx(0.0, abs=1e-7)


def test_ppl_gate_blocks_over_threshold():
    ok, msg = ppl_gate(20.0, 21.5, 0.05)
    assert not ok and "FAILED" in msg and "+7.5%" in msg
    assert ppl_gate(20.0, 20.9, 0.05)[0]
