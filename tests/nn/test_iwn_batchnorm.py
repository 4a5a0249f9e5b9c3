"""Class-balanced BatchNorm: InstanceWeightedNorm1d / 2d, their fused twins,
fused_iwn(feature_dim=1), convert_to_iwn and iwn_labels."""

import copy
import inspect
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgellm_kernels import (
    FusedInstanceWeightedNorm1d,
    FusedInstanceWeightedNorm2d,
    InstanceWeightedNorm1d,
    InstanceWeightedNorm2d,
    convert_to_iwn,
    fused_iwn,
    iwn_labels,
    patch_model,
)

from _helpers import assert_close, cpu_backends, device_backends


def truth(x, labels, weight, bias, eps, std_mode="class_mean"):
    """Eq.10-11 with one sample = one instance, in float64 from the
    definition: per channel, each class's mean and population deviation over
    every position of its samples; classes present weigh equally."""
    x = x.double()
    C = x.shape[1]
    per_channel = x.transpose(0, 1).reshape(C, x.shape[0], -1)  # (C, N, positions)
    means, stds = [], []
    for c in labels.unique():
        values = per_channel[:, labels == c].reshape(C, -1)
        means.append(values.mean(1))
        stds.append(values.std(1, correction=0))
    means, stds = torch.stack(means), torch.stack(stds)
    mu = means.mean(0)
    if std_mode == "class_mean":
        sigma = stds.mean(0)
    else:
        sigma = (stds**2 + (means - mu) ** 2).mean(0).sqrt()
    shape = (1, C) + (1,) * (x.dim() - 2)
    y = (x - mu.view(shape)) / (sigma.view(shape) + eps)
    return y * weight.double().view(shape) + bias.double().view(shape), mu, sigma


LAYOUTS = [  # (shape, channels_last)
    ((6, 3), False),
    ((7, 1, 5), False),
    ((5, 7, 9), False),
    ((6, 3, 7, 7), False),
    ((6, 3, 7, 7), True),
    ((4, 7, 1, 1), False),
    ((4, 7, 1, 1), True),
    ((9, 1, 3, 5), True),
    ((5, 3, 13, 11), False),  # planes of 143: groups of four vectors, then a tail
    ((1, 3, 4, 5), True),  # one sample: its positions' keys, one per position
    ((1, 3, 4, 5), False),
]


