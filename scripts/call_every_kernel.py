"""Calls every kernel of both ops, forward and backward, over every argument
form the launchers tell apart: the workload of the compute-sanitizer runs in
scripts/gpu_check.sh, and the launch source of scripts/triton_aot.py.

    python scripts/call_every_kernel.py --device cuda --backend cuda     # CUDA C++ kernels
    python scripts/call_every_kernel.py --device cuda --backend triton   # Triton kernels

It goes under the public functions (straight to ``torch.ops.surgellm``) so
that the chosen backend's kernels run whatever the tensors' device, and it
checks nothing: the sanitizer (or the recorder) is the judge; the test suite
checks the numbers.
"""

import argparse
import itertools
import sys

import torch

WIDTHS = (
    1,
    2,
    3,
    7,
    15,
    16,
    17,
    31,
    48,
    63,
    64,
    65,
    100,
    127,
    128,
    129,
    255,
    256,
    384,
    511,
    512,
    768,
    1000,
    1023,
    1024,
    1536,
    2047,
    2048,
    3000,
    4095,
    4096,
)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def use_backend(device: str, backend: str) -> None:
    """Registers the Triton kernels of the phase ops for ``device`` (any
    device type: Triton launches are what the recorder intercepts), or
    removes them so that the C++ kernels run."""
    import surgellm_kernels  # noqa: F401  (loads the extension and the fake kernels)
    from surgellm_kernels.ops import _backend

    _backend._use_triton_kernels(torch.device(device).type, backend == "triton")


def call_iwn(device, N, F, dtype, gate_form, affine, tasks, training, pooled, running, grad):
    g = torch.Generator().manual_seed(N * 7919 + F)
    T, C = (3 if tasks else 1), 4
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(N, F, generator=g).to(dtype).to(device).requires_grad_(grad)
    gate = {
        None: None,
        "vector": torch.zeros(F, dtype=acc, device=device),
        "per_row": torch.zeros(N, F, dtype=dtype, device=device),
    }[gate_form]
    if gate is not None:
        gate.requires_grad_(grad)
    weight = (
        torch.ones(F, dtype=acc, device=device, requires_grad=grad)
        if affine in ("w", "wb")
        else None
    )
    bias = (
        torch.zeros(F, dtype=acc, device=device, requires_grad=grad)
        if affine in ("b", "wb")
        else None
    )
    stats = running or not training
    rm = torch.zeros(T, F, dtype=acc, device=device) if stats else None
    rs = torch.ones(T, F, dtype=acc, device=device) if stats else None
    labels = torch.randint(0, C, (N,), generator=g).to(device) if training else None
    task_ids = torch.randint(0, T, (N,), generator=g).to(device) if tasks else None
    y = torch.ops.surgellm.iwn(
        x,
        labels,
        gate,
        weight,
        bias,
        rm,
        rs,
        task_ids,
        training,
        std_mode="pooled" if pooled else "class_mean",
        num_classes=C if training else None,
    )
    if grad:
        y.backward(torch.ones_like(y))


def call_gate(device, N, d, dtype, affine):
    g = torch.Generator().manual_seed(N * 7919 + d)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    h, s, logits = (
        torch.randn(N, d, generator=g).to(dtype).to(device).requires_grad_(True) for _ in range(3)
    )
    weight = (
        torch.ones(d, dtype=acc, device=device, requires_grad=True)
        if affine in ("w", "wb")
        else None
    )
    bias = (
        torch.zeros(d, dtype=acc, device=device, requires_grad=True)
        if affine in ("b", "wb")
        else None
    )
    z = torch.ops.surgellm.surgical_gate(h, s, logits, weight, bias)
    z.backward(torch.ones_like(z))


def call_every_kernel(device: str = "cpu", widths=WIDTHS, dtypes=DTYPES) -> int:
    """Every combination of the flags at sizes that take one reduction chunk
    and several; then every width in ``widths`` (and a few row counts) with the
    flags that change which pointers a kernel reads. Returns the call count."""
    calls = 0
    flags = itertools.product(
        dtypes,
        (None, "vector", "per_row"),
        (None, "w", "b", "wb"),
        (False, True),
        (False, True),
        (False, True),
        (False, True),
        (False, True),
    )
    for dtype, gate_form, affine, tasks, training, pooled, running, grad in flags:
        if not training and (pooled or running):
            continue  # eval reads the running statistics; std_mode is a training choice
        for N, F in ((5, 3), (300, 96)):
            call_iwn(device, N, F, dtype, gate_form, affine, tasks, training, pooled, running, grad)
            calls += 1
    for dtype, F, N in itertools.product(dtypes, widths, (1, 16, 40)):
        for gate_form, training in itertools.product((None, "vector", "per_row"), (False, True)):
            call_iwn(device, N, F, dtype, gate_form, "wb", True, training, False, True, True)
            calls += 1
    for dtype, affine in itertools.product(dtypes, (None, "w", "b", "wb")):
        for d in tuple(widths) + (8192, 16384):
            for N in (1, 3, 600):
                call_gate(device, N, d, dtype, affine)
                calls += 1
    return calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", choices=("cuda", "cpu", "triton"), required=True)
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=[1, 3, 16, 65, 768, 1023],
        help="widths of the sweep (default: a short list, for the sanitizer)",
    )
    parser.add_argument("--dtypes", nargs="+", default=[str(d).split(".")[-1] for d in DTYPES])
    args = parser.parse_args(argv)
    use_backend(args.device, args.backend)
    calls = call_every_kernel(
        args.device, widths=args.widths, dtypes=[getattr(torch, name) for name in args.dtypes]
    )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"{calls} calls (forward and backward) on {args.device} with the {args.backend} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
