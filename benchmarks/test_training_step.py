"""One training step of SurgeLLMForSequenceClassification -- forward, backward, AdamW
step -- at batch 32, sequence 128, on a MiniLM-sized encoder (BERT, 384 wide,
6 layers, 12 heads, built from its config: random weights, no download), with
the reference modules and patched with ``patch_model``; and the share of the
step that the IWN and surgical gate modules take, from the profiler.

The share is attributed exactly: the ops a module runs in its forward (inside
a ``record_function`` scope around it) and the backward nodes autograd made
for them (matched by sequence number). The profiler's per-op overhead makes
small ops look larger, so the share is an upper bound.
"""

import statistics
import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from surgellm_kernels import patch_model

import harness

TRANSFORMERS = pytest.importorskip("transformers")
SECTION = "training step: SURGELLM forward + backward + AdamW step"
MINILM = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
)
BATCH, SEQUENCE = (8, 32) if harness.QUICK else (32, 128)
TASKS = {"sentiment": 2, "authorship": 2, "reasoning": 3}
MODULES = {"IWN": "iwn", "surgical gate": "fusion"}  # of model.surgellm


def build(kernels: str):
    from surgellm_kernels.surgellm import SurgeLLMConfig, SurgeLLMForSequenceClassification

    options = dict(MINILM, num_hidden_layers=1) if harness.QUICK else MINILM
    torch.manual_seed(0)
    config = SurgeLLMConfig(
        encoder_config=TRANSFORMERS.BertConfig(**options),
        tasks=TASKS,
        prefix=False,
        max_seq_length=SEQUENCE,
    )
    model = SurgeLLMForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)

    def rows(n):
        task_ids = torch.randint(0, len(TASKS), (n,), generator=g)
        limits = torch.tensor(list(TASKS.values()))[task_ids]
        return {
            # lexical-feature-like values: counts and lengths
            "features": torch.randint(0, 40, (n, 16), generator=g).float(),
            "task_ids": task_ids,
            "labels": (torch.rand(n, generator=g) * limits).long(),
        }

    batch = {
        "input_ids": torch.randint(1000, MINILM["vocab_size"], (BATCH, SEQUENCE), generator=g),
        "attention_mask": torch.ones(BATCH, SEQUENCE, dtype=torch.long),
        **rows(BATCH),
    }
    # the paper's fixed statistics, from a training split's worth of rows
    # (a batch of 8 leaves classes of one row, without spread)
    model.fit_statistics([rows(256)])
    report = patch_model(model) if kernels == "patched" else None
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss

    return model, step, report


def interleaved_steps(patched_step, rounds: int):
    """Step times (s) of a fresh reference model and ``patched_step``, taking
    turns step for step: a machine's drift then weighs on both alike, which
    it does not on two runs one after the other."""
    _, reference_step, _ = build("reference")
    reference_step()  # warm-up
    steps = {"reference": reference_step, "patched": patched_step}
    return harness.interleaved(steps, rounds, warm=False)


def module_share(model, step):
    """Profiled step time and each module's time in it (forward + backward), ms."""
    for label, attr in MODULES.items():
        module = getattr(model.surgellm, attr)

        def scoped(*args, _label=label, _forward=module.forward, **kwargs):
            with record_function(_label):
                return _forward(*args, **kwargs)

        module.forward = scoped
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("step"):
                step()
    finally:
        for attr in MODULES.values():
            del getattr(model.surgellm, attr).forward  # the class's forward again
    events = prof.events()
    total = sum(e.cpu_time_total for e in events if e.name == "step") / 1e3
    shares = {}
    for label in MODULES:
        scopes = [e for e in events if e.name == label]
        sequence = set()
        stack = list(scopes)
        while stack:
            e = stack.pop()
            if e.sequence_nr >= 0:
                sequence.add(e.sequence_nr)
            stack.extend(e.cpu_children)
        backward = [
            e
            for e in events
            if e.sequence_nr in sequence
            and e.name.startswith("autograd::engine::evaluate_function")
        ]
        shares[label] = (
            sum(e.cpu_time_total for e in scopes) + sum(e.cpu_time_total for e in backward)
        ) / 1e3
    return total, shares


@pytest.mark.parametrize("kernels", ["reference", "patched"])
def test_training_step(benchmark, bench_report, kernels):
    model, step, report = build(kernels)
    step()  # warm-up
    start = time.perf_counter()
    step()
    rounds = harness.rounds_for(time.perf_counter() - start)
    benchmark.extra_info.update(
        {"op": "training step", "impl": kernels, "shape": f"{BATCH}x{SEQUENCE}"}
    )
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median * 1e3
    total, shares = module_share(model, step)

    if not bench_report.sections.get(SECTION):
        layers = 1 if harness.QUICK else MINILM["num_hidden_layers"]
        bench_report.add_section_line(
            SECTION,
            f"batch {BATCH}, sequence {SEQUENCE}, BERT 384 wide, {layers} layers; "
            f"module share = its forward ops + their backward nodes in one profiled "
            f"step",
        )
    parts = ", ".join(
        f"{label} {ms:.2f} ms ({100 * ms / total:.2f}%)" for label, ms in shares.items()
    )
    line = f"{kernels:>9}: median {median:9.1f} ms"
    if kernels == "patched":
        turns = harness.turns_for(2 * median * 1e-3)
        times = interleaved_steps(step, turns)
        line += (
            f"; taking turns with the reference, step for step ({turns} pairs): median "
            f"{statistics.median(times['patched']) * 1e3:.1f} vs "
            f"{statistics.median(times['reference']) * 1e3:.1f} ms, "
            f"{harness.median_ratio(times['reference'], times['patched']):.3f}x the "
            f"reference's speed (the median of the pairs' ratios)"
        )
        backends = sorted(set(report.backends.values()))
        line += f"; fused modules run {', '.join(backends)}"
        if report.eager:
            line += " -- NOT the fast path"
    bench_report.add_section_line(SECTION, line)
    bench_report.add_section_line(SECTION, f"{'':>9}  profiled step {total:.1f} ms: {parts}")