def make(shape, channels_last, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul(2).add(0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(shape[0]) % 3
    labels = labels[torch.randperm(shape[0], generator=g)]
    return x, labels


def layer_class(dim, fused):
    if dim == 4:
        return FusedInstanceWeightedNorm2d if fused else InstanceWeightedNorm2d
    return FusedInstanceWeightedNorm1d if fused else InstanceWeightedNorm1d


def runnable(backend, channels_last, shape):
    # the Triton kernels read features-innermost rows: channels-first planes
    # run on the C++ CPU kernels (on a GPU the op hands Triton rows)
    positions = torch.Size(shape[2:]).numel()
    return backend != "triton" or positions == 1 or (channels_last and shape[1] > 1)


@pytest.mark.parametrize("std_mode", ["class_mean", "pooled"])
@pytest.mark.parametrize("shape,channels_last", LAYOUTS)
@pytest.mark.parametrize("backend", cpu_backends())
def test_fused_layer_matches_the_definition_and_the_reference(
    backend, shape, channels_last, std_mode, force_backend
):
    if not runnable(backend, channels_last, shape):
        pytest.skip("Triton reads rows; channels-first planes run on the C++ CPU kernels")
    force_backend(backend)
    x, labels = make(shape, channels_last)
    C = shape[1]
    layers = [layer_class(len(shape), fused)(C, 3, std_mode=std_mode).double() for fused in (0, 1)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, C))
            layer.bias.copy_(torch.linspace(-1, 1, C))
    inputs = [x.clone().requires_grad_() for _ in layers]
    outs = [layer(xi, labels) for layer, xi in zip(layers, inputs)]
    expected, mu, sigma = truth(x, labels, layers[0].weight, layers[0].bias, 1e-5, std_mode)
    for out in outs:
        assert_close(out, expected)
    # the output keeps x's memory format, as BatchNorm's does (the reference
    # layers gave a contiguous x's output in channels_last order)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for out in outs:
        assert out.is_contiguous(memory_format=fmt)
    grad = torch.randn_like(expected)
    for out in outs:
        out.backward(grad)
    assert_close(inputs[1].grad, inputs[0].grad)
    for name in ("weight", "bias"):
        assert_close(getattr(layers[1], name).grad, getattr(layers[0], name).grad)
    for layer in layers:  # the running statistics moved by momentum 0.1 from 0 and 1
        assert_close(layer.running_mean, 0.1 * mu)
        assert_close(layer.running_std, 0.9 + 0.1 * sigma)
        assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", cpu_backends())
def test_gradcheck_float64(backend, channels_last, force_backend):
    if not runnable(backend, channels_last, (4, 3, 3, 3)):
        pytest.skip("Triton reads rows; channels-first planes run on the C++ CPU kernels")
    force_backend(backend)
    x, labels = make((5, 3, 3, 3), channels_last)
    w = torch.linspace(0.5, 1.5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.linspace(-1, 1, 3, dtype=torch.float64, requires_grad=True)
    x.requires_grad_()
    for training in (True, False):
        stats = dict(running_mean=torch.randn(3).double(), running_std=torch.rand(3).double() + 1)
        mode = dict(labels=labels, training=True, num_classes=3) if training else dict(**stats)

        def f(x, w, b, mode=mode):
            return fused_iwn(x, weight=w, bias=b, feature_dim=1, **mode)

        assert torch.autograd.gradcheck(f, (x, w, b))


def test_one_class_equals_batch_norm():
    # one class, eps = 0: sigma is the batch's population deviation, as
    # F.batch_norm's sqrt(var + eps) with an eps below float64's resolution
    for shape, channels_last in LAYOUTS:
        x, _ = make(shape, channels_last)
        layer = FusedInstanceWeightedNorm2d if x.dim() == 4 else FusedInstanceWeightedNorm1d
        iwn = layer(shape[1], 1, eps=0.0).double()
        bn = (nn.BatchNorm2d if x.dim() == 4 else nn.BatchNorm1d)(shape[1], eps=1e-300).double()
        assert_close(iwn(x, torch.zeros(shape[0], dtype=torch.long)), bn(x))
        iwn.eval()
        bn.eval()
        with torch.no_grad():
            bn.running_var.copy_(iwn.running_std.square())
        assert_close(iwn(x), F.batch_norm(x, iwn.running_mean, bn.running_var, eps=1e-300))


# planes of 36 values, and of 143: groups of four vectors then a tail (the
# planes' sums keep four accumulators)
@pytest.mark.parametrize("spatial", [(6, 6), (13, 11)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lower_precision(dtype, channels_last, spatial):
    x, labels = make((8, 5) + spatial, channels_last, dtype)
    layer = FusedInstanceWeightedNorm2d(5, 3).to(dtype)
    xg = x.clone().requires_grad_()
    y = layer(xg, labels)
    assert y.dtype == dtype
    expected, _, _ = truth(x, labels, layer.weight, layer.bias, 1e-5)
    assert_close(y, expected, scale=2)
    y.float().square().sum().backward()
    x64 = x.double().requires_grad_()
    ref = InstanceWeightedNorm2d(5, 3).double()
    ref(x64, labels).square().sum().backward()
    assert_close(xg.grad, x64.grad, dtype=dtype, scale=4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_deterministic_across_thread_counts(channels_last):
    # channels_last: rows of positions whose labels come in runs (each
    # sample's 143), the CPU moments' one pass, over 32 row chunks
    from _helpers import assert_same_bits_across_threads

    x, labels = make((33, 7, 13, 11), channels_last, torch.float32)

    def run():
        xg = x.clone().requires_grad_()
        y = fused_iwn(xg, labels, training=True, num_classes=3, feature_dim=1)
        y.backward(torch.ones_like(y))
        return y, xg.grad

    assert_same_bits_across_threads(run)


def test_many_samples_reduce_their_channels_a_block_at_a_time():
    # 6000 samples: each CPU thread reduces its channels a few at a time
    # (the per-sample statistics of a block stay within L2), and a block's
    # samples are read sample by sample across its channels
    from _helpers import assert_same_bits_across_threads

    x, labels = make((6000, 7, 2), False, torch.float32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def run():
        xg = x.clone().requires_grad_()
        y = fused_iwn(xg, labels, training=True, num_classes=3, feature_dim=1)
        y.backward(dy)
        return y, xg.grad

    y, dx = run()
    expected, _, _ = truth(x, labels, torch.ones(7), torch.zeros(7), 1e-5)
    assert_close(y, expected, dtype=torch.float32, scale=4)
    x64 = x.double().requires_grad_()
    InstanceWeightedNorm1d(7, 3).double()(x64, labels).backward(dy.double())
    assert_close(dx, x64.grad, dtype=torch.float32, scale=4)
    assert_same_bits_across_threads(run)


def test_eval_uses_running_statistics_and_labels_are_not_needed():
    x, labels = make((6, 3, 4, 4), False)
    layer = FusedInstanceWeightedNorm2d(3, 3).double()
    layer(x, labels)
    layer.eval()
    y = layer(x)  # no labels in eval, as BatchNorm
    shape = (1, 3, 1, 1)
    expected = (x - layer.running_mean.view(shape)) / (layer.running_std.view(shape) + 1e-5)
    assert_close(y, expected)


def test_momentum_none_is_a_cumulative_average():
    x, labels = make((6, 3, 4, 4), False)
    layer = FusedInstanceWeightedNorm2d(3, 3, momentum=None).double()
    mus = []
    for seed in range(3):
        xs, _ = make((6, 3, 4, 4), False, seed=seed)
        layer(xs, labels)
        mus.append(truth(xs, labels, torch.ones(3), torch.zeros(3), 1e-5)[1])
    assert_close(layer.running_mean, torch.stack(mus).mean(0))


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_without_running_statistics_eval_uses_the_batch(fused):
    x, labels = make((6, 3, 4, 4), False)
    cls = FusedInstanceWeightedNorm2d if fused else InstanceWeightedNorm2d
    layer = cls(3, 3, track_running_stats=False).double().eval()
    assert layer.running_mean is None
    assert_close(layer(x, labels), truth(x, labels, layer.weight, layer.bias, 1e-5)[0])
    # The message names the layer's state, not "training": the layer is in eval.
    with pytest.raises(ValueError, match=r"required in eval too.*track_running_stats=False"):
        layer(x)


def test_tasks_pick_their_running_statistics():
    x, labels = make((8, 3, 2, 2), False)
    tasks = torch.tensor([0, 1] * 4)
    layer = FusedInstanceWeightedNorm2d(3, 3, num_tasks=2).double()
    layer(x, labels, task_ids=tasks)
    assert layer.running_mean.shape == (2, 3)
    for t in (0, 1):
        mu = truth(x[tasks == t], labels[tasks == t], torch.ones(3), torch.zeros(3), 1e-5)[1]
        assert_close(layer.running_mean[t], 0.1 * mu)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m, x, y: m(x, y.view(6, 1, 1).expand(6, 4, 4)), ValueError, r"labels must have"),
        (lambda m, x, y: m(x[:, :2], y), ValueError, r"num_features=3 channels"),
        (lambda m, x, y: m(x[:, :, 0], y), ValueError, r"must be 4-D"),
        (lambda m, x, y: m(x, y + 5), ValueError, r"labels must lie in \[0, 3\)"),
        (lambda m, x, y: m(x), ValueError, r"labels are required"),
        (lambda m, x, y: m(x, y.float()), TypeError, r"labels must be an int64"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(call, error, match):
    x, labels = make((6, 3, 4, 4), False)
    layer = FusedInstanceWeightedNorm2d(3, 3).double()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=match):
        call(layer, x, labels)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_feature_dim_errors():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match=r"feature_dim must lie in \[-3, 3\)"):
        fused_iwn(x, torch.zeros(4, dtype=torch.long), training=True, feature_dim=3)
    with pytest.raises(ValueError, match="a gate needs the features in the last dimension"):
        fused_iwn(
            x, torch.zeros(4, dtype=torch.long), gate=torch.zeros(3), training=True, feature_dim=1
        )


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),
        nn.Linear(16, 3),
    )


def test_convert_to_iwn_carries_everything_over_and_reverts():
    model = small_cnn()
    images, labels = torch.randn(12, 3, 6, 6), torch.arange(12) % 3
    model(images).sum().backward()  # running statistics away from 0 and 1
    bn = model[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    report = convert_to_iwn(model, num_classes=3)
    assert [type(model[i]).__name__ for i in (1, 6)] == [
        "FusedInstanceWeightedNorm2d",
        "FusedInstanceWeightedNorm1d",
    ]
    layer = model[1]
    assert layer.weight is bn.weight and layer.bias is bn.bias
    assert_close(layer.running_mean, bn.running_mean)
    assert_close(layer.running_std, bn.running_var.sqrt())
    assert "2 swapped" in str(report)
    with iwn_labels(model, labels):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()  # the optimizer built before converting steps the shared parameters
    with pytest.raises(ValueError, match="labels are required"):
        model(images)  # outside iwn_labels, training needs labels
    report.revert()
    assert model[1] is bn
    assert_close(bn.running_var, layer.running_std.square())
    assert int(bn.num_batches_tracked) == int(layer.num_batches_tracked)


def test_convert_to_iwn_keeps_the_batchnorms_hooks():
    model = small_cnn()
    seen = []
    model[1].register_forward_pre_hook(lambda m, args: seen.append("pre"))
    handle = model[1].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    images, labels = torch.randn(12, 3, 6, 6), torch.arange(12) % 3
    report = convert_to_iwn(model, num_classes=3)
    with iwn_labels(model, labels):
        model(images)
    assert seen == ["pre", (12, 8, 6, 6)]
    handle.remove()  # removed through the BatchNorm's handle: gone from the layer too
    with iwn_labels(model, labels):
        model(images)
    assert seen == ["pre", (12, 8, 6, 6), "pre"]
    model[1].register_full_backward_hook(lambda m, gin, gout: seen.append("backward"))
    report.revert()
    model(images).sum().backward()
    assert seen[3:] == ["pre", "backward"]  # the full backward hook, on the BatchNorm now


def test_convert_to_iwn_a_batchnorm_without_running_buffers():
    # BatchNorm's buffers set to None: batch statistics in eval too, as
    # track_running_stats=False gives
    bn = nn.BatchNorm1d(3)
    bn.running_mean = bn.running_var = None
    model = nn.Sequential(bn)
    report = convert_to_iwn(model, num_classes=2)
    assert model[0].running_mean is None and model[0].track_running_stats == bn.track_running_stats
    x, labels = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    assert_close(model.eval()[0](x, labels), truth(x, labels, bn.weight, bn.bias, bn.eps)[0])
    report.revert()
    assert model[0] is bn and bn.running_mean is None and bn.running_var is None


def test_convert_to_iwn_skips_what_it_cannot_carry_over_saying_why():
    """A BatchNorm under (old-style) spectral_norm raised torch's "cannot
    assign ... as parameter 'weight'"; a parametrized one or a subclass was
    "not BatchNorm1d / BatchNorm2d"."""
    from torch.nn.utils import parametrize

    class Halved(nn.Module):
        def forward(self, w):
            return w / 2

    class MyBatchNorm(nn.BatchNorm2d):
        pass

    normed = nn.utils.spectral_norm(nn.BatchNorm1d(4))
    parametrized = nn.BatchNorm1d(4)
    parametrize.register_parametrization(parametrized, "weight", Halved())
    model = nn.Sequential(
        normed,
        parametrized,
        MyBatchNorm(4),
        nn.SyncBatchNorm(4),
        nn.LazyBatchNorm2d(),
        nn.BatchNorm2d(4, momentum=1.5),  # BatchNorm runs with it; the IWN layers refuse it
        nn.LazyInstanceNorm2d(),  # no BatchNorm: not listed
        nn.LazyLinear(3),
    )
    report = convert_to_iwn(model, num_classes=2)
    assert not report.swaps and [m.__class__ for m in model] == [
        nn.BatchNorm1d,
        type(parametrized),
        MyBatchNorm,
        nn.SyncBatchNorm,
        nn.LazyBatchNorm2d,
        nn.BatchNorm2d,
        nn.LazyInstanceNorm2d,
        nn.LazyLinear,
    ]
    assert [k.reason for k in report.skipped] == [
        "its weight computed by a hook (weight_norm, spectral_norm): no Parameter to carry over",
        "a parametrized BatchNorm1d (torch.nn.utils.parametrize)",
        "subclass of BatchNorm2d (swapping it would lose its class)",
        "not BatchNorm1d / BatchNorm2d",
        "uninitialized lazy module: run one forward first (it then becomes a "
        "BatchNorm1d / BatchNorm2d)",
        "momentum=1.5 outside [0, 1], which the IWN layers refuse",
    ]


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_one_value_per_channel_is_refused_as_batchnorm_refuses_it(fused):
    # Its one value is its class's mean: every output would be the bias.
    cls = FusedInstanceWeightedNorm1d if fused else InstanceWeightedNorm1d
    layer = cls(3, 2).double()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x, label = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3)(x)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 3\)"):
        layer(x, label)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k  # num_batches_tracked not counted
    untracked = cls(3, 2, track_running_stats=False).double().eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        untracked(x, label)  # eval with the batch's statistics too
    assert layer.eval()(x).shape == (1, 3)  # eval with running statistics: fine
    assert layer.train()(torch.randn(1, 3, 2, dtype=torch.float64), label).shape == (1, 3, 2)


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (2, 3, 0, 5)])
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_an_empty_batch_gives_an_empty_output_as_batchnorm(fused, shape):
    """BatchNorm takes a batch of no values in training (a detector's empty
    crop batch): an empty output, zero gradients for weight and bias, no
    change to the running statistics (the batch is counted). So do these
    layers, and fused_iwn, as F.batch_norm does (it raised "x is empty")."""
    two_d = len(shape) == 4
    if two_d:
        cls = FusedInstanceWeightedNorm2d if fused else InstanceWeightedNorm2d
    else:
        cls = FusedInstanceWeightedNorm1d if fused else InstanceWeightedNorm1d
    layer = cls(3, 2)
    with torch.no_grad():
        layer.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(shape, requires_grad=True)
    batchnorm = (nn.BatchNorm2d if two_d else nn.BatchNorm1d)(3)
    assert batchnorm(x).shape == shape
    y = layer(x, torch.zeros(shape[0], dtype=torch.long))
    assert y.shape == shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(layer.weight.grad, torch.zeros(3))
    assert torch.equal(layer.bias.grad, torch.zeros(3))
    before["num_batches_tracked"] += 1  # as BatchNorm counts it
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    untracked = cls(3, 2, track_running_stats=False).eval()
    assert untracked(x, torch.zeros(shape[0], dtype=torch.long)).shape == shape
    with pytest.raises(ValueError, match="labels must have shape"):
        layer(x, torch.zeros(shape[0] + 1, dtype=torch.long))  # still checked


