"""monai_losses.losses: MONAI's conventions (shapes, flags, errors, reductions, spacing sources, wrappers) and the
numbers, checked against geomed called directly and against closed forms."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.losses import DeepSupervisionLoss, DiceLoss, MaskedLoss

from geomed import grid_sinkhorn_divergence
from geomed.grid_kernels import grid_boundary_distance
from monai_losses import BoundaryKernelLoss, DiceSinkhornLoss, SinkhornSegmentationLoss

CONVERGED = dict(tol=1e-5, max_iter=2000, blur=3.0, reach=None)


def _disk(shape, centre, radius):
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    return ((grid - torch.tensor(centre, dtype=torch.float32)).norm(dim=-1) <= radius).float()


def _two_class(shape, centre, radius):
    """(2, *shape) one-hot: background and one disk/ball."""
    disk = _disk(shape, centre, radius)
    return torch.stack([1 - disk, disk])


def _pair(dims=2, batch=2):
    """Logits (B, 3, *spatial) of a noisy, slightly displaced prediction and the (B, 1, *spatial) label map."""
    shape = (24, 20) if dims == 2 else (16, 14, 12)
    generator = torch.Generator().manual_seed(dims)
    labels, logits = [], []
    for item in range(batch):
        first = (7 + item, 6) if dims == 2 else (5 + item, 5, 5)
        second = (16, 13 - item) if dims == 2 else (11, 9, 7 - item)
        label = torch.zeros(shape)
        label[_disk(shape, first, 4) > 0] = 1
        label[_disk(shape, second, 3) > 0] = 2
        moved = torch.roll(label, 1, 0)
        labels.append(label[None])
        logits.append(4.0 * torch.nn.functional.one_hot(moved.long(), 3).movedim(-1, 0).float())
    logits = torch.stack(logits) + torch.randn((batch, 3, *shape), generator=generator)
    return logits, torch.stack(labels)


# ------------------------------------------------------------------ known values


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 1.3)])
def test_translated_disk_costs_half_the_squared_shift_in_mm(spacing):
    """Debiased Sinkhorn is exactly |t|²/2 for a translation (the entropic terms cancel): probabilities in,
    a disk moved by (2, 1) voxels, spacing from the argument."""
    target = _two_class((30, 30), (14, 14), 6)[None]
    moved = torch.roll(target, shifts=(2, 1), dims=(2, 3))
    loss = SinkhornSegmentationLoss(include_background=False, spacing=spacing, reduction="none", **CONVERGED)
    shift_mm = torch.tensor([2 * spacing[0], 1 * spacing[1]])
    value = loss(moved, target)
    assert value.shape == (1, 1, 1, 1)
    assert float(value) == pytest.approx(float(shift_mm.square().sum()) / 2, rel=2e-3)


@pytest.mark.parametrize("reach", [None, 6.0])
@pytest.mark.parametrize("dims", [2, 3])
def test_values_equal_geomed_called_directly(reach, dims):
    logits, labels = _pair(dims)
    loss = SinkhornSegmentationLoss(softmax=True, to_onehot_y=True, reduction="none", reach=reach, blur=1.5)
    value = loss(logits, labels)
    probabilities = logits.softmax(1)
    target = torch.nn.functional.one_hot(labels[:, 0].long(), 3).movedim(-1, 1).float()
    mean_mass = 0.5 * (probabilities.flatten(2).sum(-1) + target.flatten(2).sum(-1))
    scale = mean_mass.reshape(2, 3, *[1] * dims) if reach is not None else 1.0
    expected = grid_sinkhorn_divergence(probabilities / scale, target / scale, blur=1.5, reach=reach, scaling=0.5,
                                        tol=None, max_iter=0).value
    assert value.shape == (2, 3, *[1] * dims)
    torch.testing.assert_close(value.flatten(1), expected, rtol=1e-4, atol=1e-6)


def test_default_stop_is_close_to_the_converged_value_and_gradient():
    logits, labels = _pair(3)
    quick = SinkhornSegmentationLoss(softmax=True, to_onehot_y=True, include_background=False)
    converged = SinkhornSegmentationLoss(softmax=True, to_onehot_y=True, include_background=False, tol=1e-3)
    gradients = []
    for loss in (quick, converged):
        x = logits.clone().requires_grad_()
        value = loss(x, labels)
        value.backward()
        gradients.append((value.detach(), x.grad))
    assert float(gradients[0][0]) == pytest.approx(float(gradients[1][0]), rel=0.05)
    assert float(torch.nn.functional.cosine_similarity(gradients[0][1].flatten(), gradients[1][1].flatten(), 0)) > 0.99


def test_dice_sinkhorn_is_the_weighted_sum_of_its_terms():
    logits, labels = _pair(2)
    options = dict(softmax=True, to_onehot_y=True, include_background=False)
    combined = DiceSinkhornLoss(lambda_dice=0.7, lambda_sinkhorn=0.2, blur=1.5, **options)
    expected = 0.7 * DiceLoss(**options)(logits, labels) + 0.2 * SinkhornSegmentationLoss(blur=1.5, **options)(
        logits, labels)
    torch.testing.assert_close(combined(logits, labels), expected)


def test_boundary_kernel_loss_equals_geomed_called_directly():
    logits, labels = _pair(3)
    loss = BoundaryKernelLoss(softmax=True, to_onehot_y=True, reduction="none", blur=2.0, spacing=(0.8, 1.0, 1.2))
    target = torch.nn.functional.one_hot(labels[:, 0].long(), 3).movedim(-1, 1).float()
    expected = grid_boundary_distance(logits.softmax(1), target, blur=2.0, spacing=(0.8, 1.0, 1.2), normalized=True)
    torch.testing.assert_close(loss(logits, labels).flatten(1), expected)


# ------------------------------------------------------------------ reductions, batch, weights


@pytest.mark.parametrize("loss_class", [SinkhornSegmentationLoss, BoundaryKernelLoss])
@pytest.mark.parametrize("dims", [2, 3])
def test_reductions_batch_and_weights(loss_class, dims):
    logits, labels = _pair(dims, batch=3)
    options = dict(softmax=True, to_onehot_y=True)
    none = loss_class(reduction="none", **options)(logits, labels)
    assert none.shape == (3, 3, *[1] * dims)
    torch.testing.assert_close(loss_class(reduction="mean", **options)(logits, labels), none.mean())
    torch.testing.assert_close(loss_class(reduction="sum", **options)(logits, labels), none.sum())
    batched = loss_class(reduction="none", batch=True, **options)(logits, labels)
    assert batched.shape == (3, *[1] * dims)
    torch.testing.assert_close(batched.flatten(), none.flatten(1).mean(0))
    weighted = loss_class(reduction="none", weight=[0.0, 1.0, 2.0], **options)(logits, labels)
    torch.testing.assert_close(weighted.flatten(1), none.flatten(1) * torch.tensor([0.0, 1.0, 2.0]))
    background = loss_class(reduction="none", include_background=False, **options)(logits, labels)
    torch.testing.assert_close(background.flatten(1), none.flatten(1)[:, 1:])


# ------------------------------------------------------------------ spacing sources and wrappers


def test_spacing_from_each_source():
    target = _two_class((30, 30), (14, 14), 6)[None].repeat(2, 1, 1, 1)
    moved = torch.roll(target, shifts=(2, 0), dims=(2, 3))
    loss = SinkhornSegmentationLoss(include_background=False, reduction="none", **CONVERGED)
    unit = loss(moved, target).flatten()
    torch.testing.assert_close(unit, torch.full((2,), 2.0), rtol=2e-3, atol=0)
    affines = torch.stack([torch.diag(torch.tensor([0.5, 1.0, 1.0, 1.0])), torch.diag(torch.tensor([1.5, 2.0, 1.0, 1.0]))])
    meta_target = MetaTensor(target, affine=affines)
    per_item = loss(moved, meta_target).flatten()
    torch.testing.assert_close(per_item, torch.tensor([0.5**2, 1.5**2]) * 2.0, rtol=2e-3, atol=0)
    meta_input = MetaTensor(moved, affine=affines[1])
    torch.testing.assert_close(loss(meta_input, target).flatten(), torch.full((2,), 1.5**2 * 2.0), rtol=2e-3, atol=0)
    explicit = SinkhornSegmentationLoss(include_background=False, reduction="none", spacing=0.5, **CONVERGED)
    torch.testing.assert_close(explicit(moved, meta_target).flatten(), torch.full((2,), 0.5), rtol=2e-3, atol=0)


def test_deep_supervision_levels_get_the_spacing_of_their_resolution():
    """DeepSupervisionLoss interpolates the target to each level; with spatial_size the half-resolution level is
    solved with twice the spacing, as the same shapes on a grid of 2 mm voxels."""
    target = _two_class((32, 32), (15, 15), 7)[None]
    moved = torch.roll(target, shifts=(2, 2), dims=(2, 3))
    half = torch.nn.functional.interpolate(moved, size=(16, 16), mode="nearest-exact")
    options = dict(include_background=False, **CONVERGED)
    supervised = DeepSupervisionLoss(SinkhornSegmentationLoss(spatial_size=(32, 32), spacing=1.0, **options),
                                     weights=[1.0, 1.0])
    full = SinkhornSegmentationLoss(spacing=1.0, **options)(moved, target)
    coarse = SinkhornSegmentationLoss(spacing=2.0, **options)(
        half, torch.nn.functional.interpolate(target, size=(16, 16), mode="nearest-exact"))
    torch.testing.assert_close(supervised([moved, half], target), full + coarse)
    assert float(coarse) == pytest.approx(4.0, rel=0.05)


def test_masked_loss_wrapper_masks_both_inputs():
    logits, labels = _pair(2)
    probabilities = logits.softmax(1)
    target = torch.nn.functional.one_hot(labels[:, 0].long(), 3).movedim(-1, 1).float()
    mask = torch.ones(2, 1, 24, 20)
    mask[..., 18:] = 0
    loss = SinkhornSegmentationLoss(blur=1.5)
    masked = MaskedLoss(loss)(probabilities, target, mask)
    torch.testing.assert_close(masked, loss(probabilities * mask, target * mask))


def test_ignore_index_zeroes_the_ignored_voxels():
    logits, labels = _pair(2)
    labels[..., :3] = 9
    loss = SinkhornSegmentationLoss(softmax=True, to_onehot_y=True, ignore_index=9, blur=1.5)
    keep = (labels != 9).float()
    cleaned = torch.where(labels == 9, torch.zeros_like(labels), labels)
    target = torch.nn.functional.one_hot(cleaned[:, 0].long(), 3).movedim(-1, 1).float() * keep
    expected = SinkhornSegmentationLoss(blur=1.5)(logits.softmax(1) * keep, target)
    torch.testing.assert_close(loss(logits, labels), expected)


# ------------------------------------------------------------------ gradients, empty and full masks, precision


@pytest.mark.parametrize("loss", [SinkhornSegmentationLoss(softmax=True, to_onehot_y=True, reach=5.0),
                                  DiceSinkhornLoss(softmax=True, to_onehot_y=True),
                                  BoundaryKernelLoss(sigmoid=True, to_onehot_y=True)])
def test_gradients_flow_to_the_logits(loss):
    logits, labels = _pair(3)
    logits.requires_grad_()
    loss(logits, labels).backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) > 0


def test_converged_gradient_matches_finite_differences():
    """With converged potentials the envelope-theorem gradient is the gradient of the value."""
    logits, labels = _pair(2, batch=1)
    logits = logits[:, :, 4:16, 2:14].double().requires_grad_()
    labels = labels[:, :, 4:16, 2:14]
    loss = SinkhornSegmentationLoss(softmax=True, to_onehot_y=True, include_background=False, blur=2.0,
                                    tol=1e-10, max_iter=5000)
    loss(logits, labels).backward()
    direction = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    step = 1e-4
    with torch.no_grad():
        difference = (loss(logits + step * direction, labels) - loss(logits - step * direction, labels)) / (2 * step)
    assert float((logits.grad * direction).sum()) == pytest.approx(float(difference), rel=2e-3)


def test_empty_and_full_masks():
    target = _two_class((20, 20), (9, 9), 4)[None]
    empty_class = torch.cat([target, torch.zeros(1, 1, 20, 20)], 1)
    prediction = torch.roll(empty_class, 1, 2).clone()
    prediction[:, 2] = 0.2
    loss = SinkhornSegmentationLoss(reduction="none", blur=1.0)
    values = loss(prediction, empty_class).flatten()
    assert float(values[2]) == 0.0 and float(values[1]) > 0
    assert float(SinkhornSegmentationLoss(reduction="none", batch=True, blur=1.0)(
        prediction, empty_class).flatten()[2]) == 0.0
    full = torch.ones(1, 1, 12, 12)
    assert float(SinkhornSegmentationLoss(blur=1.0)(full, full)) == pytest.approx(0.0, abs=1e-5)
    assert float(BoundaryKernelLoss()(full, full)) == pytest.approx(0.0, abs=1e-6)
    boundary = BoundaryKernelLoss(reduction="none")(prediction, empty_class).flatten()
    assert float(boundary[2]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_gives_the_float32_value(dtype):
    logits, labels = _pair(2)
    loss = DiceSinkhornLoss(softmax=True, to_onehot_y=True, blur=1.5)
    reference = loss(logits, labels)
    network = torch.nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        network.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
        network.bias.zero_()
    with torch.autocast("cpu", dtype=dtype):
        output = network(logits)
        value = loss(output, labels)
    assert output.dtype == dtype
    assert torch.isfinite(value) and float(value.detach()) == pytest.approx(float(reference), rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loss_class", [SinkhornSegmentationLoss, DiceSinkhornLoss, BoundaryKernelLoss])
def test_cuda_gives_the_cpu_value_and_gradient(loss_class):
    """On a GPU (float64 block products of the grid softmin, boundary kernels): the CPU's value and gradient on 3-D,
    anisotropic inputs, and a finite value close to it under bf16 autocast."""
    logits, labels = _pair(3)
    loss = loss_class(softmax=True, to_onehot_y=True, spacing=(1.0, 1.2, 0.8))
    results = []
    for device in ("cpu", "cuda"):
        inputs = logits.detach().to(device).requires_grad_()
        value = loss(inputs, labels.to(device))
        value.backward()
        results.append((value.detach().cpu(), inputs.grad.cpu()))
    (cpu_value, cpu_gradient), (cuda_value, cuda_gradient) = results
    torch.testing.assert_close(cuda_value, cpu_value, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(cuda_gradient, cpu_gradient, rtol=1e-3, atol=1e-5 * float(cpu_gradient.abs().max()))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = loss(logits.cuda().to(torch.bfloat16), labels.cuda())
    assert torch.isfinite(value) and float(value) == pytest.approx(float(cpu_value), rel=0.05)


# ------------------------------------------------------------------ MONAI's checks and warnings


@pytest.mark.parametrize("loss_class", [SinkhornSegmentationLoss, DiceSinkhornLoss, BoundaryKernelLoss])
@pytest.mark.parametrize("kwargs, error", [
    (dict(sigmoid=True, softmax=True), ValueError),
    (dict(other_act="tanh"), TypeError),
    (dict(reduction="unknown"), ValueError),
    (dict(blur=-1.0), ValueError),
    (dict(weight=[-1.0, 1.0, 1.0]), ValueError),
    (dict(spacing=(1.0, 0.0)), ValueError),
])
def test_ill_options_are_refused(loss_class, kwargs, error):
    with pytest.raises(error):
        loss_class(**kwargs)


@pytest.mark.parametrize("loss_class", [SinkhornSegmentationLoss, DiceSinkhornLoss, BoundaryKernelLoss])
def test_ill_shapes_are_refused(loss_class):
    logits, labels = _pair(2)
    one_hot = torch.nn.functional.one_hot(labels[:, 0].long(), 3).movedim(-1, 1).float()
    with pytest.raises((AssertionError, ValueError)):
        loss_class()(logits, one_hot[:, :2])
    with pytest.raises((AssertionError, ValueError)):
        loss_class()(logits, one_hot[:, :, :10])
    with pytest.raises((AssertionError, ValueError)):
        loss_class()(logits[0], one_hot[0])
    with pytest.raises(ValueError, match="weight"):
        loss_class(softmax=True, weight=[1.0, 2.0])(logits, one_hot)


@pytest.mark.parametrize("flag", ["softmax", "to_onehot_y", "include_background"])
def test_single_channel_warnings(flag):
    target = _disk((16, 16), (7, 7), 4)[None, None]
    options = {flag: not (flag == "include_background")}
    with pytest.warns(UserWarning, match="single channel prediction"):
        SinkhornSegmentationLoss(blur=1.0, **options)(torch.roll(target, 1, 2), target)
