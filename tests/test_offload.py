"""Weight streaming and activation offload (qlora_kit.offload) on CPU, where the device copy is a staging
copy and the scheduling is the real one: identical training, at most two streamed layers on the device at
any moment of forward, recompute and backward, nothing left on it after the step, checkpointed inputs in
host memory."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint

from qlora_kit.architecture import decoder_layers
from qlora_kit.loading import load_model
from qlora_kit.lora import add_lora
from qlora_kit.loss import causal_lm_loss
from qlora_kit.offload import NF4_TENSORS, enable_offload
from qlora_kit.quant import NF4Linear
from tests.conftest import gpu, save_tiny_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny4_dir(tmp_path_factory) -> Path:
    """A tiny Llama with 4 decoder layers: enough for prefetch, release and a resident prefix."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny4", num_hidden_layers=4)


def _model(model_dir: Path, checkpointing: bool, dropout: float = 0.1):
    torch.manual_seed(0)
    model = load_model(model_dir, device="cpu", dtype=torch.float32)
    add_lora(model, "all-linear", 8, 16, dropout, False, torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _batch(vocab: int, seed: int, rows: int = 2, seq: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _steps(model, n: int, vocab: int) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """``n`` SGD steps (a plain update, so any gradient difference shows in the next loss); losses and grads."""
    torch.manual_seed(1)  # the dropout seeds
    params = [p for p in model.parameters() if p.requires_grad]
    losses, grads = [], []
    for step in range(n):
        loss, _ = causal_lm_loss(model, _batch(vocab, step))
        loss.backward()
        losses.append(loss.item())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
        with torch.no_grad():
            for p in params:
                p -= 1e-2 * p.grad
                p.grad = None
    return losses, grads


def _streamed_on_device(model, first_streamed: int) -> int:
    """Streamed layers whose NF4 tensors hold data now, counted from the modules themselves."""
    layers = decoder_layers(model)
    return sum(
        any(m.codes.numel() > 0 for m in layers[i].modules() if isinstance(m, NF4Linear))
        for i in range(first_streamed, len(layers))
    )


class _Sampler:
    """At every NF4 matmul of forward and recompute (the NF4Linears' forward pre-hooks run inside the
    checkpoint) and at every LoRA gradient of backward: the streamed layers swapped into their modules, and
    the device copies the streamer holds (those plus the one being prefetched)."""

    def __init__(self, model, first_streamed: int, offload) -> None:
        self.counts: list[tuple[int, int]] = []

        def sample(*_) -> None:
            self.counts.append((_streamed_on_device(model, first_streamed), len(offload.resident_copies)))

        self.handles = [m.register_forward_pre_hook(sample) for m in model.modules() if isinstance(m, NF4Linear)]
        self.handles += [p.register_hook(sample) for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("resident", [0, 1])
def test_streaming_trains_bit_for_bit_like_the_resident_model(tiny4_dir, checkpointing, resident):
    reference = _model(tiny4_dir, checkpointing)
    want_losses, want_grads = _steps(reference, 3, 320)

    model = _model(tiny4_dir, checkpointing)
    offload = enable_offload(model, CPU, weights=True, resident_layers=resident)
    assert _streamed_on_device(model, resident) == 0  # after enabling, the streamed layers live on the host
    sampler = _Sampler(model, resident, offload)
    losses, grads = _steps(model, 3, 320)

    assert losses == want_losses
    for got, want in zip(grads, want_grads, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
    # the residency proof: never more than two streamed layers, and both the counter and the modules say so
    assert offload.stats.peak_streamed == 2
    assert len(sampler.counts) > 100
    assert all(swapped <= held <= 2 for swapped, held in sampler.counts)
    assert max(held for _, held in sampler.counts) == 2
    assert offload.resident_copies == [] and _streamed_on_device(model, resident) == 0  # released by the end
    # each step: forward copies every streamed layer once, backward all but the last (still there)
    streamed = list(range(resident, 4))
    per_step = streamed + streamed[-2::-1]
    assert offload.stats.fetches == per_step * 3
    assert offload.stats.bytes_moved == 3 * sum(offload.layer_bytes[i] for i in per_step)


class _CheckpointedCall(torch.nn.Module):
    """Checkpoints a layer's whole ``__call__`` (hooks included), as transformers before 5.x and other wrappers
    do: the layer's hooks then run inside the checkpoint, and again for the recompute in backward."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.inner, hidden_states, use_reentrant=False, **kwargs)


def _checkpoint_calls(model) -> None:
    layers = decoder_layers(model)
    for i in range(len(layers)):
        layers[i] = _CheckpointedCall(layers[i])


def test_streaming_with_the_hooks_inside_the_checkpoint(tiny4_dir):
    """The recompute fires the layer's forward hooks again, from inside backward: it finds its layer ready,
    and the residency bound and the results hold."""
    reference = _model(tiny4_dir, False)
    _checkpoint_calls(reference)
    want_losses, want_grads = _steps(reference, 3, 320)
    model = _model(tiny4_dir, False)
    offload = enable_offload(model, CPU, weights=True, resident_layers=0)  # hooks on the layers themselves
    calls = []
    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(lambda *_: calls.append(offload.in_backward))
    _checkpoint_calls(model)
    sampler = _Sampler(model, 0, offload)
    losses, grads = _steps(model, 3, 320)
    assert calls.count(True) == calls.count(False) == 3 * 4  # each layer: forward, then recompute in backward
    assert losses == want_losses
    assert all(torch.equal(g[n], w[n]) for g, w in zip(grads, want_grads, strict=True) for n in w)
    assert max(held for _, held in sampler.counts) == 2 and all(s <= h <= 2 for s, h in sampler.counts)
    assert offload.stats.fetches == [0, 1, 2, 3, 2, 1, 0] * 3 and offload.resident_copies == []


def test_the_resident_layers_never_move(tiny4_dir):
    model = _model(tiny4_dir, True)
    layers = decoder_layers(model)
    resident = {
        id(getattr(m, n)): getattr(m, n).data_ptr()
        for m in layers[0].modules()
        if isinstance(m, NF4Linear)
        for n in NF4_TENSORS
    }
    offload = enable_offload(model, CPU, weights=True, resident_layers=2)
    _steps(model, 1, 320)
    after = {
        id(getattr(m, n)): getattr(m, n).data_ptr()
        for m in layers[0].modules()
        if isinstance(m, NF4Linear)
        for n in NF4_TENSORS
    }
    assert after == resident
    assert set(offload.stats.fetches) == {2, 3}


def test_eval_and_generation_stream_without_keeping_a_layer(tiny4_dir):
    reference = _model(tiny4_dir, True).eval()
    model = _model(tiny4_dir, True).eval()
    offload = enable_offload(model, CPU, weights=True, resident_layers=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=4, do_sample=False)
        got = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    assert offload.stats.peak_streamed == 2 and offload.resident_copies == []


def test_a_released_layer_fails_loudly_instead_of_using_stale_weights(tiny4_dir):
    model = _model(tiny4_dir, False)
    enable_offload(model, CPU, weights=True, resident_layers=0)
    layer = next(m for m in decoder_layers(model)[1].modules() if isinstance(m, NF4Linear))
    with pytest.raises(RuntimeError):
        layer(torch.randn(1, layer.in_features))


def test_remove_puts_the_layers_back(tiny4_dir):
    model = _model(tiny4_dir, True)
    before = [m.dequantize() for m in model.modules() if isinstance(m, NF4Linear)]
    offload = enable_offload(model, CPU, weights=True, resident_layers=1)
    offload.remove()
    after = [m.dequantize() for m in model.modules() if isinstance(m, NF4Linear)]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_activation_offload_keeps_the_checkpointed_inputs_on_the_host(tiny4_dir):
    reference = _model(tiny4_dir, True)
    want_losses, want_grads = _steps(reference, 2, 320)
    model = _model(tiny4_dir, True)
    offload = enable_offload(model, CPU, weights=True, resident_layers=1, activations=True)
    losses, grads = _steps(model, 2, 320)
    assert losses == want_losses
    assert all(torch.equal(g[n], w[n]) for g, w in zip(grads, want_grads, strict=True) for n in w)
    # one saved input per layer and micro-batch (the hidden states, 2 x 24 x 128 fp32), held on the host; not
    # layer 0's: the embeddings' output needs no grad, and autograd keeps it without a saved-tensor hook
    assert offload.stats.activations_offloaded == 2 * 3
    assert offload.stats.activation_bytes_offloaded == 2 * 3 * 2 * 24 * 128 * 4
    assert offload.stats.peak_activations_on_device == 2  # layer i's input and layer i-1's, prefetched


def test_activation_offload_without_a_checkpoint_around_the_layer_fails_on_the_first_forward(tiny4_dir):
    """Without the checkpoint outside our hooks, they would catch every tensor the layer saves and undo the
    checkpointing (all activations to the host): the first forward says so instead of running that way."""
    model = _model(tiny4_dir, False)
    enable_offload(model, CPU, weights=False, activations=True)
    with pytest.raises(RuntimeError, match=r"caught .* saved tensors in decoder layer 0, not just its 1 input"):
        causal_lm_loss(model, _batch(320, 0))


@pytest.mark.parametrize("activations", [False, True])
def test_offloaded_inputs_leave_no_device_reference(tiny4_dir, activations):
    """Without offload the checkpoint keeps each layer's input alive until backward; with it, only the host
    copy lives: the device tensors (here: the original buffers) are freed right after forward."""
    model = _model(tiny4_dir, True)
    enable_offload(model, CPU, weights=False, activations=activations)
    outputs = []
    layers = decoder_layers(model)
    handles = [layer.register_forward_hook(lambda m, a, o: outputs.append(weakref.ref(o))) for layer in layers[:-1]]
    loss, _ = causal_lm_loss(model, _batch(320, 0))
    alive = [ref() is not None for ref in outputs]
    assert alive == [not activations] * 3
    loss.backward()
    for handle in handles:
        handle.remove()


def test_streaming_on_smollm2_is_bit_for_bit(smollm2_dir):
    """The real 30-layer SmolLM2-135M, checkpointing on, 10 of its layers resident."""
    reference = _model(smollm2_dir, True, dropout=0.05)
    want_losses, want_grads = _steps(reference, 2, 49152)
    model = _model(smollm2_dir, True, dropout=0.05)
    offload = enable_offload(model, CPU, weights=True, resident_layers=10, activations=True)
    losses, grads = _steps(model, 2, 49152)
    assert losses == want_losses
    assert all(torch.equal(g[n], w[n]) for g, w in zip(grads, want_grads, strict=True) for n in w)
    assert offload.stats.peak_streamed == 2 and offload.resident_copies == []
    assert offload.stats.fetches.count(29) == 2  # the last layer: once per step (kept for its backward)


def _cuda_model(model_dir: Path, resident: int | None):
    """On the GPU in bf16 as training loads it: streamed layers to pinned host memory as they load, offload
    enabled before the adapters are added (so they are made on the GPU)."""
    from qlora_kit.offload import host_placement

    cuda = torch.device("cuda")
    torch.manual_seed(0)
    place = host_placement(resident, cuda) if resident is not None else None
    model = load_model(model_dir, device=cuda, dtype=torch.bfloat16, place=place)
    offload = enable_offload(model, cuda, weights=True, resident_layers=resident, activations=True) if place else None
    add_lora(model, "all-linear", 8, 16, 0.1, False, torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), offload


def _cuda_steps(model, n: int) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    torch.manual_seed(1)
    losses, grads = [], []
    for step in range(n):
        batch = {k: v.cuda() for k, v in _batch(320, step).items()}
        loss, _ = causal_lm_loss(model, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
    return losses, grads


@gpu
@pytest.mark.gpu
def test_streaming_on_cuda_matches_the_resident_model(tiny4_dir):
    """Side stream, events and pinned host copies: the same losses and LoRA gradients as the resident model,
    the adapters on the GPU, the streamed layers' host copies pinned, nothing streamed left after the step."""
    want_losses, want_grads = _cuda_steps(_cuda_model(tiny4_dir, None)[0], 3)
    model, offload = _cuda_model(tiny4_dir, 1)
    assert all(p.is_cuda for p in model.parameters() if p.requires_grad)
    assert all(host.is_pinned() for entries in offload._host.values() for *_, host in entries)
    losses, grads = _cuda_steps(model, 3)
    torch.cuda.synchronize()
    assert losses == want_losses
    assert all(torch.equal(g[n], w[n]) for g, w in zip(grads, want_grads, strict=True) for n in w)
    assert offload.stats.peak_streamed == 2 and offload.resident_copies == []
    assert offload.stats.peak_activations_on_device <= 2 and offload.stats.activations_offloaded == 3 * 3
