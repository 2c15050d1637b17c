"""Settings of training and of the correction to exactness, torch-free (the case schema is
derived from them)."""

import dataclasses
from dataclasses import dataclass

__all__ = ["OBJECTIVES", "SCHEDULES", "PROPOSALS", "COARSE_SAMPLERS", "STEPS", "TrainOptions",
           "LEAST_STEPS", "FULL_LEVEL", "stage_steps", "RECIPES", "UPSAMPLINGS", "FLOW_BLOCKS",
           "FlowConfig",
           "RECIPE_KEYS", "recipe_options", "CHAIN_KINDS", "ChainConfig",
           "CORRECTION_COORDINATES", "CORRECTION_KERNELS", "LIFTED_BREAKEVEN",
           "LIFTED_SOLVES_PER_ESS",
           "LIFTED_MAX_PARAMETERS", "AUTOREGRESSIVE_KINDS", "AUTOREGRESSIVE_LAPLACE_MAX",
           "CorrectionConfig", "metric_windows", "made_width"]

# -- training -----------------------------------------------------------------------------------

OBJECTIVES = ("jeffreys", "reverse_kl", "asvgd")
SCHEDULES = ("cosine", "step", "constant")
PROPOSALS = ("auto", "surrogate", "defensive", "mixture")
COARSE_SAMPLERS = ("importance", "smc", "laplace")
STEPS = 200
"""Training steps of the finest stage of a 16x16 or larger problem by default
(:func:`stage_steps`)."""
LEAST_STEPS = 25
"""Fewest training steps of a stage by default (:func:`stage_steps`)."""
FULL_LEVEL = 4
"""Level (2^4 x 2^4 = 256 parameters) from which the finest stage trains :data:`STEPS` steps
by default (:func:`stage_steps`)."""


def stage_steps(level, finest, steps=STEPS):
    """Default training steps of stage ``level`` of ``finest``: ``steps`` on the finest level
    of a problem of at least :data:`FULL_LEVEL` (16x16, 256 parameters), and on every other
    stage in proportion to its parameters (a quarter per level down), at least
    :data:`LEAST_STEPS` (a learning-rate ramp and a cosine decay still fit). A smaller
    problem's stages train as the stages of its sizes do in a 16x16 problem: an 8x8 problem
    [25, 25, 50], a 4x4 one [25, 25].

    A coarse stage learns a posterior of few parameters, and only as the next stage's
    starting point: the finest stage carries the accuracy and the correction makes the draws
    exact. Equal steps per stage spend as many solves on a 2x2 posterior as on the finest
    one: three quarters of the training of a 16x16 problem went to its three coarser stages.
    On problems of 16 and 64 parameters the finest stage's full steps did not make the
    correction cheaper by the solves they cost (``docs/notes/small-elliptic-budget.md``).
    """
    return max(min(LEAST_STEPS, steps), round(steps * 4.0 ** (level - max(finest, FULL_LEVEL))))


