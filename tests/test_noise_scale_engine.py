"""Taking gradient norms: both estimators against the exact noise scale of linear regression (issue 15.1), and
the probe leaves training untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bsprof.engine.noise_scale import (
    GnsSettings,
    GradientNoiseProbe,
    NoiseScaleTracker,
    data_parallel_sample,
    squared_norm,
)
from bsprof.noise_scale import GradientNormSample, estimate_noise_scale, noise_components, variance_factor

N, D = 4096, 8


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out.squeeze(-1) - y) ** 2).mean()


@pytest.fixture(scope="module")
def regression():
    """A finite linear-regression dataset (float64), its least-squares optimum and a fixed direction."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.randn(D, generator=g, dtype=torch.float64) + 0.3 + 0.5 * torch.randn(N, generator=g).double()
    a = torch.cat([x, torch.ones(N, 1, dtype=torch.float64)], dim=1)
    w_opt = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1)
    u = torch.randn(D + 1, generator=g, dtype=torch.float64)
    return x, y, a, w_opt, u / u.norm()


def exact_noise_scale(a: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """Closed form from every per-example gradient g_i = 2 r_i a_i of (a_i·w − y_i)²: (|G|², tr(Σ))."""
    g = 2 * (a @ w - y).unsqueeze(1) * a
    mean = g.mean(dim=0)
    grad_sq = float(mean @ mean)
    return grad_sq, float(g.pow(2).sum(dim=1).mean()) - grad_sq  # population covariance: mean|g|² − |G|²


def linear_model(w: torch.Tensor) -> nn.Linear:
    model = nn.Linear(D, 1).double()
    with torch.no_grad():
        model.weight.copy_(w[:D].unsqueeze(0))
        model.bias.copy_(w[D:])
    return model


@pytest.mark.parametrize("method", ["micro", "per_example"])
def test_estimators_within_10_percent_of_exact_b_simple_at_two_distances(regression, method):
    x, y, a, w_opt, u = regression
    exact, estimated = [], []
    for distance in (1.0, 0.2):
        w = w_opt + distance * u
        grad_sq, trace = exact_noise_scale(a, y, w)
        probe = GradientNoiseProbe(linear_model(w), mse, x, y, batch_size=256, micro_batch_size=32, seed=1,
                                   method=method)  # fmt: skip
        est = estimate_noise_scale([probe.measure() for _ in range(300)])
        exact.append(trace / grad_sq)
        estimated.append(est.b_simple)
        assert est.b_simple == pytest.approx(trace / grad_sq, rel=0.10)
        assert est.grad_sq == pytest.approx(grad_sq, rel=0.10) and est.trace_cov == pytest.approx(trace, rel=0.10)
        assert est.ci_low < trace / grad_sq < est.ci_high
    assert exact[1] / exact[0] >= 4  # the two distances differ in B_simple by at least 4x (about 5.5x)
    assert probe.micro_batch_size == (1 if method == "per_example" else 32)


def test_training_batches_without_replacement_need_the_finite_population_correction(regression):
    # Batches as training draws them (slices of a permutation of n = 512 examples, B = n/2, b = 32) near the
    # optimum, where B_simple is half of n: uncorrected, |G|² is biased by -tr(Σ)/n and B_simple comes out
    # about twice too large; with the correction it is within 10%.
    _, y, a, _, u = regression
    n = 512
    a, y = a[:n], y[:n]
    w = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1) + 0.1 * u
    grad_sq, trace = exact_noise_scale(a, y, w)
    assert trace / grad_sq > n / 3
    g = 2 * (a @ w - y).unsqueeze(1) * a
    gen = torch.Generator().manual_seed(2)
    corrected, naive = [], []
    big, small = n // 2, 32
    for _ in range(300):
        batch = g[torch.randperm(n, generator=gen)[:big]]
        micro = batch.reshape(big // small, small, -1).mean(dim=1)
        s_sq, b_sq = float(micro.pow(2).sum(dim=1).mean()), float(batch.mean(dim=0).pow(2).sum())
        corrected.append(GradientNormSample(small, big, s_sq, b_sq, population_size=n))
        naive.append(GradientNormSample(small, big, s_sq, b_sq))
    assert estimate_noise_scale(corrected).b_simple == pytest.approx(trace / grad_sq, rel=0.10)
    assert estimate_noise_scale(naive).b_simple > 1.5 * trace / grad_sq


def test_micro_path_with_single_examples_equals_the_per_example_path(regression):
    x, y, _, w_opt, u = regression
    model = linear_model(w_opt + 0.5 * u)
    one = GradientNoiseProbe(model, mse, x, y, batch_size=16, micro_batch_size=1, seed=5).measure(step=3)
    per = GradientNoiseProbe(model, mse, x, y, batch_size=16, seed=5, method="per_example").measure(step=3)
    assert one.small_batch_size == per.small_batch_size == 1 and one.step == per.step == 3
    assert one.small_sq_norm == pytest.approx(per.small_sq_norm, rel=1e-10)
    assert one.big_sq_norm == pytest.approx(per.big_sq_norm, rel=1e-10)


def test_data_parallel_sample_uses_rank_gradients_and_the_averaged_gradient(regression):
    # Four ranks with 32 examples each; DDP's all-reduce averages their gradients, which for a mean-reduced
    # loss is the gradient of the global batch of 128.
    x, y, _, w_opt, u = regression
    model = linear_model(w_opt + 0.5 * u)
    xs, ys = x[:128], y[:128]
    ranks = [torch.autograd.grad(mse(model(xs[r::4]), ys[r::4]), list(model.parameters())) for r in range(4)]
    averaged = [sum(gs) / 4 for gs in zip(*ranks)]
    full = torch.autograd.grad(mse(model(xs), ys), list(model.parameters()))
    assert squared_norm(averaged) == pytest.approx(squared_norm(full), rel=1e-12)
    s = data_parallel_sample([squared_norm(g) for g in ranks], squared_norm(averaged), per_rank_batch_size=32, step=7)
    assert (s.small_batch_size, s.big_batch_size, s.step) == (32, 128, 7)
    assert s.small_sq_norm == pytest.approx(sum(squared_norm(g) for g in ranks) / 4)
    assert noise_components(s).trace_cov == pytest.approx(
        (s.small_sq_norm - s.big_sq_norm) / (variance_factor(32) - variance_factor(128))
    )
    with pytest.raises(ValueError):
        data_parallel_sample([1.0], 1.0, per_rank_batch_size=32)


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _train(probe_every: int | None) -> tuple[list[torch.Tensor], int]:
    torch.manual_seed(0)
    model = _Noisy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g)
    loss = nn.functional.cross_entropy
    probe = GradientNoiseProbe(model, loss, x, y, batch_size=32, micro_batch_size=8, seed=3)
    for step in range(12):
        idx = torch.randperm(256)[:32]  # the global RNG: a probe that consumed it would shift these draws
        loss(model(x[idx]), y[idx]).backward()
        if probe_every and step % probe_every == 0:
            grads = [p.grad.clone() for p in model.parameters()]
            probe.measure(step=step)
            assert all(torch.equal(p.grad, gr) for p, gr in zip(model.parameters(), grads))  # .grad untouched
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]
    return state, probe.measurements


