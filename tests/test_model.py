"""The model: every attention type builds, trains, is causal; blocks follow the spec; checkpoints load."""
import itertools
import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig

from GPT_Trainer.LlamaDecoderLayerClean import (
    MAMBA_SSM_SETTINGS, TWO_MAMBA, TWO_MAMBA_E, AttentionConfig, GenericAttention, LlamaDecoderLayer, Mamba2,
    MambaAttention, SoftmaxAttention, attention_config, configs,
)
from GPT_Trainer.modeling import MODEL_SIZES, TwoMambaForCausalLM, get_model, load_model
from kernel.reference import attention_reference

VOCAB = 97


def tiny(attention_type, max_len=64):
    return get_model("tiny", max_len, VOCAB, attention_type)


def test_configs_has_the_28_paper_types():
    assert len(configs) == 28
    assert {"softmax", "mamba", TWO_MAMBA, TWO_MAMBA_E} <= set(configs)


def test_unknown_attention_type_lists_valid_names():
    with pytest.raises(ValueError, match="valid types") as err:
        tiny("squared_typo")
    assert TWO_MAMBA in str(err.value)


def test_unknown_model_size_lists_sizes():
    with pytest.raises(ValueError, match="valid sizes: tiny, mini, small"):
        get_model("huge", 64, VOCAB, TWO_MAMBA)


def test_paper_sizes():
    small = get_model("small", 128, 32000, "softmax")
    n = sum(p.numel() for p in small.parameters())
    assert 250e6 < n < 350e6, n  # "~300M"
    assert MODEL_SIZES["medium"].hidden_size // MODEL_SIZES["medium"].num_attention_heads == 64


@pytest.mark.parametrize("attention_type", list(configs))
def test_every_type_trains_and_is_causal(attention_type):
    torch.manual_seed(0)
    model = tiny(attention_type)
    ids = torch.randint(0, VOCAB, (2, 24))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


FIELD_VALUES = dict(
    power=("1", "2", "exp"), norm_type=("sm_norm", "output_norm"), A_mask_type=("none", "discretize", "neg_softplus"),
)


@pytest.mark.parametrize("power,norm_type,A_mask_type", list(itertools.product(*FIELD_VALUES.values())))
def test_every_field_combination_runs(power, norm_type, A_mask_type):
    rng = random.Random(f"{power}{norm_type}{A_mask_type}")
    cfg = AttentionConfig(
        power=power, norm_type=norm_type, A_mask_type=A_mask_type,
        qk_activation_type=rng.choice(("relu", "silu", "none")), use_in_conv=rng.random() < 0.5,
        in_conv_dim=rng.choice((2, 3, 4)), use_D_res=rng.random() < 0.5, use_z_out_gate=rng.random() < 0.5,
        use_dt_bias=rng.random() < 0.5, value_disc_dtype=rng.choice(("dt", "none")),
    )
    block = GenericAttention(32, 2, cfg)
    h = torch.randn(2, 9, 32, requires_grad=True)
    out = block(h)
    out.square().mean().backward()
    assert out.shape == h.shape and torch.isfinite(out).all() and torch.isfinite(h.grad).all()


def test_bad_field_value_is_named():
    with pytest.raises(ValueError, match="norm_type='layer_norm'"):
        AttentionConfig(norm_type="layer_norm")