@pytest.mark.skipif(
    "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters,
    reason="this torch's BatchNorm takes no bias= (torch 2.11 does not)",
)
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_bias_false_as_batchnorm(fused):
    cls = FusedInstanceWeightedNorm2d if fused else InstanceWeightedNorm2d
    layer = cls(3, 3, bias=False).double()
    assert layer.bias is None and layer.weight is not None
    assert "affine=True, bias=False" in repr(layer)
    layer.reset_parameters()
    assert set(layer.state_dict()) == set(nn.BatchNorm2d(3, bias=False).state_dict()) - {
        "running_var"
    } | {"running_std"}
    x, labels = make((6, 3, 4, 4), False)
    expected = truth(x, labels, layer.weight, torch.zeros(3), 1e-5)[0]
    assert_close(layer(x, labels), expected)
    model = nn.Sequential(nn.BatchNorm2d(3, bias=False))
    report = convert_to_iwn(model, num_classes=3, fused=fused)
    assert model[0].bias is None
    model[0].reset_parameters()
    assert_close(model[0].double()(x, labels), expected)
    report.revert()
    assert type(model[0]) is nn.BatchNorm2d and model[0].bias is None


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_track_running_stats_is_read_at_each_call_as_batchnorm_reads_it(fused):
    # Set False after construction: training leaves the buffers alone, eval
    # uses them (BatchNorm's behaviour), and a conversion keeps them.
    x, labels = make((6, 3, 4, 4), False)
    cls = FusedInstanceWeightedNorm2d if fused else InstanceWeightedNorm2d
    layer = cls(3, 3).double()
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        for m in (layer, bn):
            m.running_mean.fill_(5.0)
            m.track_running_stats = False
    assert_close(layer(x, labels), truth(x, labels, layer.weight, layer.bias, 1e-5)[0])
    bn(x)
    for m in (layer, bn):
        assert torch.all(m.running_mean == 5.0) and int(m.num_batches_tracked) == 0
    assert_close(layer.eval()(x), (x - 5.0) / (layer.running_std.view(1, 3, 1, 1) + 1e-5))
    model = nn.Sequential(bn)
    convert_to_iwn(model, num_classes=3, fused=fused)
    converted = model[0]
    assert not converted.track_running_stats and torch.all(converted.running_mean == 5.0)
    # eval with the carried-over buffers (running_var 1: running_std 1)
    assert_close(converted.eval()(x), (x - 5.0) / (1.0 + 1e-5))


