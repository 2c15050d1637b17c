"""Tests for training: objectives, stage starts, multi-stage training, budgets, robustness and
options."""

import math

import numpy as np
import pytest
import torch

from geoinvert.problem.posterior import Posterior
from geoinvert.errors import TrainingError
from geoinvert.inference.starts import importance_pool
from geoinvert.inference.objectives import jeffreys_loss, pool_jeffreys_loss, reverse_kl_loss
from geoinvert.inference.trainer import level_costs, lr_factor, train_msign
from geoinvert.testing import (BrokenPosterior, FlakyForward, flat_parameters, linear_gaussian,
                               small_flow as new_model)

LEVELS = 3


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def relative_moment_errors(model, prior, exact, num=4000):
    """RMS over cells of |mean - exact mean| / prior std and |std - exact std| / prior std."""
    with torch.no_grad():
        x = model.sample(num, generator=gen(11), level=LEVELS)[0].to(torch.float64).numpy()
    shape = x.shape[1:]
    prior_std = np.sqrt(np.diag(prior.covariance(LEVELS))).reshape(shape)
    mean_err = (x.mean(0) - exact.mean.reshape(shape)) / prior_std
    std_err = (x.std(0) - np.sqrt(np.diag(exact.cov)).reshape(shape)) / prior_std
    return float(np.sqrt(np.mean(mean_err**2))), float(np.sqrt(np.mean(std_err**2)))


# -- objectives ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", [reverse_kl_loss, jeffreys_loss])
def test_losses_are_finite_and_give_gradients(problem, loss_fn):
    prior, posteriors, _ = problem
    model = new_model(prior)
    model.set_stage(2)
    loss, stats = loss_fn(model, posteriors[2], 8, gen())
    loss.backward()
    assert math.isfinite(loss.item()) and math.isfinite(stats["loss"])
    assert stats["nfs"] == (16 if loss_fn is jeffreys_loss else 8) and stats["failed"] == 0
    grads = [p.grad for p in model.active_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("proposal", ["surrogate", "defensive", "mixture"])
def test_jeffreys_loss_of_exact_model_is_small(problem, proposal):
    # Prior as target (no data): the untrained model is exact, so D_J = 0 and all weights equal.
    prior, posteriors, _ = problem
    flat = Posterior(prior, posteriors[2].forward, np.zeros(3), 1e6, 2)
    model = new_model(prior)
    model.set_stage(2)
    _, stats = jeffreys_loss(model, flat, 64, gen(), proposal=proposal)
    assert abs(stats["loss"]) < 1e-3 and stats["ess"] > 0.99 and stats["flow_ess"] > 0.99
    pool = importance_pool(model, flat, 64, gen())
    assert pool.x.shape == (64, 4, 4) and pool.ess > 0.99
    torch.testing.assert_close(pool.w.sum(), torch.tensor(1.0, dtype=torch.float64))
    _, stats = pool_jeffreys_loss(model, flat, 16, gen(), pool=pool)
    assert abs(stats["loss"]) < 1e-3 and stats["nfs"] == 16


def test_the_flow_own_importance_ess_is_that_of_its_draws_weighed_by_the_target(problem):
    """``flow_ess``: the importance ESS fraction of the reverse term's draws x ~ q with weights
    p~(x) / q(x), from the same draws (the same generator state) as a direct computation;
    below 1 for a model that is not the posterior. At reverse weight 0 there are no such
    draws: NaN."""
    from geoinvert.diagnostics import importance_ess_fraction
    prior, posteriors, _ = problem
    model = new_model(prior)
    model.set_stage(2)
    _, stats = reverse_kl_loss(model, posteriors[2], 64, gen(3))
    with torch.no_grad():
        x, log_q = model.sample(64, generator=gen(3), level=2)
        log_w = posteriors[2].log_prob(x.to(torch.float64)) - log_q.to(torch.float64)
    assert stats["flow_ess"] == pytest.approx(importance_ess_fraction(log_w.numpy()), rel=1e-6)
    assert stats["flow_ess"] < 0.9
    _, stats = jeffreys_loss(model, posteriors[2], 8, gen(), reverse_weight=0.0)
    assert math.isnan(stats["flow_ess"])


def completed(stages):
    """A checkpoint callback recording the stages whose end it saw."""
    return lambda state: stages.append(state["stage"]) if state["complete"] else None


# -- training --------------------------------------------------------------------------------------


def test_loss_decreases(problem):
    prior, posteriors, _ = problem
    model = new_model(prior)
    history = train_msign(model, {1: posteriors[1]}, steps=60, batch=32, lr=3e-3,
                          generator=gen(), callback=None, checkpoint=None)
    losses = [h["loss"] for h in history]
    assert len(history) == 60 and {h["stage"] for h in history} == {1}
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:5])


