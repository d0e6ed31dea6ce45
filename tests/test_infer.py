"""Efficient decoding (recurrent states, KV caches) against full recomputation, batching and sampling."""
import pytest
import torch

from GPT_Trainer.decoding import KVCache, ModelDecoder, RecurrentState, state_nbytes
from GPT_Trainer.infer2 import generate, next_token
from GPT_Trainer.LlamaDecoderLayerClean import TWO_MAMBA, TWO_MAMBA_E
from GPT_Trainer.modeling import TwoMambaForCausalLM, make_config

VOCAB = 97
POWER1 = "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values"  # output_norm, conv, decay
FAMILIES = ["softmax", "mamba", TWO_MAMBA, TWO_MAMBA_E, POWER1, "linear", "linear__output_norm__in_conv_k_3__silu"]


def tiny_model(attention_type, layers=2, seed=0):
    """A random tiny model with unit-gain weights, so scores and logits are spread out (no near-ties)."""
    torch.manual_seed(seed)
    config = make_config("tiny", 256, VOCAB, attention_type)
    config.num_hidden_layers = layers
    model = TwoMambaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
    return model


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("attention_type", FAMILIES)
def test_efficient_logits_match_full_recompute(attention_type):
    """Prefill over several chunks, then one-token steps: every step's logits equal the full forward's."""
    model = tiny_model(attention_type)
    (prompt,) = random_prompts([21])
    decoder = ModelDecoder(model, chunk_size=8)
    seq = torch.tensor([prompt])
    logits, states = decoder.prefill(seq)
    with torch.no_grad():
        for _ in range(8):
            full = model(seq).logits[:, -1]
            torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4 * full.abs().max().item())
            token = full.argmax(-1)
            seq = torch.cat([seq, token[:, None]], dim=1)
            logits = decoder.step(token, states)


@pytest.mark.parametrize("attention_type", FAMILIES)
def test_greedy_tokens_equal_in_both_modes_for_a_ragged_batch(attention_type):
    """Different-length prompts in one batch: efficient == full recompute == each prompt alone."""
    model = tiny_model(attention_type)
    prompts = random_prompts([13, 4, 13, 9])
    efficient = generate(model, None, prompts, 10, stop_at_eos=False, chunk_size=8)
    full = generate(model, None, prompts, 10, stop_at_eos=False, use_efficient=False)
    alone = [generate(model, None, [p], 10, stop_at_eos=False)[0] for p in prompts]
    assert efficient == full == alone
    assert all(len(out) == 10 for out in efficient)
    assert len({tuple(out) for out in efficient}) > 1  # different prompts, different continuations


def test_two_mamba_state_does_not_grow_with_context():
    """The recurrent state (the per-token work of a step) has one size for any prompt length; a KV cache grows."""
    sizes = {}
    for attention_type in (TWO_MAMBA, "softmax"):
        decoder = ModelDecoder(tiny_model(attention_type))
        for n in (3, 40):
            _, states = decoder.prefill(torch.tensor(random_prompts([n])))
            decoder.step(torch.tensor([5]), states)
            sizes[attention_type, n] = state_nbytes(states)
            for state in states:  # no state tensor is a view that keeps prompt activations alive
                for t in state.state_tensors():
                    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
            kinds = {type(s) for s in states}
            assert kinds == ({RecurrentState} if attention_type == TWO_MAMBA else {KVCache})
    assert sizes[TWO_MAMBA, 3] == sizes[TWO_MAMBA, 40]
    d, heads, layers = 32, 4, 2
    features = d * (d + 1) // 2
    per_head = features * d + features + 3 * d  # S, z, one pre-conv row of q, k, v (SPEC section 5)
    assert sizes[TWO_MAMBA, 3] == layers * heads * per_head * 4
    assert sizes["softmax", 40] == layers * heads * 2 * 41 * d * 4