def test_loads_a_batchnorm_state_dict():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 9.0, 16.0]))
        bn.num_batches_tracked.fill_(7)
        bn.weight.fill_(2.0)
    state = bn.state_dict()
    layer = FusedInstanceWeightedNorm2d(3, 2)
    layer.load_state_dict(state)  # strict
    assert torch.equal(layer.running_std, torch.tensor([2.0, 3.0, 4.0]))
    assert torch.equal(layer.running_mean, bn.running_mean) and int(layer.num_batches_tracked) == 7
    assert torch.equal(layer.weight.detach(), bn.weight.detach())
    assert set(state) >= {"running_var"}  # the caller's dict is left as it was
    # A bfloat16 checkpoint into a float32 layer: the root in float32, of the
    # values BatchNorm would load (not rounded to bfloat16 a second time).
    var = torch.tensor([2.0, 3.0, 5.0, 7.0]).bfloat16()
    half = nn.BatchNorm1d(4).bfloat16()
    half.running_var.copy_(var)
    wide = InstanceWeightedNorm1d(4, 2)
    wide.load_state_dict(half.state_dict())
    assert torch.equal(wide.running_std, var.float().sqrt())
    # A checkpoint from before BatchNorm counted batches (version 1): the
    # layer's count stays, as a BatchNorm's does; from version 2 it is missing.
    old = {k: v for k, v in state.items() if k != "num_batches_tracked"}
    old = type(state)(old)
    old._metadata = {"": {"version": 1}}
    layer.load_state_dict(old)
    bn.load_state_dict(old)
    assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 7
    old._metadata = {"": {"version": 2}}
    for module in (layer, nn.BatchNorm2d(3)):
        with pytest.raises(RuntimeError, match="Missing key.*num_batches_tracked"):
            module.load_state_dict(old)
    # A layer without running statistics names BatchNorm's key as unexpected.
    untracked = FusedInstanceWeightedNorm2d(3, 2, track_running_stats=False)
    with pytest.raises(RuntimeError, match="Unexpected key.*running_var"):
        untracked.load_state_dict(state)