def test_probe_leaves_training_bit_identical():
    # Dropout (global RNG), BatchNorm (running statistics), the batch order and .grad all stay as without it.
    plain, none = _train(None)
    probed, measured = _train(2)
    assert none == 0 and measured == 6
    assert all(torch.equal(p, q) for p, q in zip(plain, probed))


def test_probe_rejects_bad_settings(regression):
    x, y, *_ = regression
    model = linear_model(torch.zeros(D + 1, dtype=torch.float64))
    for kwargs in ({"batch_size": 1}, {"batch_size": 16, "micro_batch_size": 16},
                   {"batch_size": 16, "micro_batch_size": 5}, {"batch_size": 16, "method": "exact"}):  # fmt: skip
        with pytest.raises(ValueError):
            GradientNoiseProbe(model, mse, x, y, **kwargs)


def test_tracker_measures_on_a_geometric_schedule_and_reports_curve_fields(regression):
    x, y, _, w_opt, u = regression
    ticks = iter(range(1000))
    tracker = NoiseScaleTracker(
        linear_model(w_opt + 1.0 * u), mse, x, y, trial_batch_size=8, seed=0,
        settings=GnsSettings(probes=3, spacing=2.0), clock=lambda: float(next(ticks)),
    )  # fmt: skip
    assert tracker.probe.batch_size == 256 and tracker.probe.micro_batch_size == 32  # floor of 256, 8 micro
    rows = {s: tracker.record(s) for s in range(1, 11)}
    assert [s for s, r in rows.items() if r] == [1, 2, 4, 8]
    assert tracker.record(10, force=True) and tracker.record(10, force=True) == {}  # once per step
    r = rows[8]
    assert {"b_simple", "b_simple_low", "b_simple_high", "grad_sq", "trace_cov", "b_simple_ema", "gns_s"} <= set(r)
    assert r["b_simple_low"] <= r["b_simple"] <= r["b_simple_high"] and r["gns_s"] == 1.0
    assert len(tracker.samples) == 4 * 3 + 16 and tracker.time_s == 5.0  # the forced, last one: 16 probes
    assert {s.step for s in tracker.samples} == {1, 2, 4, 8, 10}
    assert GnsSettings(batch_size=100).probe_batch_size(8) == 96  # a multiple of the micro-batch count
    assert GnsSettings().probe_batch_size(1024) == 1024
    with pytest.raises(ValueError):
        GnsSettings(probes=0)