@dataclass
class TrainOptions:
    """Settings shared by every stage (see :func:`geoinvert.inference.trainer.train_msign` for
    their meaning)."""

    objective: str = "jeffreys"
    batch: int = 64
    lr: float = 1e-3
    schedule: str = "cosine"
    lr_min: float = 0.05
    lr_warmup: float = 0.0
    grad_clip: float = 10.0
    max_failures: int = 20
    proposal: str = "auto"
    single_stage: bool = False
    pool: int = 4096
    pool_warmup: float = 0.5
    coarse_sampler: str = "importance"
    pool_levels: int = 1
    frozen_proposal: bool = False
    reverse_weight: float = 1.0

    def __post_init__(self):
        for name, value, valid in (("objective", self.objective, OBJECTIVES),
                                   ("schedule", self.schedule, SCHEDULES),
                                   ("proposal", self.proposal, PROPOSALS),
                                   ("coarse_sampler", self.coarse_sampler, COARSE_SAMPLERS)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        if int(self.batch) != self.batch or self.batch < 2:
            raise ValueError(f"batch must be an integer >= 2, got {self.batch!r}")
        if int(self.pool_levels) != self.pool_levels or self.pool_levels < 1:
            raise ValueError(f"pool_levels must be an integer >= 1, got {self.pool_levels!r}")
        if not self.lr > 0 or not self.grad_clip > 0 or not 0 <= self.lr_min <= 1:
            raise ValueError("lr and grad_clip must be > 0 and lr_min in [0, 1]")
        if not 0 <= self.reverse_weight <= 1:
            raise ValueError(f"reverse_weight must be in [0, 1], got {self.reverse_weight!r}")
        if not 0 <= self.lr_warmup < 1:
            raise ValueError(f"lr_warmup must be in [0, 1), got {self.lr_warmup!r}")

    @property
    def evaluations(self) -> int:
        """Target evaluations per sample of a step: 2 for Jeffreys (flow + importance samples)."""
        return 2 if self.objective == "jeffreys" else 1


RECIPES = {
    "paper": {},
    "forward_kl": {"coarse_sampler": "laplace", "pool_levels": 2, "pool_warmup": 1.0,
                   "reverse_weight": 0.0, "frozen_proposal": True, "lr_warmup": 0.2},
}
"""Named training recipes: the :class:`TrainOptions` each sets (the others keep their
defaults).

- ``paper``: the MsIGN paper's training, the Jeffreys divergence at every stage from an
  importance pool of the first.
- ``forward_kl``: for sharp multimodal posteriors whose modes the Jeffreys divergence empties
  (``docs/notes/mode-loss.md``): the first two stages start from Laplace-mixture pools at the
  modes L-BFGS finds and fit them alone; the later stages train by the forward KL only, from a
  proposal frozen at each stage's start, with a learning-rate warm-up.
"""

RECIPE_KEYS = ("coarse_sampler", "pool_levels", "pool_warmup", "reverse_weight",
               "frozen_proposal", "lr_warmup")
"""The options a recipe may set."""


def recipe_options(recipe, **given):
    """The recipe's values for :data:`RECIPE_KEYS`, with the ``given`` ones (not None)
    overriding them and :class:`TrainOptions` defaults for the rest.

    Raises:
        ValueError: an unknown recipe.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
    defaults = {k: getattr(TrainOptions, k) for k in RECIPE_KEYS}
    chosen = {**defaults, **RECIPES[recipe]}
    return {k: chosen[k] if given.get(k) is None else given[k] for k in RECIPE_KEYS}


# -- the flow -----------------------------------------------------------------------------------

UPSAMPLINGS = ("prior", "nearest", "squeeze")
FLOW_BLOCKS = ("glow", "iaf")
"""The kinds of flow F_l inside the MsIGN: Glow blocks, or MADE maps in the IAF direction."""


@dataclass(frozen=True)
class FlowConfig:
    """The MsIGN network of the flow kinds (``sampler.blocks``, ``.hidden``, ``.upsampling``).

    Each field's metadata holds its documentation and an example value, from which the case
    schema and docs/case-files.md are derived.
    """

    blocks: int = dataclasses.field(default=4, metadata={
        "doc": "Glow blocks per level.", "example": "6"})
    hidden: int = dataclasses.field(default=32, metadata={
        "doc": "Hidden channels of the coupling networks.", "example": "64"})
    upsampling: str = dataclasses.field(default="prior", metadata={
        "doc": "Flows: how a level is refined, `prior` (the prior conditioning layer of MsIGN), "
               "or the ablations `nearest` (stochastic nearest-neighbour upsampling) and "
               "`squeeze` (Glow's split/squeeze).", "example": "nearest"})
    flow: str = dataclasses.field(default="glow", metadata={
        "doc": "Flows F_l of the MsIGN: `glow` (affine-coupling Glow blocks) or `iaf` (`blocks` "
               "MADE maps in the inverse autoregressive direction on each level's field: fast "
               "draws, d sequential passes for the density of a given field).",
        "example": "iaf"})

    def __post_init__(self):
        for name, low in (("blocks", 1), ("hidden", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.upsampling not in UPSAMPLINGS:
            raise ValueError(f"upsampling must be one of {UPSAMPLINGS}, got "
                             f"{self.upsampling!r}")
        if self.flow not in FLOW_BLOCKS:
            raise ValueError(f"flow must be one of {FLOW_BLOCKS}, got {self.flow!r}")

    def model_options(self):
        """The keywords of :class:`~geoinvert.flows.msign.MsIGN`."""
        return {"blocks_per_level": self.blocks, "hidden": self.hidden,
                "upsampling": self.upsampling, "flow": self.flow}


# -- MCMC kinds -------------------------------------------------------------------------------

CHAIN_KINDS = ("pcn", "mala", "hmc", "gpcn")
"""Sampler kinds that run chains on the finest level (gpCN in the Laplace coordinates)."""


def _chain_field(default, doc, example, kinds=CHAIN_KINDS):
    return dataclasses.field(default=default, metadata={"doc": doc, "example": example,
                                                        "kinds": kinds})


@dataclass(frozen=True)
class ChainConfig:
    """Settings of the MCMC kinds (the case file's ``sampler.chains`` ... ``sampler.leapfrog``).

    Each field's metadata holds its documentation, an example value and the kinds it applies
    to, from which the case schema, its validation by kind and docs/case-files.md are derived.
    """

    chains: int = _chain_field(4, "MCMC kinds: chains run side by side.", "8")
    draws: int = _chain_field(1000, "MCMC kinds: draws kept per chain after warm-up.", "5000")
    warmup: int = _chain_field(500, "MCMC kinds: adaptation iterations per chain, discarded.",
                               "1000")
    thin: int = _chain_field(1, "MCMC kinds: iterations per kept draw.", "10")
    step_size: float = _chain_field(
        None, "MCMC kinds: initial step (pCN and gpCN beta in (0, 1]; default 0.2 for pcn and "
        "hmc, 0.5 for mala and gpcn), adapted during warm-up.", "0.1")
    leapfrog: int = _chain_field(10, "HMC: leapfrog steps per transition.", "20", ("hmc",))

    def __post_init__(self):
        for name, low in (("chains", 1), ("draws", 1), ("warmup", 0), ("thin", 1),
                          ("leapfrog", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size!r}")

    def solves(self, kind):
        """Forward solves of the chains of ``kind`` (not counting gpCN's Laplace fit)."""
        per_iteration = self.leapfrog if kind == "hmc" else 1
        return self.chains * (self.warmup + self.draws * self.thin) * per_iteration


# -- the correction ---------------------------------------------------------------------------

CORRECTION_KERNELS = ("auto", "hmc", "mala", "pcn", "lifted", "none")
"""Local kernels of the correction; ``auto`` is HMC that may switch to ``lifted``
(:data:`LIFTED_BREAKEVEN`); ``none`` switches the correction off."""

LIFTED_SOLVES_PER_STEP = 8
"""Forward solves of a step of the lifted kernel, for planning: its two Newton solves (the
position step and the reversibility check) took about four iterations each on the suite's 8x8
ridges (``benchmarks/suite/lifted.py``)."""

LIFTED_BREAKEVEN = 16
"""HMC leapfrog steps per transition beyond which the ``auto`` kernel switches to ``lifted``.

An HMC transition costs one solve per leapfrog step; a lifted one about four steps of
:data:`LIFTED_SOLVES_PER_STEP` solves, 32, whatever the posterior's curvature (its metric
follows the ridge), and it gives about twice the bulk ESS per transition of a quarter-period
HMC transition: 11 to 18 bulk ESS per 1000 solves on ten problems, where HMC gives about
250 / L with L leapfrog steps (``benchmarks/results/lifted.md``). They break even near
32 / 2 = 16 steps."""

LIFTED_SOLVES_PER_ESS = 90
"""Forward solves per effective draw of the lifted kernel's chains, for the ``auto`` kernel's
second choice (after HMC's first block of draws, where HMC's own cost per effective draw is
measured): 56 to 91 (11.0 to 17.9 bulk ESS per 1000 solves) on the nine elliptic problems of
``benchmarks/results/lifted.md``, taken at the dearest."""

LIFTED_MAX_PARAMETERS = 1024
"""Most parameters (a 32x32 lattice) for which the ``auto`` kernel considers the lifted
kernel. It keeps the prior's whitening as a dense d x d matrix, and a Newton point costs
m d^2 operations for the Jacobian in whitened coordinates (m observations): for four chains
11.5 ms at 1024 parameters and 9 heads against 5.2 ms for HMC's log posterior and gradient,
259 ms at 4096 parameters and 16 heads against 11.9 ms (``benchmarks/results/pilot.md``, its
last columns), so that beyond 32x32 the dense algebra, not the solves, would set the wall
time."""

AUTOREGRESSIVE_KINDS = ("iaf", "composed")
"""Kinds whose approximation is an IAF (its density of a given field: one pass per parameter)."""

AUTOREGRESSIVE_LAPLACE_MAX = 1024
"""Most parameters (a 32x32 lattice) for which ``auto`` coordinates of an IAF's correction are
the Laplace ones. After a move in those coordinates the independence move needs the IAF's
density at the new field, one sequential pass per parameter: 2.7 s an iteration at 16x16
(256 passes), against 1-2 s for a 31-step HMC transition there, and growing with the
dimension, so that beyond 32x32 the passes cost more than the transitions and the flow's own
latent space is used. Measured on a composed posterior at 8x8 (benchmarks/composed.py's
Gaussian check): Laplace coordinates converged in 141,231 solves and 574 s (R-hat 1.008),
the flow's latent space had R-hat 1.032 after 266,959 solves and 1091 s."""

CORRECTION_COORDINATES = ("auto", "laplace", "flow")
"""Coordinates of the correction's local moves: the Laplace approximation at the MAP point (an
affine map) or the trained flow's latent space (NeuTra)."""


def _field(default, doc, example):
    return dataclasses.field(default=default, metadata={"doc": doc, "example": example})


@dataclasses.dataclass(frozen=True)
class CorrectionConfig:
    """Settings of the correction (the case file's ``sampler.correction`` section).

    Each field's metadata holds its one-line documentation and an example value, from which
    the case schema and docs/case-files.md are generated.
    """

    kernel: str = _field(
        "auto", "Local MCMC move (in the coordinates `coordinates` names): `hmc`, `mala`, "
        "`pcn`, `lifted` (constrained HMC on the manifold of fields and residuals, whose "
        "metric is the Gauss-Newton Hessian at every point: for thin curved posteriors of few, "
        "precise data; it moves in the prior's coordinates, needs the serial elliptic solver "
        "or a torch model and no `sampler.budget`), `none` "
        "(no correction: the result holds the flow's own draws), or `auto`: HMC, which "
        "switches to `lifted` at the end of the warm-up's first step-only phase when a "
        "quarter period there takes more than 16 leapfrog steps (the two kernels' break-even "
        "cost), or after its first block of draws when they cost so many solves per effective "
        "draw that `lifted` would finish sooner, and `lifted` can run (at most as many "
        "observations as parameters, "
        "at most 32x32 parameters, no `sampler.budget`).", "hmc")
    coordinates: str = _field(
        "auto", "Coordinates of the local moves: `laplace` (those of the Laplace "
        "approximation at the MAP point, an affine map found by L-BFGS and the Gauss-Newton "
        "Hessian), `flow` (the trained flow's latent space), or `auto`: `laplace`, except for "
        "the autoregressive kinds (`iaf`, `composed`) beyond 32x32 parameters, whose density "
        "at a field they did not draw costs one pass per parameter at every iteration: `flow` "
        "for them. The flow proposes the independence moves either way.", "flow")
    chains: int = _field(
        4, "Chains of the correction, started from flow draws (shared out over MPI solve "
        "groups: at least one per group).", "16")
    draws: int = _field(250, "Draws kept per chain after warm-up, at least; then, until "
                        "R-hat <= 1.01 and the bulk and tail ESS >= 400 (with several modes "
                        "found, that of the modes' shares of the draws too; or `max_draws`, "
                        "or `sampler.budget`), the chains go on by as many draws as R-hat and "
                        "ESS extrapolate to need, at most this many at a time.", "500")
    max_draws: int = _field(2000, "Most draws per chain (at least `draws`).", "4000")
    warmup: int = _field(
        250, "Warm-up iterations per chain (step size and metric adaptation), discarded; "
        "the kernel `lifted`, which has no metric, makes only the step-only 30 %.", "500")
    leapfrog: int = _field(128, "Most HMC (and `lifted`) leapfrog steps per transition: a "
                           "transition integrates for pi / 2 (a quarter period of the "
                           "metric-whitened posterior), pi / (2 step) steps, at most this "
                           "many.", "256")
    independence: bool = _field(
        True, "After every local move, an independence Metropolis-Hastings move with the "
        "flow as proposal (moves chains between the modes the flow covers); when the mode "
        "search found several modes, as many such moves as the HMC transition's leapfrog "
        "steps. (With several modes a mode jump also follows every local move, with or "
        "without these moves.)", "false")
    modes: bool = _field(
        True, "With independence moves: first search the posterior's modes (L-BFGS from "
        "eight prior draws, repeated from as many again, at least once when there are "
        "several modes and until every mode is reached from two draws, at most 128) and add a Laplace approximation at each to the "
        "independence proposal (half of the proposals), so that chains reach modes the flow "
        "misses.", "false")

    def resolved(self, kind, dim):
        """This config with ``auto`` coordinates resolved for sampler ``kind`` on ``dim``
        parameters: ``laplace``, except for an autoregressive approximation on more than
        :data:`AUTOREGRESSIVE_LAPLACE_MAX` parameters."""
        if self.coordinates != "auto":
            return self
        flow = kind in AUTOREGRESSIVE_KINDS and dim > AUTOREGRESSIVE_LAPLACE_MAX
        return dataclasses.replace(self, coordinates="flow" if flow else "laplace")

    def __post_init__(self):
        if self.kernel not in CORRECTION_KERNELS:
            raise ValueError(f"kernel must be one of {CORRECTION_KERNELS}, got {self.kernel!r}")
        if self.coordinates not in CORRECTION_COORDINATES:
            raise ValueError(f"coordinates must be one of {CORRECTION_COORDINATES}, got "
                             f"{self.coordinates!r}")
        for name, low in (("chains", 1), ("draws", 4), ("max_draws", 4), ("warmup", 0),
                          ("leapfrog", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    @property
    def enabled(self) -> bool:
        """False for kernel ``none``."""
        return self.kernel != "none"

    def warmup_iterations(self) -> int:
        """Warm-up iterations the kernel makes: ``warmup``, but the lifted kernel, which has
        no metric to estimate, skips the metric windows (:func:`metric_windows`) and keeps the
        step-only phases, 30 % (75 iterations at the default)."""
        if self.kernel != "lifted":
            return self.warmup
        return self.warmup - sum(hi - lo for lo, hi in metric_windows(self.warmup))

    @property
    def planned(self) -> str:
        """The kernel the plan counts on: ``auto`` starts as (and is planned as) HMC."""
        return "hmc" if self.kernel == "auto" else self.kernel

    def independence_moves(self, leapfrog, modes=1) -> int:
        """Independence moves after each local move: one, or with ``modes`` > 1 (the chains in
        per-mode coordinates, between which these moves alone carry them) as many as the HMC
        transition's ``leapfrog`` steps, the solves of the local move; 0 without them."""
        if not self.independence:
            return 0
        return leapfrog if modes > 1 and self.planned == "hmc" else 1

    @staticmethod
    def jumps(modes=1) -> int:
        """Mode jumps after each local move: one when the chains move in the coordinates of
        ``modes`` > 1 modes (:class:`~geoinvert.inference.correction.ModeCoordinates`), else
        none."""
        return 1 if modes > 1 else 0

    def solves_per_iteration(self, leapfrog=None, modes=1) -> int:
        """Forward solves of one iteration of one chain with ``leapfrog`` HMC steps (default
        the most, ``leapfrog``): the local move, its :meth:`independence_moves` and its
        :meth:`jumps`."""
        local = (leapfrog or self.leapfrog) if self.planned in ("hmc", "lifted") else 1
        moves = self.independence_moves(local, modes) + self.jumps(modes)
        return local * (LIFTED_SOLVES_PER_STEP if self.kernel == "lifted" else 1) + moves

    def solves(self, draws=None, leapfrog=None, modes=1) -> int:
        """Forward solves of the correction with ``draws`` draws per chain (default the
        fewest, ``draws``), at most: each chain's start, its re-evaluation at every metric
        update and its iterations (0 when switched off)."""
        if not self.enabled:
            return 0
        updates = len(metric_windows(self.warmup)) if self.planned in ("hmc", "mala") else 0
        iterations = self.warmup_iterations() + (self.draws if draws is None else draws)
        return self.chains * (1 + updates + iterations
                              * self.solves_per_iteration(leapfrog, modes))

    def reserved(self) -> int:
        """What a budget sets aside for the correction: :meth:`solves` with at most
        :data:`TYPICAL_LEAPFROG` HMC steps (with a budget the correction shortens its
        trajectories to fit its share)."""
        return self.solves(leapfrog=min(self.leapfrog, TYPICAL_LEAPFROG))

    def most_solves(self) -> int:
        """Forward solves of the correction if it runs to ``max_draws``."""
        return self.solves(max(self.draws, self.max_draws))


TYPICAL_LEAPFROG = 8
"""Leapfrog steps of a transition when the flow fits (a step near 0.2): the budget's share."""


def metric_windows(warmup):
    """``(start, end)`` of the metric-estimation windows within ``warmup`` iterations.

    A step-only phase (the first 15 %), windows to 40 % and to 85 % (the metric is updated at
    each window's end), then a step-only phase; no windows for fewer than 40 iterations.
    """
    if warmup < 40:
        return ()
    return (int(0.15 * warmup), int(0.4 * warmup)), (int(0.4 * warmup), int(0.85 * warmup))


def made_width(dim, hidden):
    """Hidden units of each MADE layer of an IAF on ``dim`` parameters: at least twice the
    dimension (a MADE narrower than its input cannot let every output depend on all its
    predecessors), at least ``hidden``, at most 1024 (memory grows with width x dimension)."""
    return int(min(max(2 * dim, hidden), 1024))