def test_nested_iwn_labels_the_innermost_block_wins():
    layer = FusedInstanceWeightedNorm1d(3, 2, affine=False).double()
    model, x = nn.Sequential(layer), torch.randn(6, 3, dtype=torch.float64)
    outer, inner = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 0, 1])
    with iwn_labels(model, outer):
        with iwn_labels(model, inner):
            y = model(x)
        y_outer = model(x)  # the inner block has ended
    assert_close(y, truth(x, inner, torch.ones(3), torch.zeros(3), 1e-5)[0])
    assert_close(y_outer, truth(x, outer, torch.ones(3), torch.zeros(3), 1e-5)[0])


def test_nested_iwn_labels_give_labels_and_task_ids_together():
    layer = FusedInstanceWeightedNorm1d(3, 2, num_tasks=2, affine=False).double()
    model, x = nn.Sequential(layer), torch.randn(6, 3, dtype=torch.float64)
    labels, task_ids = torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([0, 0, 0, 1, 1, 1])
    with iwn_labels(model, labels.flip(0), task_ids.flip(0)):
        # the inner block's labels come without task ids: the outer block's
        # must not be paired with them
        with iwn_labels(model, labels):
            with pytest.raises(ValueError, match="task_ids .* are required"):
                model(x)
        with iwn_labels(model, labels, task_ids):
            y = model(x)
        # a call with its own labels takes the innermost block's task ids
        y_own = model[0](x, labels)
    assert not layer._forward_pre_hooks  # removed on leaving the last block
    reference = InstanceWeightedNorm1d(3, 2, num_tasks=2, affine=False).double()
    assert_close(y, reference(x, labels, task_ids))
    assert_close(y_own, reference(x, labels, task_ids.flip(0)))


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_taken_inside_iwn_labels_keeps_no_labels(how):
    """A copy taken in the block (an EMA model, a checkpoint) carried the
    block's labels for good: called in training without labels, it used that
    old batch's labels, silently."""
    model = small_cnn()
    convert_to_iwn(model, num_classes=3)
    images, labels = torch.randn(12, 3, 6, 6), torch.arange(12) % 3
    with iwn_labels(model, labels):
        if how == "deepcopy":
            copied = copy.deepcopy(model)
        else:
            buffer = io.BytesIO()
            torch.save(model, buffer)
            buffer.seek(0)
            copied = torch.load(buffer, weights_only=False)
    with pytest.raises(ValueError, match="labels are required in training"):
        copied(images)
    with iwn_labels(copied, labels.flip(0)), iwn_labels(model, labels.flip(0)):
        assert_close(copied(images), model(images))  # its own blocks work