def test_tracker_metrics_hold_the_last_measurement(regression):
    x, y, _, w_opt, u = regression
    tracker = NoiseScaleTracker(linear_model(w_opt + u), mse, x, y, trial_batch_size=64, seed=0,
                                settings=GnsSettings(probes=2, min_batch_size=16))  # fmt: skip
    metrics, reasons = tracker.metrics()
    assert metrics["gns_b_simple"] is None and metrics["gns_measurements"] == 0 and "gns_b_simple" in reasons
    tracker.record(1)
    last = tracker.record(5)
    metrics, reasons = tracker.metrics()
    assert metrics["gns_b_simple"] == last["b_simple"] and metrics["gns_b_simple_high"] == last["b_simple_high"]
    assert (metrics["gns_step"], metrics["gns_measurements"]) == (5, 2) and reasons == {}
    assert (metrics["gns_probe_batch_size"], metrics["gns_micro_batch_size"]) == (64, 8)
    assert metrics["gns_time_s"] == pytest.approx(tracker.time_s) and tracker.time_s > 0


def test_convergence_trial_with_gns_records_the_curve_and_trains_identically():
    from bsprof.engine.convergence import ConvergenceSettings, run_convergence_trial
    from bsprof.engine.trial import EngineSettings, TrialSpec
    from bsprof.workloads.digits import DigitsMLP

    w, cpu = DigitsMLP(), EngineSettings(device=torch.device("cpu"))
    spec = TrialSpec(w.name, "convergence", 256, 0, 0.3)
    plain = run_convergence_trial(w, spec, cpu, ConvergenceSettings())
    probed = run_convergence_trial(w, spec, cpu, ConvergenceSettings(gns=GnsSettings(probes=2)))
    assert probed.status == plain.status == "ok"
    for k in ("steps_to_target", "final_val_metric", "final_train_metric"):
        assert probed.metrics[k] == plain.metrics[k]
    measured = [r for r in probed.curve if "b_simple" in r]
    assert measured[0]["step"] == 1 and measured[-1]["step"] == probed.metrics["steps_to_target"]  # and the target
    m = probed.metrics
    assert m["gns_step"] == m["steps_to_target"] and m["gns_measurements"] == len(measured)
    assert m["gns_b_simple"] == measured[-1]["b_simple"] and m["gns_time_s"] > 0
    assert "gns_b_simple" not in plain.metrics and "gns" not in ConvergenceSettings().config()
    assert ConvergenceSettings(gns=GnsSettings()).config()["gns"]["probes"] == 4
