"""Decoding through the model's own forward and `generate`: cached steps against full recomputation."""
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.generation.streamers import BaseStreamer

import GPT_Trainer.LlamaDecoderLayerClean as block_module
from GPT_Trainer.cache import KVState, RecurrentState, TwoMambaCache
from GPT_Trainer.infer2 import generate, left_padded
from GPT_Trainer.LlamaDecoderLayerClean import TWO_MAMBA, TWO_MAMBA_E, AttentionConfig, GenericAttention, Mamba2
from GPT_Trainer.modeling import TwoMambaForCausalLM, load_model, make_config

VOCAB = 97
POWER1 = "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values"  # output_norm, conv, decay
Z_GATE = "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values__Z_out_gate"
FAMILIES = ["softmax", "mamba", TWO_MAMBA, TWO_MAMBA_E, POWER1, Z_GATE, "linear",
            "linear__output_norm__in_conv_k_4__silu"]


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


def assert_logits_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("attention_type", FAMILIES)
@torch.no_grad()
def test_cached_forward_matches_full_recompute(attention_type):
    """A prompt in two forwards (the second continues the cache), then one-token steps: every logit equals
    the forward over the whole sequence without a cache."""
    model = tiny_model(attention_type)
    (prompt,) = random_prompts([21])
    seq = torch.tensor([prompt])
    cache = model.new_cache()
    first = model(seq[:, :13], past_key_values=cache).logits
    second = model(seq[:, 13:], past_key_values=cache).logits
    assert_logits_close(torch.cat([first, second], 1), model(seq).logits)
    logits = second[:, -1]
    for _ in range(8):
        token = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, token], dim=1)
        out = model(token, past_key_values=cache)
        assert out.past_key_values is cache and cache.get_seq_length() == seq.shape[1]
        logits = out.logits[:, -1]
        assert_logits_close(logits, model(seq).logits[:, -1])


@pytest.mark.parametrize("attention_type", FAMILIES)
@torch.no_grad()
def test_generate_ragged_batch_matches_each_prompt_alone_recomputed(attention_type):
    """Left-padded prompts of different lengths decoded together with the caches: the tokens and the logits
    of every step equal those of each prompt decoded alone by full recomputation."""
    model = tiny_model(attention_type)
    prompts = random_prompts([13, 4, 13, 9])
    efficient = generate(model, None, prompts, 10, stop_at_eos=False)
    full_alone = [generate(model, None, [p], 10, stop_at_eos=False, use_efficient=False)[0] for p in prompts]
    assert efficient == full_alone
    assert all(len(out) == 10 for out in efficient)
    assert len({tuple(out) for out in efficient}) > 1  # different prompts, different continuations

    ids, mask = left_padded(prompts, 0, "cpu")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         eos_token_id=[], output_logits=True, return_dict_in_generate=True)
    for row, prompt in enumerate(prompts):
        seq = torch.tensor([prompt + efficient[row][:5]])
        full = model(seq).logits[0, len(prompt) - 1:]
        assert_logits_close(torch.stack([step[row] for step in out.logits]), full)


@pytest.mark.parametrize("attention_type", ["softmax", TWO_MAMBA])
@torch.no_grad()
def test_generate_continues_a_cache_and_repeats_prompts(attention_type):
    """A cache passed to generate twice continues where it stopped (the second call feeds only the new
    tokens); num_return_sequences expands the batch before the cache fills; the CPU never captures graphs."""
    model = tiny_model(attention_type)
    ids = torch.tensor(random_prompts([5, 5]))
    options = dict(do_sample=False, pad_token_id=0, eos_token_id=[])
    cache = model.new_cache()
    first = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, past_key_values=cache, **options)
    both = model.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=3, past_key_values=cache, **options)
    assert torch.equal(both, model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, **options))
    sampled = model.generate(ids, max_new_tokens=4, do_sample=True, num_return_sequences=3, pad_token_id=0)
    assert sampled.shape == (6, 9)
    assert model.new_cache(16, batch_size=2).step_graph is None


