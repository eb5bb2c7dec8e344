"""cortex.attribution.attributions: exact gradients on a closed-form model, batched == per-sample loop,
batch-size independence, and the contribution scores (grad x input, IG, occlusion)."""
import pytest
import torch
from torch import nn

from cortex.attribution import attributions as A

C, H, W, K = 8, 4, 4, 3


class Linear(nn.Module):
    """logits = Wt @ flatten(x) + b: d logit_k / dx = Wt[k].reshape(C, H, W), in closed form."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(K, C * H * W, generator=g))
        self.bias = nn.Parameter(torch.randn(K, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


class TinyConv(nn.Module):
    """Non-linear, with BatchNorm and Dropout, so eval mode matters."""

    def __init__(self, c=C):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(c, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, K)
        with torch.no_grad():  # non-trivial running statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        return self.fc(self.drop(h.mean(dim=(2, 3)) + h.amax(dim=(2, 3))))


def _data(b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, H, W, generator=g), torch.randint(0, K, (b,), generator=g)


def test_exact_gradient_closed_form_max_and_mean():
    model = Linear()
    x, t = _data()
    exact = model.weight.detach()[t].reshape(-1, C, H, W)  # hand-computed d logit_t / dx
    for scope in A.NOISE_SCOPES:
        g = A.smoothgrad(model, x, t, nsamples=1, stdev_spread=0.0, noise_scope=scope,
                         seeds=list(range(len(t))))
        torch.testing.assert_close(g.float(), exact)  # "authors" returns float64, as the authors
    s_max = A.token_scores("smoothgrad", model, x, t, method="max", nsamples=1, stdev_spread=0.0)
    s_ave = A.token_scores("smoothgrad", model, x, t, method="ave", nsamples=1, stdev_spread=0.0)
    torch.testing.assert_close(s_max, exact.amax(1).reshape(len(t), H * W))
    torch.testing.assert_close(s_ave, exact.mean(1).reshape(len(t), H * W))
    # row-major flattening: p = row * W + col
    assert s_max[2, 1 * W + 3] == exact[2, :, 1, 3].max()


def test_linear_model_smoothgrad_is_exact_with_noise():
    model = Linear()
    x, t = _data()
    exact = model.weight.detach()[t].reshape(-1, C, H, W)
    g = A.smoothgrad(model, x, t, nsamples=4, stdev_spread=0.3, seeds=[7, 8, 9, 10, 11])
    torch.testing.assert_close(g, exact)


def _seed_loop(model, x, t, noise):
    """The seed's algorithm: per draw, per sample, autograd.grad(create_graph=True)."""
    model.eval()
    total = torch.zeros_like(x)
    for s in range(noise.shape[0]):
        noisy = (x + noise[s]).requires_grad_(True)
        out = model(noisy)
        for j in range(len(t)):
            grad = torch.autograd.grad(out[j, t[j]], noisy, retain_graph=True, create_graph=True)[0]
            total[j] += grad[j].detach()
    return total / noise.shape[0]


@pytest.mark.parametrize("chunk", [None, 3, 7])
def test_batched_equals_per_sample_loop(chunk):
    model = TinyConv().train()  # must be switched to eval inside and restored after
    x, t = _data(6)
    z = A.standard_noise(5, x.shape[1:], seeds=[A.image_seed(3, i) for i in range(6)])
    sd = A.noise_scale(x, 0.2, "batch")
    ref = _seed_loop(model, x, t, z * sd)
    model.train()
    got = A.smoothgrad(model, x, t, nsamples=5, stdev_spread=0.2, noise_scope="batch", noise=z,
                       max_copies_per_pass=chunk)
    assert model.training
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_batch_size_independence_sample_scope():
    model = TinyConv()
    x, t = _data(6)
    seeds = [A.image_seed(0, f"{i}_0.npy") for i in range(6)]
    full = A.token_scores("smoothgrad", model, x, t, nsamples=4, seeds=seeds)
    parts = torch.cat([A.token_scores("smoothgrad", model, x[i:i + 2], t[i:i + 2], nsamples=4,
                                      seeds=seeds[i:i + 2]) for i in range(0, 6, 2)])
    torch.testing.assert_close(full, parts, rtol=1e-5, atol=1e-6)
    # the seed's batch scope does depend on the batch (its defect, kept reproducible)
    fb = A.token_scores("smoothgrad", model, x, t, nsamples=4, seeds=seeds, noise_scope="batch")
    pb = torch.cat([A.token_scores("smoothgrad", model, x[i:i + 2], t[i:i + 2], nsamples=4,
                                   seeds=seeds[i:i + 2], noise_scope="batch") for i in range(0, 6, 2)])
    assert not torch.allclose(fb, pb)


def test_image_seed_stable_and_distinct():
    assert A.image_seed(0, "3_1.npy") == A.image_seed(0, "3_1.npy")
    assert A.image_seed(0, "3_1.npy") != A.image_seed(1, "3_1.npy")
    assert A.image_seed(0, "3_1.npy") != A.image_seed(0, "3_2.npy")


def test_grad_x_input_and_ig_on_linear_model():
    model = Linear()
    x, t = _data()
    w = model.weight.detach()[t].reshape(-1, C, H, W)
    gxi = A.smoothgrad_x_input(model, x, t, nsamples=2, stdev_spread=0.1, seeds=range(5))
    torch.testing.assert_close(gxi, w * x)
    codebook = torch.randn(20, C)
    ig = A.integrated_gradients(model, x, t, codebook=codebook, n_steps=8)
    base = codebook.mean(0).reshape(1, C, 1, 1)
    torch.testing.assert_close(ig, w * (x - base), rtol=1e-4, atol=1e-5)
    # completeness: sum of attributions = logit(x) - logit(baseline)
    lx = model(x).gather(1, t[:, None]).squeeze(1)
    lb = model(base.expand_as(x)).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(ig.flatten(1).sum(1), (lx - lb).detach(), rtol=1e-4, atol=1e-4)
    # zeros baseline without a codebook
    ig0 = A.integrated_gradients(model, x, t, n_steps=4)
    torch.testing.assert_close(ig0, w * x, rtol=1e-4, atol=1e-5)


def test_occlusion_matches_loop():
    model = TinyConv()
    x, t = _data(3)
    codebook = torch.randn(10, C)
    occ = A.occlusion(model, x, t, codebook=codebook, max_copies_per_pass=5)
    scores = A.reduce_channels(occ, "mean")
    base = codebook.mean(0)
    model.eval()
    with torch.no_grad():
        ref = model(x).gather(1, t[:, None]).squeeze(1)
        for b in range(3):
            for p in range(H * W):
                xo = x[b:b + 1].clone()
                xo[0, :, p // W, p % W] = base
                drop = ref[b] - model(xo)[0, t[b]]
                assert abs(scores[b, p] - drop) < 1e-5
    torch.testing.assert_close(A.reduce_channels(occ, "max"), scores)


def test_full_size_shapes_and_dispatch():
    model = TinyConv(c=256)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 16, 16, generator=g)
    t = torch.tensor([0, 2])
    cb = torch.randn(30, 256, generator=g)
    for name, a in A.ATTRIBUTIONS.items():
        s = A.token_scores(name, model, x, t, nsamples=2, seeds=[1, 2], codebook=cb, n_steps=2,
                           max_copies_per_pass=64)
        assert s.shape == (2, 256), name
        assert torch.isfinite(s).all(), name
    with pytest.raises(ValueError):
        A.reduce_channels(torch.zeros(1, 2, 2, 2), "median")
    with pytest.raises(ValueError):
        A.get_attribution("lime")
