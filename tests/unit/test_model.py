from pathlib import Path

import pytest
import torch

from trainer.model import (
    MODEL_SIZES,
    ModelConfig,
    ModelConfigError,
    ModelInputError,
    build_model,
    model_config,
    next_token_loss,
    portable_uniform,
)
from trainer.tokenizer import ByteTokenizer, TokenIdError

SMALL_TEST_CONFIG = ModelConfig(context_tokens=32, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64)


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_forward_gives_logits_per_position_over_the_vocabulary(mlp: str, norm: str) -> None:
    config = ModelConfig(
        context_tokens=32, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, mlp=mlp, norm=norm
    )
    model = build_model(config, seed=0)
    tokens = torch.randint(0, config.vocab_size, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, config.vocab_size)
    assert torch.isfinite(logits).all()
    assert sum(p.numel() for p in model.parameters()) == config.parameter_count()


def test_input_and_output_embeddings_are_one_tensor() -> None:
    model = build_model(SMALL_TEST_CONFIG, seed=0)
    names = [name for name, _ in model.named_parameters()]
    assert names.count("embed.weight") == 1
    assert not any("head" in name or "lm_" in name for name in names)
    tokens = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        before = model(tokens)
        model.embed.weight[:, 0] += 1.0  # the output projection must see the change too
        after = model(tokens)
    assert not torch.equal(before, after)
    # logits are hidden @ embed.T: the logit gradient flows into the same tensor
    loss = next_token_loss(model, tokens, tokens)
    loss.backward()
    assert model.embed.weight.grad is not None
    assert (model.embed.weight.grad[200:].abs().sum() > 0).item()  # only reachable as outputs


def test_future_tokens_do_not_change_past_logits() -> None:
    model = build_model(SMALL_TEST_CONFIG, seed=1)
    tokens = torch.randint(0, 256, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_same_seed_same_weights_bitwise_and_other_seed_differs() -> None:
    a = build_model(SMALL_TEST_CONFIG, seed=7).state_dict()
    b = build_model(SMALL_TEST_CONFIG, seed=7).state_dict()
    c = build_model(SMALL_TEST_CONFIG, seed=8).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])
    # the rotary tables are derived, not state
    assert not any("rope" in k for k in a)


def test_portable_init_has_the_requested_spread_and_fixed_values() -> None:
    values = portable_uniform((64, 64), 3, "w", half_width=1.0)
    assert values.dtype == torch.float32
    assert values.abs().max() < 1.0
    assert abs(values.mean().item()) < 0.05
    assert abs(values.std().item() - (1 / 3) ** 0.5) < 0.02
    # streams with different names or seeds are unrelated
    assert not torch.equal(values, portable_uniform((64, 64), 3, "v", half_width=1.0))
    assert not torch.equal(values, portable_uniform((64, 64), 4, "w", half_width=1.0))
    # the torch integer pipeline equals the same hash done with Python's exact integers
    assert portable_uniform((5,), 11, "x", half_width=1.0).tolist() == _reference_uniform(
        5, 11, "x"
    )


def _hash32_reference(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _reference_uniform(count: int, seed: int, stream: str) -> list[float]:
    import struct
    import zlib

    key = _hash32_reference(_hash32_reference(seed & 0xFFFFFFFF) ^ zlib.crc32(stream.encode()))
    key = _hash32_reference(key ^ ((seed >> 32) & 0xFFFFFFFF))
    out = []
    for i in range(count):
        bits = _hash32_reference(_hash32_reference((i + key) & 0xFFFFFFFF) ^ key) >> 8
        value = (bits * 2 + 1) * 2.0**-24 - 1.0
        out.append(struct.unpack("f", struct.pack("f", value))[0])
    return out


def test_registry_sizes_span_tiny_to_a_few_hundred_million() -> None:
    tiny = MODEL_SIZES["tiny"]
    assert 500_000 <= tiny.parameter_count() <= 2_000_000
    assert tiny.vocab_size >= 256 and tiny.context_tokens == 128
    assert 250e6 <= MODEL_SIZES["350m"].parameter_count() <= 450e6
    counts = [c.parameter_count() for c in MODEL_SIZES.values()]
    assert counts == sorted(counts)
    assert sum(p.numel() for p in build_model("tiny").parameters()) == tiny.parameter_count()


def test_bad_configs_and_inputs_raise_clear_errors() -> None:
    with pytest.raises(ModelConfigError, match="unknown model size"):
        model_config("huge")
    with pytest.raises(ModelConfigError, match="divisible"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ModelConfigError, match="unknown ModelConfig fields"):
        model_config("tiny", depth=3)
    assert model_config("tiny", n_layers=2).n_layers == 2
    model = build_model(SMALL_TEST_CONFIG)
    with pytest.raises(ModelInputError, match="sequence length"):
        model(torch.zeros((1, 33), dtype=torch.int64))
    with pytest.raises(ModelInputError, match="token ids"):
        model(torch.full((1, 4), SMALL_TEST_CONFIG.vocab_size))
    with pytest.raises(ModelInputError, match="integer"):
        model(torch.zeros((1, 4)))
    with pytest.raises(ModelInputError, match="shape"):
        model(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ModelInputError, match="empty"):
        model(torch.zeros((0, 4), dtype=torch.int64))


def test_tokenizer_round_trips_text_and_bytes() -> None:
    tok = ByteTokenizer()
    text = "héllo, wörld ✓\n\tdef f(): return 1"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    raw = bytes(range(256))
    assert tok.decode_bytes(tok.encode(raw)) == raw
    assert tok.vocab_size == 259 and len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    with pytest.raises(TokenIdError):
        tok.decode([300])


def test_hugging_face_loader_says_what_to_install_when_transformers_is_absent(
    tmp_path: Path,
) -> None:
    import importlib.util

    from trainer.hf import HuggingFaceUnavailableError, load_local_causal_lm

    if importlib.util.find_spec("transformers") is not None:
        with pytest.raises(HuggingFaceUnavailableError, match=r"config\.json"):
            load_local_causal_lm(str(tmp_path))
        return
    with pytest.raises(HuggingFaceUnavailableError, match="pip install transformers"):
        load_local_causal_lm(str(tmp_path))