@pytest.mark.parametrize("attention_type", ["softmax", TWO_MAMBA_E])
@torch.no_grad()
def test_fixed_shape_kv_step_matches_full_recompute(attention_type, monkeypatch):
    """The one-token KV-cache step that a CUDA graph captures (KVState.step: the slot and the RoPE position
    read from the device, attention over every slot of the capacity under the cache's mask), run eagerly on
    CPU: a left-padded batch in a cache of max_length = prompt + new tokens (as generate sizes it) gives, at
    every step, the logits of each prompt alone recomputed in full (float32, rtol 1e-4, atol 1e-4 of the
    largest) and its greedy tokens, while the slots not yet written hold junk that the mask must hide. A
    token beyond max_length raises, in a step or in a prompt."""
    calls = []
    step = KVState.step
    monkeypatch.setattr(KVState, "step", lambda self, *args: calls.append(1) or step(self, *args))
    model = tiny_model(attention_type)
    prompts = random_prompts([13, 4, 9])
    longest, new = 13, 6
    ids, mask = left_padded(prompts, 0, "cpu")
    cache = model.new_cache(longest + new, batch_size=len(prompts))
    logits = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]
    for entry in cache.layers:
        assert entry.capacity == longest + new and entry.position.item() == longest
        entry.k[:, :, longest:] = 1e3 * torch.randn_like(entry.k[:, :, longest:])
        entry.v[:, :, longest:] = 1e3 * torch.randn_like(entry.v[:, :, longest:])
        if entry.a is not None:
            entry.a[:, :, longest:] = -1e5 * torch.rand_like(entry.a[:, :, longest:])
    generated = [[] for _ in prompts]
    for i in range(new + 1):
        for row, prompt in enumerate(prompts):
            assert_logits_close(logits[row], model(torch.tensor([prompt + generated[row]])).logits[0, -1])
        if i == new:
            break
        token = logits.argmax(-1, keepdim=True)
        for row in range(len(prompts)):
            generated[row].append(token[row].item())
        logits = model(token, past_key_values=cache).logits[:, -1]
    assert len(calls) == new * len(cache.layers)
    assert generated == [generate(model, None, [p], new, stop_at_eos=False, use_efficient=False)[0] for p in prompts]
    with pytest.raises(ValueError, match=f"holds {longest + new} tokens and {longest + new} are filled, no room for 1 more"):
        model(token, past_key_values=cache)
    with pytest.raises(ValueError, match="no room for 13 more"):
        model(ids, attention_mask=mask, past_key_values=model.new_cache(longest - 1))


@pytest.mark.parametrize("attention_type", ["softmax", TWO_MAMBA_E])
@torch.no_grad()
def test_kv_step_reads_no_device_value_on_the_host(attention_type):
    """What a CUDA-graph capture needs of the step: torch.compile's tracer follows the whole one-token forward
    of a left-padded batch's cache as one graph, which an .item(), int(tensor) or bool(tensor) would break."""
    model = tiny_model(attention_type)
    ids = torch.tensor(random_prompts([6, 6]))
    cache = model.new_cache(12)
    model(ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]), past_key_values=cache)
    explained = torch._dynamo.explain(lambda token: model.lm_head(model.model(token, cache)))(ids[:, -1:])
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_state_size_does_not_grow_with_context():
    """2Mamba's cache has one size for any context (S, z, conv rows); the softmax KV cache grows by 2 N d."""
    sizes = {}
    for attention_type in (TWO_MAMBA, "softmax"):
        model = tiny_model(attention_type)
        for n in (3, 40):
            cache = model.new_cache()
            with torch.no_grad():
                model(torch.tensor(random_prompts([n])), past_key_values=cache)
                model(torch.tensor([[5]]), past_key_values=cache)
            sizes[attention_type, n] = cache.nbytes()
            kinds = {type(entry) for entry in cache.layers}
            assert kinds == ({RecurrentState} if attention_type == TWO_MAMBA else {KVState})
            for entry in cache.layers:  # no cache tensor is a view that keeps prompt activations alive
                for t in vars(entry).values():
                    if isinstance(t, torch.Tensor):
                        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert sizes[TWO_MAMBA, 3] == sizes[TWO_MAMBA, 40]
    d, heads, layers = 32, 4, 2
    features = d * (d + 1) // 2
    per_head = features * d + features + 3 * d  # S, z, one pre-conv row of q, k, v (docs/inference.md)
    assert sizes[TWO_MAMBA, 3] == layers * heads * per_head * 4
    assert sizes["softmax", 40] == layers * heads * 2 * 41 * d * 4