@pytest.mark.slow
def test_multistage_jeffreys_matches_exact_linear_posterior(problem):
    prior, posteriors, exact = problem
    model = new_model(prior)
    untrained = relative_moment_errors(model, prior, exact)
    solved_before = sum(p.forward.n_solves for p in posteriors.values())
    stages = []
    history = train_msign(model, posteriors, start=1, steps=[40, 40, 60], batch=32, lr=3e-3,
                          objective="jeffreys", budget=None, generator=gen(),
                          callback=None, checkpoint=completed(stages))
    mean_err, std_err = relative_moment_errors(model, prior, exact)
    # Untrained (the prior): RMS errors ~0.28 (mean) and ~0.14 (std) of the prior std. The
    # Monte-Carlo error of 4000 samples is ~0.02 of the prior std; a short training (140 steps
    # per run) reaches ~0.07 / ~0.06 (longer runs: see benchmarks/msign_linear.py).
    assert untrained[0] > 0.2 and untrained[1] > 0.1
    assert mean_err < 0.12 and std_err < 0.09
    assert mean_err < 0.5 * untrained[0] and std_err < 0.7 * untrained[1]
    assert stages == [1, 2, 3] and model.stage == 3
    solves = sum(p.forward.n_solves for p in posteriors.values()) - solved_before
    nfs = [h["nfs"] for h in history]
    # stage 1: a 4096-sample importance pool, 20 pool-only steps, 20 steps of 32 solves
    assert nfs[0] == 4096 and nfs[-1] == solves == 4096 + 20 * 32 + 100 * 64
    assert all(b >= a for a, b in zip(nfs, nfs[1:]))
    assert all(np.isfinite(h["ess"]) and 0 < h["ess"] <= 1 for h in history)


def test_budget_is_never_exceeded():
    prior, posteriors, _ = linear_gaussian()
    model = new_model(prior)
    budget = 1001
    history = train_msign(model, posteriors, start=1, steps=100, batch=16, lr=1e-3,
                          objective="jeffreys", budget=budget, generator=gen(), callback=None,
                          checkpoint=None)
    solves = sum(p.forward.n_solves for p in posteriors.values())
    assert history[-1]["nfs"] == solves <= budget and solves >= budget - 3
    assert {h["stage"] for h in history} == {1, 2, 3}  # every stage gets a share
    costs = {1: 1 / 16, 2: 1 / 4, 3: 1.0}
    stage_nfs = {s: sum(2 * 16 for h in history if h["stage"] == s) for s in costs}
    assert history[-1]["nfs_finest"] <= sum(costs[s] * stage_nfs[s] for s in costs)