def test_layers_swapped_inside_iwn_labels_get_its_labels():
    """patch_model (or convert_sync_iwn) inside a block: the swapped-in layer
    shares the block, as it shares the layer's hooks."""
    from surgellm_kernels import convert_sync_iwn

    model = small_cnn()
    convert_to_iwn(model, num_classes=3, fused=False)
    images, labels = torch.randn(12, 3, 6, 6), torch.arange(12) % 3
    expected = model[1](model[0](images), labels)
    with iwn_labels(model, labels):
        patch_model(model)
        assert_close(model[1](model[0](images)), expected)
        convert_sync_iwn(model)
        assert_close(model[1](model[0](images)), expected)
    assert not model[1]._forward_pre_hooks  # removed on leaving
    with pytest.raises(ValueError, match="labels are required in training"):
        model(images)


def test_iwn_labels_is_the_explicit_call():
    model = small_cnn()
    convert_to_iwn(model, num_classes=3, fused=False)
    images, labels = torch.randn(12, 3, 6, 6), torch.arange(12) % 3
    explicit = model[1](model[0](images), labels)
    with iwn_labels(model, labels):
        hooked = model[1](model[0](images))
    assert_close(hooked, explicit)
    assert not model[1]._forward_pre_hooks  # removed on leaving


def test_patch_model_swaps_the_reference_layers():
    model = small_cnn()
    convert_to_iwn(model, num_classes=3, fused=False)
    assert type(model[1]) is InstanceWeightedNorm2d
    report = patch_model(model)
    assert type(model[1]) is FusedInstanceWeightedNorm2d and "2 swapped" in str(report)


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_input_neither_layout(backend, force_backend):
    # a slice is neither contiguous nor channels_last: read from a copy
    force_backend(backend)
    x, labels = make((6, 3, 8, 9), False)
    x = x[:, :, ::2, 1:]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    if backend == "triton":
        with pytest.raises(NotImplementedError, match="channels_last"):
            fused_iwn(x, labels, training=True, num_classes=3, feature_dim=1)
        return
    xg = x.detach().requires_grad_()
    assert not xg.is_contiguous()
    y = fused_iwn(xg, labels, training=True, num_classes=3, feature_dim=1)
    assert_close(y, truth(x, labels, torch.ones(3), torch.zeros(3), 1e-5)[0])
    y.backward(torch.ones_like(y))
    x64 = x.detach().clone().requires_grad_()
    InstanceWeightedNorm2d(3, 3, affine=False).double()(x64, labels).backward(torch.ones_like(y))
    assert_close(xg.grad, x64.grad)