@pytest.mark.parametrize("power", ["exp", "2"])
@torch.no_grad()
def test_cache_stays_exact_over_a_long_strongly_decayed_context(power):
    """2Mamba-E / 2Mamba after 300 tokens of strong decay (about 300 each) then 300 of weak decay (about 0.05):
    the cumulative log decay sits near -9e4, where float32 has a spacing of 0.008, yet the weak decays
    between recent tokens decide the weights. The cached steps match a float64 forward."""
    torch.manual_seed(0)
    attn = GenericAttention(64, 2, AttentionConfig(power=power, norm_type="sm_norm", A_mask_type="neg_softplus",
                                                   use_in_conv=True, in_conv_dim=2)).eval()
    for p in attn.parameters():
        if p.dim() == 2:
            p.normal_(0, p.shape[1] ** -0.5)
    attn.A_mask_proj.weight.zero_()[:, 0] = 10.0  # g = -softplus(10 h[..., 0])
    h = torch.randn(1, 600, 64)
    h[:, :300, 0], h[:, 300:, 0] = 30.0, -0.3
    expected = attn.double()(h.double())[:, -8:]
    attn.float()
    cache = TwoMambaCache(num_layers=1)
    attn(h[:, :592], cache)
    if power == "exp":
        assert cache.layers[0].a[0, :, 591].max() < -8e4
    steps = torch.cat([attn(h[:, t:t + 1], cache) for t in range(592, 600)], dim=1)
    torch.testing.assert_close(steps.double(), expected, rtol=1e-4, atol=1e-5)


ODD_CONFIGS = [  # combinations outside the 28 named types: any combination decodes
    dict(power="2", norm_type="output_norm"),
    dict(power="1", norm_type="output_norm", use_in_conv=True, in_conv_dim=1),
    dict(power="exp", norm_type="output_norm", A_mask_type="neg_softplus"),
    dict(power="exp", norm_type="sm_norm", use_in_conv=True, in_conv_dim=3),
    dict(power="1", norm_type="sm_norm", qk_activation_type="relu", A_mask_type="discretize", use_z_out_gate=True),
    dict(power="2", norm_type="sm_norm", qk_activation_type="silu", use_in_conv=True, in_conv_dim=4, use_D_res=True,
         value_disc_dtype="dt", A_mask_type="discretize", use_dt_bias=True),
]


