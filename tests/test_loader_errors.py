"""A failure to load a model keeps its real cause; "cannot reach the hub" only for connection/offline failures."""

import pytest
import transformers
from transformers import LlamaConfig

from kcircuits.errors import KcircuitsError
from kcircuits.models import load_model


def _raise(exc):
    def fake(*args, **kwargs):
        raise exc

    return fake


def test_hub_id_config_error_keeps_its_cause(monkeypatch):
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _raise(ValueError("unsupported model type foo")))
    with pytest.raises(KcircuitsError) as info:
        load_model("someone/some-model", local_files_only=False)
    msg = str(info.value)
    assert "someone/some-model" in msg and "ValueError: unsupported model type foo" in msg
    assert "reach" not in msg and "offline" not in msg.lower() and "hub access is off" not in msg


def test_long_causes_are_shortened_to_one_line(monkeypatch):
    long = "first line of a long reason\n" + "x" * 5000
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _raise(RuntimeError(long)))
    with pytest.raises(KcircuitsError) as info:
        load_model("someone/some-model", local_files_only=False)
    msg = str(info.value)
    assert "RuntimeError: first line of a long reason x" in msg and "\n" not in msg and len(msg) < 500


def test_connection_error_says_the_hub_could_not_be_reached(monkeypatch):
    cause = ConnectionError("[Errno 111] Connection refused")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _raise(cause))
    with pytest.raises(KcircuitsError) as info:
        load_model("someone/some-model", local_files_only=False)
    msg = str(info.value)
    assert "could not be reached" in msg and "Connection refused" in msg and "smollm2-135m" in msg


def test_wrapped_connection_error_is_recognised_through_the_cause_chain(monkeypatch):
    """transformers rewraps hub errors as a plain OSError whose cause is the real one."""

    class LocalEntryNotFoundError(Exception):  # stands in for huggingface_hub's, matched by name
        pass

    def fake(*args, **kwargs):
        try:
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
        except LocalEntryNotFoundError as exc:
            raise OSError("some-model does not appear to have a file named config.json") from exc

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake)
    with pytest.raises(KcircuitsError, match="hub could not be reached"):
        load_model("someone/some-model", local_files_only=False)


def test_offline_hub_id_not_in_cache():
    """The real transformers path, no network: offline and not cached -> the offline message."""
    with pytest.raises(KcircuitsError) as info:
        load_model("someone/surely-not-cached-model", local_files_only=True)
    msg = str(info.value)
    assert "hub access is off" in msg and "OSError" in msg and "smollm2-135m" in msg


def test_weights_error_keeps_its_type_and_message(monkeypatch, tmp_path):
    LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, hidden_size=8,
                intermediate_size=16, vocab_size=11).save_pretrained(tmp_path)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        _raise(RuntimeError("\nsize mismatch for lm_head.weight\nmore details")))
    with pytest.raises(KcircuitsError) as info:
        load_model(str(tmp_path))
    msg = str(info.value)
    assert "weights or tokenizer" in msg and "RuntimeError: size mismatch for lm_head.weight more details" in msg