def test_stop_at_eos_ends_the_sequence():
    model = tiny_model(TWO_MAMBA)
    prompts = random_prompts([7, 11])
    free = generate(model, None, prompts, 6, stop_at_eos=False)
    model.config.eos_token_id = free[0][2]
    stopped = generate(model, None, prompts, 6)
    assert stopped[0] == free[0][:3]
    cut = free[1].index(free[0][2]) + 1 if free[0][2] in free[1] else len(free[1])
    assert stopped[1] == free[1][:cut]


def test_sampling_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    by_k = next_token(logits, sample=True, top_k=3, generator=gen)
    assert set(by_k.tolist()) == {0, 1, 2}
    by_p = next_token(logits, sample=True, top_p=0.5, generator=gen)  # 0.4 < 0.5, then 0.4 + 0.3 covers it
    assert set(by_p.tolist()) == {0, 1}
    hot = next_token(logits, sample=True, temperature=100.0, generator=gen)
    assert set(hot.tolist()) == {0, 1, 2, 3}
    assert next_token(logits[:1], sample=True, top_k=1, generator=gen).item() == 0
    with pytest.raises(ValueError, match="top_p"):
        next_token(logits, sample=True, top_p=0.0)


def test_sampled_generation_is_reproducible_with_a_generator():
    model = tiny_model(TWO_MAMBA_E)
    prompts = random_prompts([5, 8])

    def draw(seed):
        return generate(model, None, prompts, 8, sample=True, top_k=20, top_p=0.9, temperature=1.5,
                        stop_at_eos=False, generator=torch.Generator().manual_seed(seed))

    first = draw(3)
    assert first == draw(3)
    assert all(len(out) == 8 and all(0 <= t < VOCAB for t in out) for out in first)
    assert first != generate(model, None, prompts, 8, stop_at_eos=False)  # not greedy in disguise


def test_bad_prompts_are_reported():
    model = tiny_model("softmax", layers=1)
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, None, ["hello"], 2)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, None, [[]], 2)
    with pytest.raises(TypeError, match="list of prompts"):
        generate(model, None, "hello", 2)


ODD_CONFIGS = [  # combinations outside the 28 named types (SPEC section 3: any combination works)
    dict(power="2", norm_type="output_norm"),
    dict(power="exp", norm_type="output_norm", A_mask_type="neg_softplus"),
    dict(power="exp", norm_type="sm_norm", use_in_conv=True, in_conv_dim=3),
    dict(power="1", norm_type="sm_norm", qk_activation_type="relu", A_mask_type="discretize", use_z_out_gate=True),
    dict(power="2", norm_type="sm_norm", qk_activation_type="silu", use_in_conv=True, in_conv_dim=4, use_D_res=True,
         value_disc_dtype="dt", A_mask_type="discretize", use_dt_bias=True),
]


@pytest.mark.parametrize("fields", ODD_CONFIGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_layer_decoder_matches_forward_for_any_config(fields):
    """Prefill of a prefix and one-token steps reproduce the block's parallel forward, position by position."""
    from GPT_Trainer.decoding import layer_decoder
    from GPT_Trainer.LlamaDecoderLayerClean import AttentionConfig, GenericAttention

    torch.manual_seed(0)
    attn = GenericAttention(64, 2, AttentionConfig(**fields)).eval()
    with torch.no_grad():
        for p in attn.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
        h = torch.randn(2, 19, 64)
        full = attn(h)
        decoder = layer_decoder(attn, chunk_size=4)
        out, state = decoder.prefill(h[:, :11], offset=0)
        steps = [decoder.step(h[:, t:t + 1], state) for t in range(11, 19)]
    torch.testing.assert_close(torch.cat([out, *steps], dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_mamba_ssm_cache_matches_full_recompute():
    """On CUDA with mamba_ssm installed the mamba type uses mamba_ssm's own inference cache and step."""
    pytest.importorskip("mamba_ssm")
    model = tiny_model("mamba").cuda()
    assert type(model.model.layers[0].self_attn.mamba_layer).__module__.startswith("mamba_ssm")
    prompts = random_prompts([13, 6])
    assert generate(model, None, prompts, 8, stop_at_eos=False) == generate(
        model, None, prompts, 8, stop_at_eos=False, use_efficient=False)