@pytest.mark.parametrize("fields", ODD_CONFIGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@torch.no_grad()
def test_block_cache_matches_forward_for_any_config(fields):
    """Prefill of a prefix and one-token steps reproduce the block's parallel forward, position by position."""
    torch.manual_seed(0)
    attn = GenericAttention(64, 2, AttentionConfig(**fields)).eval()
    for p in attn.parameters():
        if p.dim() == 2:
            p.normal_(0, p.shape[1] ** -0.5)
    h = torch.randn(2, 19, 64)
    cache = TwoMambaCache(num_layers=1)
    out = attn(h[:, :11], cache)
    steps = [attn(h[:, t:t + 1], cache) for t in range(11, 19)]
    torch.testing.assert_close(torch.cat([out, *steps], dim=1), attn(h), rtol=1e-4, atol=1e-5)


def test_stop_at_eos_ends_the_sequence():
    model = tiny_model(TWO_MAMBA)
    prompts = random_prompts([7, 11])
    free = generate(model, None, prompts, 6, stop_at_eos=False)
    model.config.eos_token_id = free[0][2]
    stopped = generate(model, None, prompts, 6)
    assert stopped[0] == free[0][:3]
    cut = free[1].index(free[0][2]) + 1 if free[0][2] in free[1] else len(free[1])
    assert stopped[1] == free[1][:cut]


def test_sampling_top_k_top_p_and_reproducibility():
    model = tiny_model(TWO_MAMBA_E)
    prompts = random_prompts([5, 8])
    greedy = generate(model, None, prompts, 8, stop_at_eos=False)

    def draw(seed, **options):
        torch.manual_seed(seed)
        return generate(model, None, prompts, 8, sample=True, stop_at_eos=False, **options)

    first = draw(3, top_k=20, top_p=0.9, temperature=1.5)
    assert first == draw(3, top_k=20, top_p=0.9, temperature=1.5)
    assert all(len(out) == 8 and all(0 <= t < VOCAB for t in out) for out in first)
    assert first != greedy  # not greedy in disguise
    assert draw(4, top_k=1) == greedy  # only the most likely token survives
    assert draw(5, top_p=1e-6) == greedy
    with pytest.raises(ValueError, match="top_p"):
        generate(model, None, prompts, 2, sample=True, top_p=0.0)


def test_streamer_sees_every_new_token():
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    model = tiny_model(TWO_MAMBA)
    (prompt,) = random_prompts([6])
    streamer = Collect()
    out = generate(model, None, [prompt], 5, stop_at_eos=False, streamer=streamer)
    assert streamer.chunks[0] == [prompt] and [c[0] for c in streamer.chunks[1:]] == out[0] and streamer.ended


def test_bad_arguments_are_reported():
    model = tiny_model("softmax", layers=1)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, None, ["hello"], 2)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, None, [[]], 2)
    with pytest.raises(TypeError, match="list of prompts"):
        generate(model, None, "hello", 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, None, [[5]], 0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        model(ids, position_ids=torch.arange(3)[None])
    with pytest.raises(TypeError, match="TwoMambaCache"):
        model(ids, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="return_dict"):
        model(ids, return_dict=False)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="only mark left padding"):
        model(ids, attention_mask=torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="not used by the model"):
        model.generate(ids, max_new_tokens=2, token_type_idz=ids)
    with pytest.raises(ValueError, match="only supports"):
        model.generate(ids, max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="does not support"):
        model.generate(ids, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)


@pytest.mark.parametrize("attention_type", ["softmax", TWO_MAMBA])
def test_auto_model_loads_a_run_directory(tmp_path, attention_type):
    """save_pretrained writes model_type "twomamba"; AutoModelForCausalLM builds our model with equal logits."""
    model = tiny_model(attention_type)
    model.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(auto) is TwoMambaForCausalLM and auto.config.model_type == "twomamba"
    ids = torch.tensor(random_prompts([9]))
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, load_model(str(tmp_path))(ids).logits, rtol=0, atol=0)


@pytest.mark.gpu
def test_mamba_ssm_cache_matches_full_recompute():
    """On CUDA with mamba_ssm installed the mamba type's forward is mamba_ssm's block; decoding steps the
    pure-PyTorch block's recurrent form on its weights, with the tokens of mamba_ssm's full forwards."""
    pytest.importorskip("mamba_ssm")
    model = tiny_model("mamba").cuda()
    assert type(model.model.layers[0].self_attn.mamba_layer).__module__.startswith("mamba_ssm")
    prompts = random_prompts([13, 6])
    assert generate(model, None, prompts, 8, stop_at_eos=False) == [
        generate(model, None, [p], 8, stop_at_eos=False, use_efficient=False)[0] for p in prompts]