def test_failed_solves_are_excluded(problem):
    prior, posteriors, _ = problem
    flaky = {l: Posterior(prior, FlakyForward(p.forward), p.data, p.noise, l)
             for l, p in posteriors.items()}
    model = new_model(prior)
    history = train_msign(model, flaky, steps=15, batch=16, lr=3e-3, generator=gen(),
                          callback=None, checkpoint=None)
    failed = sum(h["failed"] for h in history) / sum(
        (2 if h["stage"] > 1 else 1) * 16 for h in history if h["stage"] > 1 or h["step"] >= 8)
    assert 0.1 < failed < 0.3  # about one in five
    assert all(math.isfinite(h["loss"]) for h in history) and history[-1]["skipped"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    x, log_p = model.sample(8, generator=gen(1))
    assert torch.isfinite(x).all() and torch.isfinite(log_p).all()


def test_non_finite_steps_are_skipped_then_stop(problem):
    prior, posteriors, _ = problem
    p = posteriors[1]
    broken = {1: BrokenPosterior(prior, p.forward, p.data, p.noise, 1)}
    model = new_model(prior)
    before = [t.detach().clone() for t in model.parameters()]
    seen = []
    with pytest.raises(TrainingError, match="5 consecutive steps"):
        train_msign(model, broken, steps=50, batch=8, lr=1e-2, generator=gen(),
                    callback=seen.append, checkpoint=None, max_failures=5, pool=0)
    with pytest.raises(TrainingError, match="importance pool failed"):
        train_msign(model, broken, steps=50, batch=8, lr=1e-2, generator=gen(),
                    callback=None, checkpoint=None)
    assert [h["skipped"] for h in seen] == [1, 2, 3, 4, 5]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("options", [{"objective": "reverse_kl"}, {"single_stage": True},
                                     {"single_stage": True, "objective": "reverse_kl"},
                                     {"schedule": "step"}, {"lr_warmup": 0.25},
                                     {"frozen_proposal": True, "reverse_weight": 0.0,
                                      "pool_warmup": 1.0}])
def test_options_run(problem, options):
    prior, posteriors, _ = problem
    model = new_model(prior)
    stages, infos = [], []
    history = train_msign(model, posteriors, start=1, steps=4, batch=8, lr=1e-3, budget=None,
                          generator=gen(), callback=infos.append, checkpoint=completed(stages),
                          **{"objective": "jeffreys", **options})
    expected = [3] if options.get("single_stage") else [1, 2, 3]
    assert stages == expected and history == infos and len(history) == 4 * len(expected)
    assert all(math.isfinite(h["loss"]) for h in history) and model.stage == 3
    if options.get("objective") == "reverse_kl":
        assert all(math.isnan(h["ess"]) for h in history)
        assert history[-1]["nfs"] == 8 * len(history)


def test_resume_start_and_steps_per_level(problem):
    prior, posteriors, _ = problem
    model = new_model(prior)
    stages = []
    history = train_msign(model, posteriors, start=2, steps={2: 3, 3: 1}, batch=8, lr=1e-3,
                          objective="jeffreys", budget=None, generator=gen(), callback=None,
                          checkpoint=completed(stages))
    assert stages == [2, 3] and [h["stage"] for h in history] == [2, 2, 2, 3]
    assert train_msign(model, posteriors, start=4, steps=3, batch=8, lr=1e-3,
                       objective="jeffreys", budget=None, generator=gen(), callback=None,
                       checkpoint=completed(stages)) == []


def test_default_steps_are_sized_to_each_stage():
    # 200 on the finest level from 16x16 on, a quarter per level down, at least 25 (or all
    # of a smaller number of steps); a smaller problem trains as a 16x16 one's first stages
    from geoinvert.inference.config import FULL_LEVEL, LEAST_STEPS, STEPS, stage_steps
    from geoinvert.inference.trainer import _steps_of
    assert (STEPS, LEAST_STEPS, FULL_LEVEL) == (200, 25, 4)
    assert [stage_steps(level, 6) for level in range(1, 7)] == [25, 25, 25, 25, 50, 200]
    assert [stage_steps(level, 5) for level in range(1, 6)] == [25, 25, 25, 50, 200]
    assert [stage_steps(level, 3) for level in (1, 2, 3)] == [25, 25, 50]
    assert [stage_steps(level, 2) for level in (1, 2)] == [25, 25]
    assert [stage_steps(level, 4, steps=800) for level in range(1, 5)] == [25, 50, 200, 800]
    assert [stage_steps(level, 3, steps=800) for level in (1, 2, 3)] == [25, 50, 200]
    assert [stage_steps(level, 2, steps=8) for level in (1, 2)] == [8, 8]
    assert [_steps_of(None, level, 4) for level in range(1, 5)] == [25, 25, 50, 200]
    assert _steps_of(7, 2, 4) == 7 and _steps_of([1, 2], 2, 2) == 2 and _steps_of({2: 3}, 2, 2) == 3


def test_serial_communicator_matches_no_communicator(problem):
    mpi = pytest.importorskip("mpi4py.MPI")
    prior, posteriors, _ = problem
    runs = []
    for comm in (None, mpi.COMM_SELF):
        model = new_model(prior)
        train_msign(model, posteriors, steps=3, batch=8, lr=1e-3, generator=gen(),
                    callback=None, checkpoint=None, comm=comm)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-6)