def spec_generic_block(block: GenericAttention, h: torch.Tensor) -> torch.Tensor:
    """The generic block (README.md, "Attention types") step by step in float64, from its parameters."""
    cfg, p = block.cfg, {k: v.double() for k, v in block.named_parameters()}
    h = h.double()
    b, n, _ = h.shape
    heads, d = block.num_heads, block.head_dim
    qkv = h @ p["qkv_proj.weight"].T
    if cfg.use_in_conv:
        width = cfg.in_conv_dim
        padded = F.pad(qkv, (0, 0, width - 1, 0))
        qkv = p["conv1d.bias"] + sum(p["conv1d.weight"][:, 0, i] * padded[:, i : i + n] for i in range(width))
    q, k, v = (t.reshape(b, n, heads, d).transpose(1, 2) for t in qkv.split(heads * d, -1))
    dt = F.softplus(h @ p["dt_proj.weight"].T).transpose(1, 2) if cfg.uses_dt else None
    A = None
    if cfg.A_mask_type == "discretize":
        A = -torch.exp(p["A_log"])[None, :, None] * dt
    elif cfg.A_mask_type == "neg_softplus":
        A = -F.softplus(h @ p["A_mask_proj.weight"].T).transpose(1, 2)
    d_res = v * p["D"][None, :, None] if cfg.use_D_res else 0
    if cfg.value_disc_dtype == "dt":
        v = v * dt[..., None]
    act = {"relu": F.relu, "silu": F.silu, "none": lambda x: x}[cfg.qk_activation_type]
    q, k = act(q), act(k)
    s = q @ k.transpose(-1, -2) / d ** 0.5
    w = {"1": s, "2": s * s, "exp": torch.exp(s)}[cfg.power]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    if A is not None:
        a = A.cumsum(-1)
        w = w * torch.exp((a[..., :, None] - a[..., None, :]).masked_fill(~mask, 0))
    w = w.masked_fill(~mask, 0)
    if cfg.norm_type == "sm_norm":
        w = w / w.sum(-1, keepdim=True)
    o = (w @ v + d_res).transpose(1, 2).reshape(b, n, heads * d)
    if cfg.use_z_out_gate:
        o = o * F.silu(h @ p["z_gate_proj.weight"].T + p["z_gate_proj.bias"])
    if cfg.norm_type == "output_norm":
        o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps) * p["out_norm.weight"]
    return o @ p["o_proj.weight"].T


@pytest.mark.parametrize("attention_type", [t for t in configs if t not in ("softmax", "mamba")])
def test_generic_block_follows_the_spec(attention_type):
    torch.manual_seed(1)
    layer = LlamaDecoderLayer(64, 128, 4, attention_type)
    block = layer.self_attn
    for name, param in block.named_parameters():  # non-trivial values everywhere
        with torch.no_grad():
            param.add_(0.1 * torch.randn_like(param))
    h = torch.randn(2, 12, 64)
    torch.testing.assert_close(block(h).double(), spec_generic_block(block, h), rtol=1e-4, atol=1e-5)


def test_softmax_block_uses_interleaved_rope():
    torch.manual_seed(2)
    block = SoftmaxAttention(64, 4)
    h = torch.randn(1, 10, 64)
    q, k, v = (t.reshape(1, 10, 4, 16).transpose(1, 2).double() for t in block.qkv_proj(h).chunk(3, -1))
    freqs = 1.0 / 10000 ** (torch.arange(0, 16, 2).double() / 16)
    rot = torch.polar(torch.ones(10, 8, dtype=torch.float64), torch.arange(10.0).double()[:, None] * freqs)

    def rope(x):  # pairs (0,1), (2,3), ... as complex numbers
        return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], 8, 2).contiguous()) * rot).flatten(-2)

    att = torch.softmax((rope(q) @ rope(k).transpose(-1, -2) / 4).masked_fill(~torch.ones(10, 10).tril().bool(), -torch.inf), -1)
    expected = (att @ v).transpose(1, 2).reshape(1, 10, 64) @ block.o_proj.weight.double().T
    torch.testing.assert_close(block(h).double(), expected, rtol=1e-4, atol=1e-5)
    assert block.rotary_emb.freqs.shape == (8,) and not block.rotary_emb.freqs.requires_grad