@pytest.mark.gpu
def test_a_mamba_ssm_checkpoint_loads_into_the_pytorch_block(tmp_path, monkeypatch):
    """The mamba type's checkpoint written with mamba_ssm's block loads into the pure-PyTorch one (where mamba_ssm
    is missing) by the same names, with the same logits (float32)."""
    pytest.importorskip("mamba_ssm")
    model = tiny_model("mamba").cuda()
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(block_module, "_mamba_ssm_class", lambda: None)
    pytorch = load_model(str(tmp_path)).cuda()
    assert isinstance(pytorch.model.layers[0].self_attn.mamba_layer, Mamba2)
    ids = torch.tensor(random_prompts([300, 300]), device="cuda")
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(pytorch(ids).logits, expected, rtol=0, atol=2e-3 * expected.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("attention_type", ["softmax", "mamba", TWO_MAMBA, TWO_MAMBA_E, POWER1])
@torch.no_grad()
def test_bf16_cuda_decoding_matches_full_recompute(attention_type):
    """bf16 on CUDA: the per-step logits of generate (CUDA-graph steps, KV-cache types included) stay within 5%
    of the logit range of a full bf16 forward, and equal eager steps' to 1e-2 of the largest logit."""
    model = tiny_model(attention_type).cuda().to(torch.bfloat16)
    ids = torch.tensor(random_prompts([200, 200]), device="cuda")

    def decode(cuda_graph):
        model.decode_with_cuda_graph = cuda_graph
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              pad_token_id=0, eos_token_id=[], output_logits=True, return_dict_in_generate=True)

    graphed, eager = decode(True), decode(False)
    assert torch.equal(graphed.sequences, eager.sequences)
    steps = torch.stack(graphed.logits, 1)  # [B, 16, V]
    torch.testing.assert_close(steps, torch.stack(eager.logits, 1), rtol=0, atol=1e-2 * steps.abs().max().item())
    full = model(graphed.sequences[:, :-1]).logits[:, ids.shape[1] - 1:].float()
    assert (steps - full).abs().max() <= 0.05 * (full.max() - full.min())


@pytest.mark.gpu
@pytest.mark.parametrize("attention_type", ["softmax", TWO_MAMBA_E])
@torch.no_grad()
def test_bf16_cuda_graph_kv_step_matches_eager_on_a_ragged_batch(attention_type):
    """The KV-cache step is captured too: on a left-padded batch in bf16 the graphed steps of generate give the
    eager steps' tokens, and their logits to 1e-2 of the largest logit (the same kernels, replayed); a replay
    past the cache's max_length raises instead of writing out of bounds."""
    model = tiny_model(attention_type).cuda().to(torch.bfloat16)
    assert model.new_cache(8, batch_size=3).step_graph is not None
    prompts = random_prompts([150, 37, 90])
    ids, mask = left_padded(prompts, 0, "cuda")

    def decode(cuda_graph):
        model.decode_with_cuda_graph = cuda_graph
        return model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                              pad_token_id=0, eos_token_id=[], output_logits=True, return_dict_in_generate=True)

    graphed, eager = decode(True), decode(False)
    assert torch.equal(graphed.sequences, eager.sequences)
    steps = torch.stack(graphed.logits, 1)
    torch.testing.assert_close(steps, torch.stack(eager.logits, 1), rtol=0, atol=1e-2 * steps.abs().max().item())

    model.decode_with_cuda_graph = True
    cache = model.new_cache(4, batch_size=1)
    token = model(ids[:1, -3:], past_key_values=cache).logits[:, -1:].argmax(-1)
    token = model(token, past_key_values=cache).logits.argmax(-1)  # the fourth token, replayed
    assert cache.layers[0].position.item() == 4
    with pytest.raises(ValueError, match="holds 4 tokens and 4 are filled"):
        model(token, past_key_values=cache)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("n", [2, 3, 7])
def test_fresh_conv_matches_the_window(width, n):
    """A prompt into an empty cache takes the plain conv (no [state, x] window): the same outputs and the same
    last k-1 rows kept as the window over the zero state gives."""
    from GPT_Trainer.LlamaDecoderLayerClean import cached_causal_conv

    x, weight, bias = torch.randn(2, n, 12), torch.randn(12, 1, width), torch.randn(12)
    states = [torch.zeros(2, width - 1, 12) for _ in range(2)]
    fresh = cached_causal_conv(x, weight, bias, states[0], fresh=True)
    window = cached_causal_conv(x, weight, bias, states[1])
    torch.testing.assert_close(fresh, window, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(states[0], states[1], rtol=0, atol=0)
