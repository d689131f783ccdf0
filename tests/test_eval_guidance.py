"""Classifier-free guidance wrapper: one batched forward, the interval per sample, labels and text alike."""
import pytest
import torch
from torch import nn

from class_cond.models import build_model
from class_cond.task import null_labels
from eval.guidance import GuidedVelocity
from eval.samplers import ode_sample


def _sit(learn_sigma=False):
    torch.manual_seed(0)
    model = build_model("tiny", input_size=8, in_channels=3, num_classes=5, encoder_dims=(16,), repa_depth=2,
                        projector_dim=32, learn_sigma=learn_sigma).eval()
    for p in model.parameters():  # adaLN-Zero init makes the output 0: give it something to guide
        nn.init.normal_(p, std=0.05)
    return model


def test_class_guidance_equals_formula_inside_interval_and_conditional_outside():
    model = _sit()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    t = torch.tensor([0.1, 0.5, 0.75, 0.9], dtype=torch.float64)
    vel = GuidedVelocity(model, {"y": y}, null_labels(y, 5), scale=3.0, interval=(0.2, 0.75))
    out = vel(x, t)
    with torch.no_grad():
        v_c = model(x.float(), t.float(), y)[0].double()
        v_u = model(x.float(), t.float(), torch.full_like(y, 5))[0].double()
    guided = v_u + 3.0 * (v_c - v_u)
    assert vel.forwards == 1 and vel.rows == 8  # one batched forward for cond + uncond
    assert out.dtype == torch.float64
    assert torch.allclose(out[1:3], guided[1:3], atol=1e-5)  # t = 0.5, 0.75: inside [0.2, 0.75]
    assert torch.allclose(out[[0, 3]], v_c[[0, 3]], atol=1e-5)  # t = 0.1, 0.9: conditional only
    assert (guided - v_c).abs().max() > 1e-2  # the guided and plain velocities do differ


def test_scale_one_and_all_outside_interval_need_no_doubling():
    model = _sit()
    x = torch.randn(3, 3, 8, 8)
    y = torch.tensor([0, 1, 2])
    plain = GuidedVelocity(model, {"y": y}, null_labels(y, 5), scale=1.0)
    plain(x, torch.full((3,), 0.5))
    assert plain.rows == 3
    outside = GuidedVelocity(model, {"y": y}, null_labels(y, 5), scale=4.0, interval=(0.0, 0.7))
    ode_sample(outside, x, 10)  # t = 1.0 .. 0.1: 3 steps above 0.7 go conditional-only
    assert outside.forwards == 10 and outside.rows == 3 * 3 + 7 * 6


def test_learned_sigma_output_is_cut_to_the_latent_channels():
    model = _sit(learn_sigma=True)
    x = torch.randn(2, 3, 8, 8)
    y = torch.tensor([1, 4])
    out = GuidedVelocity(model, {"y": y}, null_labels(y, 5), scale=2.0)(x, torch.full((2,), 0.3))
    with torch.no_grad():
        full_c = model(x, torch.full((2,), 0.3), y)[0]
        full_u = model(x, torch.full((2,), 0.3), torch.full_like(y, 5))[0]
    assert full_c.shape[1] == 6 and out.shape == x.shape
    assert torch.allclose(out.float(), full_u[:, :3] + 2.0 * (full_c[:, :3] - full_u[:, :3]), atol=1e-5)


class FakeTextModel(nn.Module):
    """Stands in for the text model: velocity depends on x, t and the mean of the context tokens."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 2)

    def forward(self, x, t, context):
        return x * t.view(-1, 1, 1, 1) + self.proj(context.mean(1)).view(-1, 2, 1, 1)


def test_text_context_guidance_with_broadcast_empty_caption():
    model = FakeTextModel()
    ctx = torch.randn(3, 77, 8)
    empty = torch.randn(1, 77, 8)  # the empty caption's embedding, shared by the batch
    x = torch.randn(3, 2, 4, 4)
    t = torch.full((3,), 0.4)
    out = GuidedVelocity(model, {"context": ctx}, {"context": empty}, scale=2.0)(x, t)
    with torch.no_grad():
        v_c, v_u = model(x, t, ctx), model(x, t, empty.expand(3, -1, -1))
    assert torch.allclose(out.float(), v_u + 2.0 * (v_c - v_u), atol=1e-6)


def test_bad_guidance_arguments_are_named():
    model = FakeTextModel()
    ctx = torch.randn(3, 77, 8)
    with pytest.raises(ValueError, match="keys"):
        GuidedVelocity(model, {"context": ctx}, {"y": ctx}, 2.0)
    with pytest.raises(ValueError, match="batch 2; expected 1 or 3"):
        GuidedVelocity(model, {"context": ctx}, {"context": ctx[:2]}, 2.0)
    with pytest.raises(ValueError, match="interval"):
        GuidedVelocity(model, {"context": ctx}, {"context": ctx}, 2.0, interval=(0.8, 0.2))


class LabelModel(nn.Module):
    """velocity = the label as a constant field (cond y=0 -> 0, null 1000 -> 1000); logs (t, batch) of each call."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((round(float(t[0]), 6), x.shape[0]))
        return x * 0 + y.view(-1, 1, 1, 1).to(x.dtype)


def test_heun_corrector_takes_the_guidance_decision_of_the_step_start():
    """Grid 1.0, 0.9, ..., 0; interval [0, 0.65] lies between t_cur = 0.7 and t_next = 0.6: as the reference's
    heun sampler, the step 0.7 -> 0.6 is unguided at both of its evaluations, the step 0.6 -> 0.5 guided at both."""
    model = LabelModel()
    y = torch.zeros(2, dtype=torch.long)
    vel = GuidedVelocity(model, {"y": y}, null_labels(y, 1000), scale=2.0, interval=(0.0, 0.65))
    x0 = ode_sample(vel, torch.zeros(2, 1, 1, 1, dtype=torch.float64), 10, heun=True)
    # guided v = 1000 + 2 (0 - 1000) = -1000 on the 6 steps starting at t_cur <= 0.6, each of dt = -0.1
    assert torch.allclose(x0, torch.full_like(x0, 600.0))
    assert model.calls[6:10] == [(0.7, 2), (0.6, 2), (0.6, 4), (0.5, 4)]  # (t, batch): batch 4 = cond + uncond
    # called directly, guide_t overrides the time of the interval test; without it t decides
    x, t = torch.zeros(2, 1, 1, 1), torch.full((2,), 0.6)
    assert torch.equal(vel(x, t), torch.full((2, 1, 1, 1), -1000.0, dtype=torch.float64))
    assert torch.equal(vel(x, t, guide_t=torch.tensor([0.7, 0.6])).flatten(),
                       torch.tensor([0.0, -1000.0], dtype=torch.float64))
