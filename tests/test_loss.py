import math

import pytest
import torch

from mtrain import loss as loss_module
from mtrain.config import ModelConfig
from mtrain.data import Batch
from mtrain.loss import label_smoothed_loss, output_loss
from mtrain.model import Transformer
from mtrain.train import batch_loss


def test_label_smoothed_loss_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    target = torch.tensor([0, 2])
    eps, V = 0.1, 3
    expected = 0.0
    for row, t in zip(logits.tolist(), target.tolist()):
        logz = math.log(sum(math.exp(x) for x in row))
        logp = [x - logz for x in row]
        q = [(1 - eps) * (c == t) + eps / V for c in range(V)]
        expected -= sum(qc * lp for qc, lp in zip(q, logp))
    assert label_smoothed_loss(logits, target, eps).item() == pytest.approx(expected, rel=1e-6)
    assert label_smoothed_loss(logits, target, 0.0).item() == pytest.approx(
        -sum(torch.log_softmax(logits, -1)[i, t].item() for i, t in enumerate(target.tolist())), rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_label_smoothed_loss_gradient_equals_torch(eps):
    torch.manual_seed(0)
    logits, target = torch.randn(6, 11, requires_grad=True), torch.randint(0, 11, (6,))
    (label_smoothed_loss(logits, target, eps) * 0.5).backward()
    ours = logits.grad.clone()
    logits.grad = None
    (torch.nn.functional.cross_entropy(logits, target, label_smoothing=eps, reduction="sum") * 0.5).backward()
    assert torch.allclose(ours, logits.grad, atol=1e-6)
    half = logits.detach().bfloat16().requires_grad_()
    label_smoothed_loss(half, target, eps).backward()
    assert half.grad.dtype == torch.bfloat16  # the gradient comes back in the logits' dtype


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_the_loss_in_row_chunks_is_the_loss_of_the_whole(monkeypatch, chunk_rows):
    """The fp32 work goes a chunk of rows at a time: the loss and gradient are torch's whatever the
    chunk; with bf16 logits the gradient is kept in bf16, within bf16's rounding (8 bits of mantissa:
    2e-2 of the largest gradient) of fp32's."""
    torch.manual_seed(0)
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", chunk_rows * 4 * 11)
    logits, target = torch.randn(10, 11), torch.randint(0, 11, (10,))
    mine = logits.clone().requires_grad_()
    (label_smoothed_loss(mine, target, 0.1) * 0.5).backward()
    ref = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(ref, target, label_smoothing=0.1, reduction="sum").mul(0.5).backward()
    assert torch.allclose(mine.grad, ref.grad, atol=1e-6)
    half = logits.bfloat16().requires_grad_()
    value = label_smoothed_loss(half, target, 0.1)
    (value * 0.5).backward()
    assert value.dtype == torch.float32 and half.grad.dtype == torch.bfloat16
    assert value.item() == pytest.approx(torch.nn.functional.cross_entropy(
        half.detach().float(), target, label_smoothing=0.1, reduction="sum").item(), rel=1e-5)
    assert (half.grad.float() - ref.grad).abs().max() <= 2e-2 * ref.grad.abs().max()


def test_the_loss_adds_little_more_than_the_gradient_to_peak_memory():
    """scripts/bench_memory.py's probe: forward and backward on 2,048 x 8,000 bf16 logits (31 MB)
    raise the peak by the gradient (1x) and a chunk; whole and in fp32 the loss added 5.1x."""
    import subprocess
    import sys

    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_memory
    finally:
        sys.path.pop(0)
    found = bench_memory.probe(ROOT, 2048, 8000, "bfloat16")
    assert found["logits_mb"] == pytest.approx(31.25)
    assert found["added_mb"] <= 2.0 * found["logits_mb"], found
    run = subprocess.run([sys.executable, "scripts/bench_memory.py", "--rows", "512", "--vocab", "1000"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "| × the logits |" in run.stdout, run.stderr


def output_loss_and_grads(fn, hidden, weight, target, scale=0.5):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    value = fn(hidden, weight, target)
    (value * scale).backward()
    return value.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 1000])
def test_output_loss_equals_output_layer_then_loss(monkeypatch, eps, chunk_rows):
    """The chunked, fused loss gives the loss and both gradients of logits = hidden @ W^T followed by
    label_smoothed_loss, whatever the chunk size (one row, uneven chunks, one chunk for everything)."""
    torch.manual_seed(0)
    V, d = 13, 8
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", chunk_rows * 4 * V)
    hidden, weight, target = torch.randn(10, d), torch.randn(V, d), torch.randint(0, V, (10,))
    ref = output_loss_and_grads(lambda h, w, t: label_smoothed_loss(h @ w.t(), t, eps), hidden, weight, target)
    ours = output_loss_and_grads(lambda h, w, t: output_loss(h, w, t, eps), hidden, weight, target)
    assert ours[0].item() == pytest.approx(ref[0].item(), rel=1e-5)
    assert torch.allclose(ours[1], ref[1], atol=1e-5) and torch.allclose(ours[2], ref[2], atol=1e-5)
    assert ours[2].abs().sum() > 0  # the weight does get a gradient


def test_output_loss_accumulates_into_a_tied_weight():
    """The output weight is also the embedding table: both gradients must add up in .grad."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(9, 4)
    tokens, target = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([0, 3, 8, 2, 2, 7])
    grads = []
    for fn in (lambda h: label_smoothed_loss(h @ emb.weight.t(), target, 0.1), lambda h: output_loss(h, emb.weight, target, 0.1)):
        emb.weight.grad = None
        fn(torch.tanh(emb(tokens)).flatten(0, 1)).backward()
        grads.append(emb.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_output_loss_without_gradients():
    torch.manual_seed(0)
    hidden, weight, target = torch.randn(5, 4), torch.randn(7, 4), torch.randint(0, 7, (5,))
    with torch.no_grad():
        value = output_loss(hidden, weight, target, 0.1)
    assert not value.requires_grad
    assert value.item() == pytest.approx(label_smoothed_loss(hidden @ weight.t(), target, 0.1).item(), rel=1e-6)


def test_output_loss_under_bf16_autocast():
    """As with nn.Linear under autocast: matmuls in bf16, the loss in fp32, each gradient in its input's
    dtype, and close to the fp32 figures."""
    torch.manual_seed(0)
    hidden, weight, target = torch.randn(12, 16), torch.randn(50, 16) * 0.25, torch.randint(0, 50, (12,))
    ref = output_loss_and_grads(lambda h, w, t: output_loss(h, w, t, 0.1), hidden, weight, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = output_loss_and_grads(lambda h, w, t: output_loss(h, w, t, 0.1), hidden, weight, target)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.float32
    assert ours[0].item() == pytest.approx(ref[0].item(), rel=2e-2)
    assert torch.allclose(ours[1], ref[1], atol=3e-2) and torch.allclose(ours[2], ref[2], atol=3e-2)


def test_batch_loss_on_cpu_is_the_models_logits_then_the_loss():
    """batch_loss takes the fused path on a CPU: same loss, same gradients as the model's own logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(encoder_layers=1, decoder_layers=1, d_model=16, heads=2, ffn_dim=32, dropout=0.0)
    model = Transformer(cfg, 30, 30, pad=0)
    src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    tgt_in = torch.tensor([[1, 10, 11, 12], [1, 13, 14, 0]])
    tgt_out = torch.tensor([[10, 11, 12, 2], [13, 14, 2, 0]])
    batch = Batch(src=src, src_pad_mask=src == 0, tgt_in=tgt_in, tgt_out=tgt_out, n_tgt_tokens=7)
    results = []
    for fn in (lambda: batch_loss(model, batch, 0.1),
               lambda: label_smoothed_loss(model(src, src == 0, tgt_in, tgt_out != 0), tgt_out[tgt_out != 0], 0.1)):
        model.zero_grad()
        value = fn()
        value.backward()
        results.append((value.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for ours, ref in zip(results[0][1], results[1][1]):
        assert torch.allclose(ours, ref, atol=1e-5)