def test_pure_pytorch_mamba2_matches_a_sequential_scan():
    torch.manual_seed(3)
    m = Mamba2(d_model=32, d_ssm=8, d_state=16).double()
    with torch.no_grad():
        m.D.add_(torch.randn_like(m.D))
        m.norm.weight.add_(torch.randn_like(m.norm.weight))
    h = torch.randn(2, 11, 32, dtype=torch.float64)
    z0, x0, z, xbc, dt = m.in_proj(h).split([24, 24, 8, 8 + 2 * 16, 1], -1)  # d_mlp = d_model - d_ssm
    xbc = F.silu(F.pad(xbc, (0, 0, 1, 0)).unfold(1, 2, 1).mul(m.conv1d.weight[:, 0]).sum(-1))
    x, bmat, cmat = xbc.split([8, 16, 16], -1)
    dt = F.softplus(dt + m.dt_bias)[..., 0]  # one head
    A = -torch.exp(m.A_log)
    state = torch.zeros(2, 16, 8, dtype=torch.float64)
    ys = []
    for t in range(11):
        state = torch.exp(dt[:, t, None, None] * A) * state + dt[:, t, None, None] * bmat[:, t, :, None] * x[:, t, None, :]
        ys.append((cmat[:, t, :, None] * state).sum(1) + m.D * x[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + 1e-5) * m.norm.weight
    expected = m.out_proj(torch.cat([F.silu(z0) * x0, y], -1))
    torch.testing.assert_close(m(h), expected)


def test_mamba_parameter_names_and_shapes():
    model = get_model("tiny", 64, VOCAB, "mamba")
    shapes = {k.split("mamba_layer.")[1]: tuple(v.shape) for k, v in model.state_dict().items()
              if "layers.0.self_attn" in k}
    d_model, d, d_state = 128, 32, 128
    assert shapes == {
        "in_proj.weight": (2 * d_model + 2 * d_state + 1, d_model), "conv1d.weight": (d + 2 * d_state, 1, 2),
        "dt_bias": (1,), "A_log": (1,), "D": (d,), "norm.weight": (d,), "out_proj.weight": (d_model, d_model),
    }


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    model = tiny(TWO_MAMBA)
    ids = torch.randint(0, VOCAB, (2, 16))
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_activation_checkpointing(enabled)(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("attention_type, crossover, runs, checkpointed_runs", [
    # 37 tokens past the crossover: the chunked form once; checkpointed, its states formed again for the backward
    (TWO_MAMBA, 16, {"chunk_power_attention": 1, "_form_states": 1}, {"chunk_power_attention": 1, "_form_states": 2}),
    (TWO_MAMBA, 1 << 30, {"attention": 1}, {"attention": 1}),  # below it: the quadratic kernel, once
    (TWO_MAMBA_E, 16, {"attention": 1}, {"attention": 1}),  # exp: always quadratic
])
def test_checkpointing_runs_no_second_forward(attention_type, crossover, runs, checkpointed_runs, device,
                                              monkeypatch):
    """A checkpointed block runs its attention's forward once: the chunked form forms its per-chunk states again
    in the backward pass instead of keeping them, the quadratic kernel keeps what it needs; the gradients are
    those of the same algorithm without checkpointing (the PyTorch path on the CPU, the Triton kernels on a
    GPU)."""
    import kernel.power as kp
    from kernel.power import chunk

    for table in (kp.CHUNK_CROSSOVER, kp.RECOMPUTED_CHUNK_CROSSOVER):
        monkeypatch.setitem(table, "2", crossover)
    calls = []
    for module, name in ((kp, "chunk_power_attention"), (kp, "attention"), (chunk, "_form_states")):
        def counted(*args, _fn=getattr(module, name), _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    torch.manual_seed(0)
    block = GenericAttention(64, 2, attention_config(attention_type)).to(device)
    h, dout = torch.randn(2, 37, 64, device=device), torch.randn(2, 37, 64, device=device)
    grads, counts = [], []
    for enabled in (False, True):
        block.checkpoint_core, calls[:] = enabled, []
        block.zero_grad()
        x = h.clone().requires_grad_()
        block(x).backward(dout)
        grads.append([x.grad] + [p.grad.clone() for p in block.parameters()])
        counts.append({name: calls.count(name) for name in set(calls)})
    assert counts == [runs, checkpointed_runs]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpointing_leaves_softmax_attention_alone(monkeypatch):
    """SDPA keeps only its output and a row statistic: set_activation_checkpointing does not recompute it."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    model = tiny("softmax").set_activation_checkpointing(True)
    ids = torch.randint(0, VOCAB, (2, 16))
    model(ids, labels=ids).loss.backward()
    assert len(calls) == model.config.num_hidden_layers


def write_seed_checkpoint(path, model, attention_type, with_config_json=True, with_config_pt=True, max_len=64):
    """The seed's layout: LlamaConfig.save_pretrained + attention_type, model.safetensors holding the
    seed's `self_attn.attn_mask` buffers, config.pt as a plain dict."""
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    if with_config_json:
        LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            max_position_embeddings=max_len, rms_norm_eps=1e-5, attention_type=attention_type,
        ).save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if attention_type not in ("softmax", "mamba"):
        for i in range(cfg.num_hidden_layers):
            state[f"model.layers.{i}.self_attn.attn_mask"] = torch.ones(1, 1, max_len, max_len, dtype=torch.bool).tril()
    save_file(state, os.path.join(path, "model.safetensors"))
    if with_config_pt:
        torch.save({"dataset": "HuggingFaceFW/fineweb", "model_size": "tiny", "attention_type": attention_type,
                    "mlp_type": "normal", "model_max_length": max_len, "step_ckpt": 5, "wandb_id": "abc123"},
                   os.path.join(path, "config.pt"))


@pytest.mark.parametrize("attention_type", ["softmax", "mamba", TWO_MAMBA, TWO_MAMBA_E, "linear__output_norm__Z_out_gate"])
@pytest.mark.parametrize("files", ["json_and_pt", "json_only", "pt_only"])
def test_seed_layout_checkpoint_loads_with_identical_logits(tmp_path, attention_type, files):
    torch.manual_seed(5)
    model = tiny(attention_type).eval()
    write_seed_checkpoint(tmp_path, model, attention_type, files != "pt_only", files != "json_only")
    loaded = load_model(str(tmp_path))
    assert not loaded.training and loaded.config.attention_type == attention_type
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_save_pretrained_round_trip_has_no_attn_mask(tmp_path):
    model = tiny(TWO_MAMBA).eval()
    model.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["attention_type"] == TWO_MAMBA
    again = TwoMambaForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert not any("attn_mask" in k for k in again.state_dict())
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no model weights in"):
        load_model(str(tmp_path))
    model = tiny(TWO_MAMBA)
    write_seed_checkpoint(tmp_path, model, TWO_MAMBA)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(str(tmp_path))
    write_seed_checkpoint(tmp_path, model, TWO_MAMBA)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model(str(tmp_path))


def test_weights_of_another_type_are_refused(tmp_path):
    # no config.pt: its 2Mamba record would be the first contradiction found
    write_seed_checkpoint(tmp_path, tiny(TWO_MAMBA), TWO_MAMBA, with_config_pt=False)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["attention_type"] = "softmax"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not fit attention_type='softmax'"):
        load_model(str(tmp_path))


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("N", [300, 1100])
def test_pure_pytorch_mamba2_matches_mamba_ssm(fused, N):
    """Our Mamba-2 block against mamba_ssm's with the same weights: the output and the gradients of the input and of
    every parameter (float32; mamba_ssm's chunks of 256 tokens, the last one partial). fused: mamba_ssm's training
    path through causal_conv1d (use_mem_eff_path), else its unfused one."""
    mamba_ssm = pytest.importorskip("mamba_ssm")
    if fused:
        pytest.importorskip("causal_conv1d")
    torch.manual_seed(6)
    ref = mamba_ssm.Mamba2(d_model=256, headdim=64, d_ssm=64, use_mem_eff_path=fused, **MAMBA_SSM_SETTINGS).cuda()
    ours = Mamba2(256, 64).cuda()
    ours.load_state_dict(ref.state_dict())
    h = torch.randn(2, N, 256, device="cuda")
    h_ref, h_ours = h.clone().requires_grad_(), h.clone().requires_grad_()
    expected, got = ref(h_ref), ours(h_ours)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    dout = torch.randn_like(expected)
    expected.backward(dout)
    got.backward(dout)
    grads = {"input": (h_ours.grad, h_ref.grad)}
    grads.update({name: (p.grad, dict(ref.named_parameters())[name].grad) for name, p in ours.named_parameters()})
    for name, (ours_grad, ref_grad) in grads.items():
        err = ((ours_grad - ref_grad).norm() / ref_grad.norm()).item()
        assert err < 5e-3, f"d {name}: relative error {err:.2e}"


@pytest.mark.gpu
def test_reference_attention_on_gpu_matches_cpu():
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.float64) for _ in range(3))
    g = -torch.rand(1, 2, 64, dtype=torch.float64)
    gpu = attention_reference(*(t.cuda() for t in (q, k, v, g))).cpu()
    torch.testing.assert_close(gpu, attention_reference(q, k, v, g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_llamas(dtype):
    """The block's RMSNorm == transformers' LlamaRMSNorm (float32 inside, the weight applied after the cast)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from GPT_Trainer.LlamaDecoderLayerClean import RMSNorm

    gen = torch.Generator().manual_seed(3)
    ours, theirs = RMSNorm(48), LlamaRMSNorm(48, eps=1e-5)
    weight = torch.randn(48, generator=gen)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    x = (torch.randn(2, 5, 48, generator=gen) * 4).to(dtype)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


def test_decoding_a_mamba_ssm_block_steps_the_pytorch_block_on_its_parameters():
    """mamba_ssm's Mamba2 (here a module with its attribute and parameter names, each module its own, as mamba_ssm
    builds them) is decoded by a pure-PyTorch Mamba2 on the same Parameter objects: nothing copied, none left on
    the meta device it is built on, and the same outputs as a Mamba2 holding those weights."""
    attn = MambaAttention(256, 4)
    ours = attn.mamba_layer
    held = torch.nn.Module()
    held.d_model, held.d_ssm, held.d_state, held.d_conv = ours.d_model, ours.d_ssm, ours.d_state, 2
    for name, module in ours.named_children():
        held.add_module(name, torch.nn.Module())
        for pname, p in module.named_parameters():
            getattr(held, name).register_parameter(pname, torch.nn.Parameter(p.detach().clone()))
    for name, p in ours.named_parameters(recurse=False):
        held.register_parameter(name, torch.nn.Parameter(p.detach().clone()))
    attn.mamba_layer = held
    block = attn.recurrent_block()
    shared = dict(held.named_parameters())
    assert isinstance(block, Mamba2) and set(shared) == {n for n, _ in block.named_parameters()}
    assert all(p is shared[n] for n, p in block.named_parameters())
    h = torch.randn(2, 7, 256)
    with torch.no_grad():
        torch.testing.assert_close(block(h), ours(h), rtol=0, atol=0)
    del held.D
    with pytest.raises(TypeError, match="not those of the pure-PyTorch block"):
        attn.recurrent_block()


def test_mamba2_projects_in_two_aligned_products_and_honours_a_hooked_in_proj():
    """Mamba2.project: in_proj's rows before dt's and dt's as two products (in_proj's odd width takes cuBLAS's
    unaligned kernels) give in_proj(h) split, forward and backward; a hooked in_proj runs as a module."""
    torch.manual_seed(0)
    block = Mamba2(64, 16, d_state=8)
    h = torch.randn(2, 5, 64, requires_grad=True)
    parts = block.project(h)
    whole = torch.split(block.in_proj(h), [p.shape[-1] for p in parts], dim=-1)
    assert [p.shape[-1] for p in parts] == [block.d_mlp, block.d_mlp, 16, 16 + 2 * 8, 1]
    for a, b in zip(parts, whole):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    weights = torch.randn(block.in_proj.out_features)
    grads = [torch.autograd.grad((torch.cat(out, -1) * weights).sum(), (h, block.in_proj.weight))
             for out in (parts, whole)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    block.in_proj.register_forward_hook(lambda module, args, out: out + 1.0)
    with torch.no_grad():
        assert torch.equal(torch.cat(block.project(h), -1), block.in_proj(h))