def test_triton_planes_error_advice_runs(force_backend):
    # 3-D x has no channels_last format: the advice the error gives for it must work
    if "triton" not in cpu_backends():
        pytest.skip("the Triton interpreter is not available")
    force_backend("triton")
    x, labels = make((6, 3, 10), False)
    with pytest.raises(NotImplementedError) as raised:
        fused_iwn(x, labels, training=True, num_classes=3, feature_dim=1)
    assert "x.movedim(1, -1).contiguous().movedim(-1, 1)" in str(raised.value)
    y = fused_iwn(
        x.movedim(1, -1).contiguous().movedim(-1, 1),
        labels,
        training=True,
        num_classes=3,
        feature_dim=1,
    )
    assert_close(y, truth(x, labels, torch.ones(3), torch.zeros(3), 1e-5)[0])


@pytest.mark.parametrize("channels_last", [False, True])
def test_compile_fullgraph_both_layouts(channels_last):
    torch._dynamo.reset()
    x, labels = make((6, 3, 4, 4), channels_last, torch.float32)
    eager_layer, compiled_layer = (
        FusedInstanceWeightedNorm2d(3, 3),
        FusedInstanceWeightedNorm2d(3, 3),
    )
    compiled = torch.compile(compiled_layer, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager_layer(xe, labels), compiled(xc, labels)
    assert_close(yc, ye)
    ye.square().sum().backward()
    yc.square().sum().backward()
    assert_close(xc.grad, xe.grad)
    assert_close(compiled_layer.running_std, eager_layer.running_std)


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_compiled_call_that_fails_counts_no_batch(momentum):
    """Inductor scheduled the count's add before the op, whose checks raise
    inside it: num_batches_tracked grew with every failed call (with
    momentum=None, a cumulative average, the next running statistics were
    off too)."""
    torch._dynamo.reset()
    layer = FusedInstanceWeightedNorm1d(5, 3, momentum=momentum)
    compiled = torch.compile(layer)
    x = torch.randn(8, 5)
    compiled(x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    for _ in range(2):
        with pytest.raises(ValueError, match="labels must"):
            compiled(x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 7]))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_cumulative_momentum_under_fullgraph_says_why(fused):
    # The momentum comes from num_batches_tracked, a value the graph cannot
    # hold: the op's schema error ("found type 'SymFloat'") said nothing of that.
    torch._dynamo.reset()
    layer = layer_class(2, fused)(4, 3, momentum=None)
    with pytest.raises(Exception, match="Message: momentum=None: the cumulative average's"):
        torch.compile(layer, fullgraph=True, backend="aot_eager")(
            torch.randn(6, 4), torch.arange(6) % 3
        )