def test_level_costs_and_schedule(problem):
    _, posteriors, _ = problem
    assert level_costs(posteriors) == {1: 1 / 16, 2: 1 / 4, 3: 1.0}
    assert lr_factor(0, 10, "cosine", 0.1) == 1.0
    assert lr_factor(9, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert [lr_factor(s, 8, "step", 0.0) for s in (0, 4, 7)] == pytest.approx([1, 0.3, 0.09])
    # warm-up over the first 2 of 10 steps: 1/2, then the cosine at step 1, then the cosine
    assert lr_factor(0, 10, "cosine", 0.1, 0.2) == 0.5
    assert lr_factor(1, 10, "cosine", 0.1, 0.2) == lr_factor(1, 10, "cosine", 0.1)
    assert lr_factor(5, 10, "constant", 0.1, 0.2) == 1.0
    with pytest.raises(ValueError, match="lr_warmup"):
        train_msign(new_model(problem[0]), posteriors, lr_warmup=1.0, callback=None,
                    checkpoint=None)
    with pytest.raises(ValueError, match="objective"):
        train_msign(new_model(problem[0]), posteriors, steps=1, batch=4, lr=1e-3,
                    objective="forward_kl", budget=None, generator=gen(), callback=None,
                    checkpoint=None)


# -- checkpoints, resume, stop requests -------------------------------------------------------------

RESUMABLE = dict(steps=[4, 5, 6], batch=8, lr=3e-3, objective="jeffreys", pool=64,
                 checkpoint_every=2)


def saved_and_loaded(state, tmp_path):
    """A state after a trip through torch.save / torch.load(weights_only=True)."""
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("extra", [{}, {"frozen_proposal": True, "lr_warmup": 0.3},
                                   {"frozen_proposal": True, "reverse_weight": 0.5},
                                   {"coarse_sampler": "laplace", "pool_levels": 2}])
def test_resume_from_any_checkpoint_gives_the_uninterrupted_model(problem, tmp_path, extra):
    # With a frozen proposal the checkpoint also carries the frozen surrogate of the stage's
    # start.
    prior, posteriors, _ = problem
    states = []
    model = new_model(prior)
    history = train_msign(model, posteriors, generator=gen(), checkpoint=states.append,
                          **RESUMABLE, **extra)
    # every 2 steps within a stage, plus each stage end: stage 1 (4 steps) 2, 4; stage 2 (5) 2, 4,
    # 5; stage 3 (6) 2, 4, 6
    assert [(s["stage"], s["step"], s["complete"]) for s in states] == [
        (1, 2, False), (1, 4, True), (2, 2, False), (2, 4, False), (2, 5, True),
        (3, 2, False), (3, 4, False), (3, 6, True)]
    for state in (states[0], states[3], states[4]):
        resumed = new_model(prior, seed=99)         # other initial weights: all come from the state
        other = train_msign(resumed, posteriors, generator=gen(123), checkpoint=None,
                            resume=saved_and_loaded(state, tmp_path), **RESUMABLE, **extra)
        assert torch.equal(flat_parameters(resumed), flat_parameters(model))
        assert [h["loss"] for h in other] == [h["loss"] for h in history]
        assert other[-1]["nfs"] == history[-1]["nfs"]


def test_stop_request_checkpoints_and_raises_at_the_same_step(problem):
    from geoinvert.inference.trainer import TrainingInterrupted
    prior, posteriors, _ = problem
    reference = new_model(prior)
    train_msign(reference, posteriors, generator=gen(), checkpoint=None, **RESUMABLE)
    calls, saved = [], []

    def stop():
        calls.append(1)
        return len(calls) == 7                      # after the 7th step: stage 2, step 3
    model = new_model(prior)
    with pytest.raises(TrainingInterrupted, match="stage 2, step 3 of 5") as info:
        train_msign(model, posteriors, generator=gen(), checkpoint=saved.append, stop=stop,
                    **RESUMABLE)
    assert saved[-1]["stage"] == 2 and saved[-1]["step"] == 3
    assert info.value.state["step"] == 3
    resumed = new_model(prior)
    train_msign(resumed, posteriors, generator=gen(), checkpoint=None, resume=saved[-1],
                **RESUMABLE)
    assert torch.equal(flat_parameters(resumed), flat_parameters(reference))


def test_resume_rejects_a_state_that_does_not_fit(problem):
    prior, posteriors, _ = problem
    states = []
    train_msign(new_model(prior), posteriors, generator=gen(), checkpoint=states.append,
                **RESUMABLE)
    with pytest.raises(ValueError, match="budget"):
        train_msign(new_model(prior), posteriors, generator=gen(), resume=states[0],
                    **{**RESUMABLE, "budget": 500})
    with pytest.raises(ValueError, match="version"):
        train_msign(new_model(prior), posteriors, generator=gen(),
                    resume={**states[0], "version": 0}, **RESUMABLE)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_msign(new_model(prior), posteriors, generator=gen(), checkpoint_every=-1)


def test_frozen_surrogate_does_not_follow_the_model(problem):
    # The frozen proposal of a stage is a float64 copy with no trainable parameters; training
    # the model on does not move it.
    from geoinvert.inference.objectives import frozen_surrogate
    prior, posteriors, _ = problem
    model = new_model(prior)
    train_msign(model, {1: posteriors[1]}, steps=3, batch=8, lr=1e-2, pool=64, generator=gen(),
                callback=None, checkpoint=None)
    model.set_stage(2)
    frozen = frozen_surrogate(model)
    assert not any(p.requires_grad for p in frozen.parameters())
    x = model.sample(5, generator=gen(1))[0].detach().to(torch.float64)
    before = frozen.surrogate_log_prob(x, 2)
    torch.testing.assert_close(before, model.to(torch.float64).surrogate_log_prob(x, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    torch.testing.assert_close(frozen.surrogate_log_prob(x, 2), before)


def test_reverse_weight_zero_leaves_only_the_forward_kl(problem):
    # At weight 0 the target's gradient (which only the reverse KL uses) cannot change the
    # parameter gradient; at weight 1 it does.
    prior, posteriors, _ = problem
    model = new_model(prior)
    model.set_stage(2)

    class Steeper:                       # same values, gradients x 10
        level, prior = 2, posteriors[2].prior

        def log_prob(self, x):
            return posteriors[2].log_prob(x)

        def grad_log_prob(self, x):
            value, grad = posteriors[2].grad_log_prob(x)
            return value, 10 * grad

    def grads(target, weight):
        model.zero_grad()
        loss, _ = jeffreys_loss(model, target, 16, gen(), proposal="defensive",
                                reverse_weight=weight)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.active_parameters()])

    torch.testing.assert_close(grads(posteriors[2], 0.0), grads(Steeper(), 0.0))
    assert not torch.allclose(grads(posteriors[2], 1.0), grads(Steeper(), 1.0))
    # without model samples, all 2 x batch solves go to the proposal
    before = posteriors[2].forward.n_solves
    _, stats = jeffreys_loss(model, posteriors[2], 16, gen(), proposal="defensive",
                             reverse_weight=0.0)
    assert stats["nfs"] == posteriors[2].forward.n_solves - before == 32
    with pytest.raises(ValueError, match="reverse_weight"):
        train_msign(new_model(prior), posteriors, reverse_weight=2.0, callback=None,
                    checkpoint=None)


def test_frozen_proposal_draws_from_the_stage_start(problem):
    # The defensive proposal's surrogate half comes from the frozen copy: changing the model
    # afterwards changes neither the draws nor their proposal density.
    from geoinvert.parallel import Ensemble
    from geoinvert.inference.objectives import frozen_surrogate, propose
    prior, _, _ = problem
    model = new_model(prior)
    model.set_stage(2)
    with torch.no_grad():
        for p in model.flows[0].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen(4)))
    frozen = frozen_surrogate(model)
    before = propose(model, 2, 8, gen(), "defensive", Ensemble(), frozen)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    after = propose(model, 2, 8, gen(), "defensive", Ensemble(), frozen)
    torch.testing.assert_close(after, before)
    moved = propose(model, 2, 8, gen(), "defensive", Ensemble())
    assert not torch.allclose(moved[1], before[1])


def test_a_recipe_gives_its_options_unless_they_are_given(problem):
    from geoinvert.inference.config import RECIPES, TrainOptions, recipe_options
    assert recipe_options("paper") == {k: getattr(TrainOptions, k) for k in RECIPES["forward_kl"]}
    assert recipe_options("forward_kl", pool_levels=1) == {**RECIPES["forward_kl"],
                                                          "pool_levels": 1}
    with pytest.raises(ValueError, match="recipe"):
        recipe_options("fast")
    # train_msign with the recipe is train_msign with its options spelled out
    prior, posteriors, _ = problem
    runs = []
    for kwargs in ({"recipe": "forward_kl"}, dict(RECIPES["forward_kl"])):
        model = new_model(prior)
        train_msign(model, posteriors, steps=3, batch=8, pool=64, generator=gen(), **kwargs)
        runs.append(flat_parameters(model))
    assert torch.equal(*runs)
