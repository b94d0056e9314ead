"""Differentiable augmentation (DiffAugment) for the Score GAN's real-data head: each transform
checked against its definition by brute force, its gradient against finite differences, and the
generator's GAN direction against autograd through the same random draw."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import flowsolve as fs
from flowsolve.train.augment import check_policy, color, cutout, diff_augment, translation


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_translation_shifts_each_image_by_at_most_one_pixel_with_repeated_borders():
    x = torch.randn(64, 2, 8, 8)
    out = translation(x, _g())
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    seen = set()
    for b in range(len(x)):
        hits = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                if torch.equal(out[b], padded[b, :, 1 + dy:9 + dy, 1 + dx:9 + dx])]
        assert len(hits) == 1                     # one whole-pixel shift, the same for both channels
        seen.add(hits[0])
    assert len(seen) == 9                         # every shift in [−1, 1]² is drawn


def test_cutout_zeroes_one_clipped_half_size_square():
    x = torch.rand(64, 1, 8, 8) + 1.0             # no zeros of its own
    out = cutout(x, _g(1))
    for b in range(len(x)):
        zero = out[b, 0] == 0
        assert torch.equal(out[b, 0][~zero], x[b, 0][~zero])
        rows, cols = zero.any(1).nonzero().squeeze(1), zero.any(0).nonzero().squeeze(1)
        assert 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4            # at most a 4×4 square of an 8×8 image
        assert zero.sum() == len(rows) * len(cols)                     # a rectangle: the square, clipped
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
        if 0 not in rows and 7 not in rows:
            assert len(rows) == 4                                      # unclipped: the whole square


def test_color_of_a_one_channel_image_is_an_affine_map_with_contrast_in_range():
    x = torch.randn(32, 1, 8, 8)
    out = color(x, _g(2))
    for b in range(len(x)):
        A = torch.stack([x[b].flatten(), torch.ones(64)], 1)
        coef = torch.linalg.lstsq(A, out[b].flatten()[:, None]).solution.squeeze(1)
        torch.testing.assert_close(A @ coef, out[b].flatten(), atol=1e-5, rtol=1e-5)
        assert 0.5 <= coef[0] < 1.5                                    # saturation does nothing to one channel


def test_augmentation_is_differentiable_in_x_for_a_fixed_draw():
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: diff_augment(v, "translation,cutout,color", _g(3)), (x,))
    assert torch.equal(diff_augment(x, "", _g()), x)


def test_policies_are_checked():
    assert check_policy("translation, cutout") == ("translation", "cutout")
    with pytest.raises(fs.errors.ArgumentError, match="gan_augment.*flip"):
        check_policy("translation,flip")
    with pytest.raises(fs.errors.ArgumentError, match="gan_augment.*image batches"):
        diff_augment(torch.randn(4, 2), "translation", _g())


@pytest.fixture(scope="module")
def teacher():
    return fs.from_pretrained("pretrained/digits-edm")


def test_score_gan_refuses_augmentation_without_the_gan_or_on_vectors(teacher, gmm):
    with pytest.raises(fs.errors.ArgumentError, match="gan_augment.*gan_weight"):
        fs.train.score_gan(teacher, data="digits", gan_augment="translation", steps=1, progress=False)
    with pytest.raises(fs.errors.ArgumentError, match="gan_augment.*flip"):
        fs.train.score_gan(teacher, data="digits", gan_weight=0.1, gan_augment="flip", steps=1, progress=False)
    data = fs.data.TensorData(gmm.sample(64, generator=_g()))
    with pytest.raises(fs.errors.ArgumentError, match="gan_augment.*images"):
        fs.train.score_gan(gmm.denoiser, (2,), data=data, gan_weight=0.1, gan_augment="cutout", steps=1,
                           progress=False)


def test_score_gan_head_sees_augmented_images_and_the_direction_goes_back_through_them(teacher, monkeypatch):
    """Real and generated batches reach the head through the augmentation; the generator's GAN
    direction is −w·Aᵀ∇(c∘f), recomputed here through the same random draw of A."""
    sg = importlib.import_module("flowsolve.train.score_gan")
    calls, seen = [], {}
    real_aug, real_loss, real_call = sg.diff_augment, sg.int_pm_loss, sg.FeatureDiscriminator.__call__

    def spy_aug(x, policy, g):
        calls.append((x.detach().clone(), x.requires_grad, g.get_state(), policy))
        return real_aug(x, policy, g)

    def spy_loss(x, direction, normalize=False):
        seen["direction"] = direction.clone()
        return real_loss(x, direction, normalize)

    def spy_call(self, score, head, x, sigma, cond, **kw):
        if x.requires_grad:                               # the generator phase
            seen["args"] = (self, score, head, x.detach().clone(), sigma.clone())
        return real_call(self, score, head, x, sigma, cond, **kw)

    monkeypatch.setattr(sg, "diff_augment", spy_aug)
    monkeypatch.setattr(sg, "int_pm_loss", spy_loss)
    monkeypatch.setattr(sg.FeatureDiscriminator, "__call__", spy_call)
    common = dict(data="digits", recipe="beyond-teacher", steps=1, K=1, batch_size=8, gan_augment="translation",
                  progress=False, normalize=False)
    dirs = []
    for w in (0.5, 1.0):
        calls.clear()
        fs.train.score_gan(teacher, gan_weight=w, **common)
        dirs.append(seen["direction"])
    (fake, fg, _, pol), (real, rg, _, _), (xg, gg, state, _) = calls      # score step: fakes, reals; generator step
    assert pol == "translation" and not fg and not rg and gg
    digits = fs.data.digits("train").x.reshape(-1, 64)
    assert all((digits == r.reshape(1, 64)).all(1).any() for r in real)  # real digits, before augmenting
    feat, score, head, xa, sigma = seen["args"]
    xa = xa.requires_grad_(True)
    f, _ = real_call(feat, score, head, xa, sigma, {})
    (u,) = torch.autograd.grad(fs.fields.GANLoss("vanilla").c(f).sum(), xa)
    g = torch.Generator()
    g.set_state(state)
    x = xg.requires_grad_(True)
    (dc,) = torch.autograd.grad(real_aug(x, "translation", g), x, u)    # Aᵀ u for the same shifts
    torch.testing.assert_close(dirs[1] - dirs[0], -0.5 * dc, atol=1e-5, rtol=1e-4)