GPU_PAIRS = [(b, d) for b, d in device_backends() if d == "cuda"]


@pytest.mark.skipif(not GPU_PAIRS, reason="no CUDA backend here")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("samples", [6, 1])  # one sample: its positions' keys
@pytest.mark.parametrize("backend", [b for b, _ in GPU_PAIRS])
def test_on_the_gpu(backend, samples, channels_last, dtype, force_backend):
    # channels_last is read in place; channels-first is copied to that order
    # (a warning) and comes back in its own memory format
    force_backend(backend)
    x, labels = make((samples, 5, 7, 9), channels_last, dtype)
    layer = FusedInstanceWeightedNorm2d(5, 3).to("cuda", dtype)
    xg = x.cuda().requires_grad_()
    y = layer(xg, labels.cuda())
    assert y.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    expected, mu, _ = truth(x, labels, torch.ones(5), torch.zeros(5), 1e-5)
    scale = 1 if dtype == torch.float64 else 4
    assert_close(y.cpu(), expected, dtype=dtype, scale=scale)
    assert_close(layer.running_mean.cpu(), 0.1 * mu, dtype=dtype, scale=scale)
    y.float().square().sum().backward()
    x64 = x.double().requires_grad_()
    InstanceWeightedNorm2d(5, 3).double()(x64, labels).square().sum().backward()
    assert_close(xg.grad.cpu(), x64.grad, dtype=dtype, scale=4 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convert_to_iwn_then_revert_with_no_training_gives_the_batchnorm_back_exactly(dtype):
    """sqrt then square rounded running_var (bfloat16: up to 8e-3 relative,
    the eval output changed with it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64)).to(dtype)
    images = torch.randn(8, 3, 8, 8, dtype=dtype)
    model(images)  # running statistics away from 0 and 1
    bn = model[1]
    buffers = [bn.running_mean, bn.running_var, bn.num_batches_tracked]
    values = [b.clone() for b in buffers]
    before = model.eval()(images)
    convert_to_iwn(model, num_classes=3).revert()
    assert model[1] is bn
    now = [bn.running_mean, bn.running_var, bn.num_batches_tracked]
    assert all(a is b and torch.equal(a, v) for a, b, v in zip(now, buffers, values))
    assert torch.equal(model(images), before)


def test_convert_to_iwn_and_revert_on_the_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    bn = model[1]
    convert_to_iwn(model, num_classes=3).revert()
    assert model[1] is bn and bn.running_var.is_meta


def test_a_transposed_batch_gives_a_contiguous_output_from_every_layer():
    """The reference gave (N, C) of a transposed batch in its strides (1, N),
    where BatchNorm1d and the fused layer give a contiguous output."""
    x, labels = torch.randn(5, 6).t(), torch.tensor([0, 1, 0, 1, 0, 1])
    layers = [
        nn.BatchNorm1d(5),
        InstanceWeightedNorm1d(5, 2),
        FusedInstanceWeightedNorm1d(5, 2),
    ]
    outs = [layers[0](x)] + [layer(x, labels) for layer in layers[1:]]
    assert all(out.is_contiguous() for out in outs)
    assert_close(outs[1], outs[2])


@pytest.mark.parametrize("cls", [InstanceWeightedNorm2d, FusedInstanceWeightedNorm2d])
def test_export_with_a_dynamic_batch(cls):
    """torch.export of the layers with the batch size dynamic: the exported
    program matches eager at another batch size (the reference's row count
    specialized the batch to the example's)."""
    batch = torch.export.Dim("batch", min=2)
    layer = cls(4, 3)
    eager = copy.deepcopy(layer)
    program = torch.export.export(
        layer,
        (torch.randn(6, 4, 3, 3), torch.arange(6) % 3),
        dynamic_shapes=({0: batch}, {0: batch}),
    )
    x, labels = torch.randn(9, 4, 3, 3), torch.arange(9) % 3
    exported = program.module()
    assert_close(exported(x, labels), eager(x, labels))
    assert_close(exported.running_mean, eager.running_mean)
