"""The problems of the benchmark suite and their reference posteriors.

Every problem is a case (the dictionary a user would write as YAML) with no ``sampler``
section, so that a run uses the package defaults, and a reference posterior:

- ``exact``: linear-Gaussian problems (:class:`~geoinvert.problem.forward.testbeds.ExactLinearPosterior`,
  exact mean and std) and quadratic ones (:class:`~geoinvert.problem.forward.testbeds.ExactQuadraticPosterior`
  for any measurement function: t = <w, x> is the only data direction and x | t is the
  Gaussian prior conditional; mean and std from the conditional moments and 4e6 draws of t);
- ``reference``: elliptic problems, against a long MCMC run stored in
  ``benchmarks/suite/references/<name>.nc`` by ``benchmarks/suite/reference.py`` (or, for
  ``elliptic-bimodal``, ``benchmarks/results/reference_elliptic.nc`` of
  ``benchmarks/reference_elliptic.py``).

The quadratic problems place the data at y = (2 s_t)^2, s_t the prior std of t, so the modes
lie near t = +-2 s_t, and set the noise to a fraction of y: 0.05 (sharp, well separated
modes), 0.3 (the MsIGN paper's ratio) or 1.0 (modes merged into one broad hump).
"""

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

import geoinvert
from geoinvert.problem.forward.testbeds import (ExactLinearPosterior, ExactQuadraticPosterior,
                                                ExactQuadraticsPosterior)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
REFERENCES = HERE / "references"

PHI_A = "sin(pi*x) * sin(2*pi*y)"
PHI_B = {"shape": "gaussian", "center": [0.35, 0.65], "width": 0.2}
PHI_C = "sin(2*pi*x) * sin(pi*y)"
PHI_D = "sin(2*pi*x) * sin(2*pi*y)"


def _bumps(centres, width):
    return [{"shape": "gaussian", "center": list(c), "width": width} for c in centres]


def _grid(k, lo=0.2, hi=0.8):
    s = np.linspace(lo, hi, k)
    return [(float(a), float(b)) for b in s for a in s]


def _jittered(nx, ny, seed, lo=0.15, hi=0.85):
    """An ``nx`` by ``ny`` grid of points in [lo, hi]^2, each moved by up to a quarter spacing."""
    rng = np.random.default_rng(seed)
    xs, ys = np.linspace(lo, hi, nx), np.linspace(lo, hi, ny)
    dx, dy = (hi - lo) / (4 * (nx - 1)), (hi - lo) / (4 * (ny - 1))
    return [[float(a + rng.uniform(-dx, dx)), float(b + rng.uniform(-dy, dy))]
            for b in ys for a in xs]


def _shifted(config, amplitude=0.2):
    """``config`` with its prior mean moved to ``amplitude * phi_a``: the prior then favours
    one sign of t, and the two modes get unequal masses."""
    config["prior"]["mean"] = f"{amplitude} * sin(pi*x) * sin(2*pi*y)"
    return config


def _base(name, finest, prior, forward, observations, data, noise, **extra):
    return {"name": name, "domain": {"bounds": [0, 1, 0, 1], "units": "1"},
            "levels": {"finest": finest, **extra.pop("levels", {})}, "prior": prior,
            "forward": forward, "observations": observations, "data": data,
            "noise": {"std": noise}, **extra}


def _quadratic(name, finest, phi, ratio, correlation_length):
    """A quadratic problem with its data at (2 s_t)^2 and noise ``ratio`` times that."""
    prior = {"kind": "matern", "std": 1.0, "correlation_length": correlation_length}
    config = _base(name, finest, prior, {"kind": "quadratic"}, {"functions": [phi]},
                   {"values": [1.0]}, 1.0)
    case = geoinvert.load_case(config)
    w = case.forward(finest).functional
    s_t = math.sqrt(float(w @ case.prior().covariance(finest) @ w))
    y = (2 * s_t) ** 2
    config["data"] = {"values": [y]}
    config["noise"] = {"std": ratio * y}
    return config


def _quadratics(name, finest, phis, ratio, correlation_length):
    """A quadratic problem with one observation per function, each at (2 s_t)^2 of its own
    prior std s_t, with noise ``ratio`` times that."""
    parts = [_quadratic(name, finest, phi, ratio, correlation_length) for phi in phis]
    config = parts[0]
    config["observations"] = {"functions": list(phis)}
    config["data"] = {"values": [p["data"]["values"][0] for p in parts]}
    config["noise"] = {"std": [p["noise"]["std"] for p in parts]}
    return config


@dataclasses.dataclass
class Problem:
    """A suite problem: its case, what the reference is, and what it tests."""

    name: str
    about: str
    config: dict
    reference: str                 # "exact" or the path of a reference netCDF
    bimodal: bool = False

    def case(self):
        return geoinvert.load_case(self.config, folder=ROOT)


def problems():
    """The suite, cheapest first."""
    demo = geoinvert.load_case(ROOT / "cases" / "default.yaml").config
    bimodal = geoinvert.load_case(ROOT / "cases" / "elliptic_bimodal.yaml").config
    def plain(config):       # the shipped case without its sampler settings
        out = {k: v for k, v in config.items() if k != "sampler"}
        out["output"] = {"direction": config["output"]["direction"]} \
            if config["output"].get("direction") else {}
        return out
    return [
        Problem("linear-matern-16", "linear, 16x16 Matern prior, 5 integral observations",
                _base("linear-matern-16", 4,
                      {"kind": "matern", "std": 1.0, "correlation_length": 0.2},
                      {"kind": "linear"},
                      {"functions": _bumps([(0.25, 0.25), (0.75, 0.25), (0.5, 0.5),
                                            (0.25, 0.75), (0.75, 0.75)], 0.1)},
                      {"synthetic": {"truth": "prior", "seed": 3}}, 0.01), "exact"),
        Problem("linear-iid-64", "linear, 64x64 iid prior, 16 integral observations",
                _base("linear-iid-64", 6, {"kind": "iid", "std": 1.0}, {"kind": "linear"},
                      {"functions": _bumps(_grid(4), 0.08)},
                      {"synthetic": {"truth": "prior", "seed": 4}}, 0.01), "exact"),
        Problem("quadratic-a-sharp", "quadratic, 16x16, phi_a, noise 0.05 y: two separated "
                "modes", _quadratic("quadratic-a-sharp", 4, PHI_A, 0.05, 0.2), "exact", True),
        Problem("quadratic-a-paper", "quadratic, 16x16, phi_a, noise 0.3 y (the MsIGN paper's "
                "ratio)", _quadratic("quadratic-a-paper", 4, PHI_A, 0.3, 0.2), "exact", True),
        Problem("quadratic-a-broad", "quadratic, 16x16, phi_a, noise 1.0 y: one broad hump",
                _quadratic("quadratic-a-broad", 4, PHI_A, 1.0, 0.2), "exact", True),
        Problem("quadratic-b-sharp", "quadratic, 32x32, phi_b (a bump, no eigenvector), noise "
                "0.05 y", _quadratic("quadratic-b-sharp", 5, PHI_B, 0.05, 0.3), "exact", True),
        Problem("quadratic-b-paper", "quadratic, 32x32, phi_b, noise 0.3 y",
                _quadratic("quadratic-b-paper", 5, PHI_B, 0.3, 0.3), "exact", True),
        Problem("elliptic-demo", "elliptic, 8x8 Matern prior, 9 point heads, noise 0.005 "
                "(cases/default.yaml)", plain(demo), str(REFERENCES / "elliptic-demo.nc")),
        Problem("elliptic-iid-16", "elliptic, 16x16 iid prior, 16 integral observations",
                _base("elliptic-iid-16", 4, {"kind": "iid", "std": 0.8},
                      {"kind": "elliptic", "source": 1.0,
                       "dirichlet": {"left": 1.0, "right": 0.0}},
                      {"functions": _bumps(_grid(4), 0.1)},
                      {"synthetic": {"truth": "prior", "seed": 5}}, 0.002),
                str(REFERENCES / "elliptic-iid-16.nc")),
        Problem("elliptic-iid-8-heads", "elliptic, 8x8 iid prior (std 2), 169 point heads on "
                "a 13x13 grid, noise 0.05, zero heads on the boundary (the layout of Aristoff "
                "and Bangerth's benchmark, with a truth of its own)",
                _base("elliptic-iid-8-heads", 3, {"kind": "iid", "std": 2.0},
                      {"kind": "elliptic", "source": 10.0, "dirichlet": {"all": 0.0}},
                      {"points": [[i / 14, j / 14] for j in range(1, 14)
                                  for i in range(1, 14)]},
                      {"synthetic": {"truth": [
                          {"shape": "box", "x": [0.125, 0.5], "y": [0.5, 0.875],
                           "value": -2.3},
                          {"shape": "box", "x": [0.625, 0.875], "y": [0.125, 0.375],
                           "value": 2.3}], "seed": 6}}, 0.05,
                      levels={"min_cells": 32}),
                str(REFERENCES / "elliptic-iid-8-heads.nc")),
        Problem("elliptic-bimodal", "elliptic, 16x16, mirror-symmetric, two halves of equal "
                "mass (cases/elliptic_bimodal.yaml)", plain(bimodal),
                str(REFERENCES / "elliptic-bimodal.nc"), True),
    ]


def heldout():
    """Held-out problems: never used to choose a setting, only to check the defaults on
    problems they were not chosen on (``run.py --heldout``)."""
    aquifer = geoinvert.load_case(ROOT / "cases" / "aquifer.yaml").config
    aquifer = {k: v for k, v in aquifer.items() if k not in ("sampler", "output")}
    aquifer["data"] = {"file": "cases/" + aquifer["data"]["file"]}
    wells = [[0.15, 0.2], [0.45, 0.15], [0.8, 0.25], [0.3, 0.45], [0.6, 0.4], [0.9, 0.55],
             [0.1, 0.7], [0.4, 0.75], [0.7, 0.7], [0.25, 0.9], [0.55, 0.95], [0.85, 0.85]]
    return [
        Problem("heldout-neumann-8", "elliptic, 8x8 Matern prior (std 1.2, correlation 0.2, "
                "mean sloping in y), inflow through the bottom, u = 0 on top, no source, five "
                "heads and two integrals of u, noise 0.01",
                _base("heldout-neumann-8", 3,
                      {"kind": "matern", "std": 1.2, "correlation_length": 0.2,
                       "mean": "0.3 - 0.5 * y"},
                      {"kind": "elliptic", "source": 0.0, "dirichlet": {"top": 0.0},
                       "neumann": {"bottom": 1.0}},
                      {"points": [[0.2, 0.3], [0.5, 0.2], [0.8, 0.35], [0.35, 0.65],
                                  [0.7, 0.7]],
                       "functions": [{"shape": "gaussian", "center": [0.5, 0.5],
                                      "width": 0.15}, "x * (1 - x)"]},
                      {"synthetic": {"truth": {"shape": "box", "x": [0.3, 0.7],
                                               "y": [0.4, 0.6], "value": -1.0}, "seed": 7}},
                      0.01, levels={"min_cells": 16}),
                str(REFERENCES / "heldout-neumann-8.nc")),
        Problem("heldout-iid-16-wells", "elliptic, 16x16 iid prior, u = 2 on the left and 0 "
                "on the right, a source near the top left, twelve irregular wells, noise 0.02",
                _base("heldout-iid-16-wells", 4, {"kind": "iid", "std": 1.0},
                      {"kind": "elliptic",
                       "source": {"shape": "gaussian", "center": [0.3, 0.7], "width": 0.1,
                                  "amplitude": 5.0},
                       "dirichlet": {"left": 2.0, "right": 0.0}},
                      {"points": wells},
                      {"synthetic": {"truth": "prior", "seed": 8}}, 0.02),
                str(REFERENCES / "heldout-iid-16-wells.nc")),
        Problem("heldout-unequal-a-sharp", "quadratic, 16x16, phi_a, noise 0.05 y, prior mean "
                "0.2 phi_a: two sharp modes of unequal mass (88 % at t > 0)",
                _shifted(_quadratic("heldout-unequal-a-sharp", 4, PHI_A, 0.05, 0.2)),
                "exact", True),
        Problem("heldout-unequal-b-paper", "quadratic, 32x32, phi_b, noise 0.3 y, prior mean "
                "0.2 phi_a: two overlapping modes of unequal mass (39 % at t > 0)",
                _shifted(_quadratic("heldout-unequal-b-paper", 5, PHI_B, 0.3, 0.3)),
                "exact", True),
        Problem("heldout-contrast-16", "elliptic, 16x16 Matern prior (std 2, correlation "
                "0.15): strong contrasts, u = 1 on the left and 0 on the right, 20 heads on a "
                "jittered grid, noise 0.01",
                _base("heldout-contrast-16", 4,
                      {"kind": "matern", "std": 2.0, "correlation_length": 0.15},
                      {"kind": "elliptic", "source": 0.0,
                       "dirichlet": {"left": 1.0, "right": 0.0}},
                      {"points": _jittered(5, 4, seed=9)},
                      {"synthetic": {"truth": "prior", "seed": 9}}, 0.01),
                str(REFERENCES / "heldout-contrast-16.nc")),
        Problem("heldout-tiny-4", "elliptic, 4x4 iid prior, a uniform source, u = 0 on the "
                "boundary, four heads, noise 0.01 (the smallest lattice: two stages)",
                _base("heldout-tiny-4", 2, {"kind": "iid", "std": 1.0},
                      {"kind": "elliptic", "source": 1.0, "dirichlet": {"all": 0.0}},
                      {"points": [[0.3, 0.3], [0.7, 0.3], [0.3, 0.7], [0.7, 0.7]]},
                      {"synthetic": {"truth": "prior", "seed": 10}}, 0.01,
                      levels={"min_cells": 16}),
                str(REFERENCES / "heldout-tiny-4.nc")),
        Problem("heldout-precise-8", "elliptic, 8x8 Matern prior (std 1, correlation 0.3), "
                "a uniform source, u = 0 on the boundary, 25 heads, noise 0.001 (very precise "
                "data: a thin curved ridge)",
                _base("heldout-precise-8", 3,
                      {"kind": "matern", "std": 1.0, "correlation_length": 0.3},
                      {"kind": "elliptic", "source": 1.0, "dirichlet": {"all": 0.0}},
                      {"points": _grid(5, 0.15, 0.85)},
                      {"synthetic": {"truth": "prior", "seed": 11}}, 0.001,
                      levels={"min_cells": 16}),
                str(REFERENCES / "heldout-precise-8.nc")),
        Problem("heldout-hard-16", "elliptic, 16x16 Matern prior (std 1, correlation 0.25), "
                "u = 1 on the left and 0 on the right, a uniform source, heads at eight wells "
                "and the log-coefficient measured at four of them (hard data, noise 0.01), "
                "heads noise 0.01",
                _base("heldout-hard-16", 4,
                      {"kind": "matern", "std": 1.0, "correlation_length": 0.25},
                      {"kind": "elliptic", "source": 0.5,
                       "dirichlet": {"left": 1.0, "right": 0.0}},
                      {"points": [[0.2, 0.25], [0.5, 0.2], [0.8, 0.3], [0.3, 0.55],
                                  [0.65, 0.5], [0.15, 0.8], [0.5, 0.85], [0.85, 0.75]],
                       "hard_data": {"points": [[0.2, 0.25], [0.8, 0.3], [0.65, 0.5],
                                                [0.5, 0.85]]}},
                      {"synthetic": {"truth": "prior", "seed": 12}}, 0.01),
                str(REFERENCES / "heldout-hard-16.nc")),
        Problem("heldout-four-modes", "quadratic, 16x16, two measurement functions (phi_a "
                "and sin(2 pi x) sin(pi y), independent under the prior), noise 0.1 y, prior "
                "mean 0.15 phi_a: four separated modes in two pairs of unequal mass",
                _shifted(_quadratics("heldout-four-modes", 4, [PHI_A, PHI_C], 0.1, 0.2),
                         0.15), "exact", True),
        Problem("heldout-eight-modes", "quadratic, 16x16, three measurement functions "
                "(phi_a, sin(2 pi x) sin(pi y) and sin(2 pi x) sin(2 pi y), independent under "
                "the prior), noise 0.1 y, prior mean 0.15 phi_a: eight separated modes",
                _shifted(_quadratics("heldout-eight-modes", 4, [PHI_A, PHI_C, PHI_D], 0.1,
                                     0.2), 0.15), "exact", True),
        Problem("heldout-aquifer", "elliptic, 32x32 on a 2 km x 1 km aquifer, Matern prior "
                "(mean 4.6, std 0.7, correlation 400 m), river and canal heads, recharge, "
                "nine wells read from a CSV, noise 0.05 m (cases/aquifer.yaml without its "
                "sampler settings)", aquifer, str(REFERENCES / "heldout-aquifer.nc")),
    ] + _heldout_later()


def _heldout_later():
    """Held-out problems written after the defaults were last changed, to check them again:
    other lattices, priors, boundaries, domains and observations than those above."""
    bump = {"shape": "gaussian", "center": [0.7, 0.3], "width": 0.15}
    return [
        Problem("heldout-quadratic-c-8", "quadratic, 8x8, sin(2 pi x) sin(pi y), noise 0.1 y, "
                "correlation 0.25: two separated modes on the smallest quadratic lattice",
                _quadratic("heldout-quadratic-c-8", 3, PHI_C, 0.1, 0.25), "exact", True),
        Problem("heldout-linear-iid-32", "linear, 32x32 iid prior (std 1.5), nine integral "
                "observations, noise 0.02",
                _base("heldout-linear-iid-32", 5, {"kind": "iid", "std": 1.5}, {"kind": "linear"},
                      {"functions": _bumps(_grid(3), 0.12)},
                      {"synthetic": {"truth": "prior", "seed": 21}}, 0.02), "exact"),
        Problem("heldout-linear-rough-16", "linear, 16x16 rough Matern prior (std 2, "
                "correlation 0.1), twelve narrow integral observations, noise 0.005",
                _base("heldout-linear-rough-16", 4,
                      {"kind": "matern", "std": 2.0, "correlation_length": 0.1},
                      {"kind": "linear"},
                      {"functions": _bumps([(0.15 + 0.7 * i / 3, 0.2 + 0.6 * j / 2)
                                            for j in range(3) for i in range(4)], 0.05)},
                      {"synthetic": {"truth": "prior", "seed": 22}}, 0.005), "exact"),
        Problem("heldout-unequal-bump-32", "quadratic, 32x32, a bump at (0.7, 0.3), noise "
                "0.03 y, prior mean 0.1 phi_a: two very sharp modes of unequal mass",
                _shifted(_quadratic("heldout-unequal-bump-32", 5, bump, 0.03, 0.25), 0.1),
                "exact", True),
        Problem("heldout-four-overlapping", "quadratic, 16x16, phi_a and sin(2 pi x) sin(pi y), "
                "noise 0.3 y: four overlapping modes of equal mass",
                _quadratics("heldout-four-overlapping", 4, [PHI_A, PHI_C], 0.3, 0.2), "exact",
                True),
        Problem("heldout-quadratic-d-64", "quadratic, 64x64 (4096 parameters), sin(2 pi x) "
                "sin(2 pi y), noise 0.2 y, correlation 0.15",
                _quadratic("heldout-quadratic-d-64", 6, PHI_D, 0.2, 0.15), "exact", True),
        Problem("heldout-mixed-8", "elliptic, 8x8 iid prior, u = 1 at the bottom and 0 on top, "
                "inflow through the left side, a Gaussian source, six heads and one integral of "
                "u, noise 0.02",
                _base("heldout-mixed-8", 3, {"kind": "iid", "std": 1.0},
                      {"kind": "elliptic",
                       "source": {"shape": "gaussian", "center": [0.5, 0.5], "width": 0.15,
                                  "amplitude": 3.0},
                       "dirichlet": {"bottom": 1.0, "top": 0.0}, "neumann": {"left": 0.5}},
                      {"points": [[0.2, 0.2], [0.6, 0.15], [0.85, 0.4], [0.4, 0.5],
                                  [0.15, 0.8], [0.7, 0.8]],
                       "functions": [{"shape": "gaussian", "center": [0.5, 0.5],
                                      "width": 0.2}]},
                      {"synthetic": {"truth": "prior", "seed": 31}}, 0.02,
                      levels={"min_cells": 16}),
                str(REFERENCES / "heldout-mixed-8.nc")),
        Problem("heldout-rect-8", "elliptic, 8x8 on a 2 x 1 rectangle, Matern prior (std 1.3, "
                "correlation 0.4), u = 1 on the left and 0 on the right, a high-permeability "
                "block, eight heads, noise 0.01",
                {**_base("heldout-rect-8", 3,
                         {"kind": "matern", "std": 1.3, "correlation_length": 0.4},
                         {"kind": "elliptic", "source": 0.0,
                          "dirichlet": {"left": 1.0, "right": 0.0}},
                         {"points": [[0.3, 0.3], [0.7, 0.7], [1.0, 0.2], [1.0, 0.5], [1.2, 0.8],
                                     [1.5, 0.35], [1.7, 0.65], [0.5, 0.5]]},
                         {"synthetic": {"truth": {"shape": "box", "x": [0.8, 1.3],
                                                  "y": [0.3, 0.7], "value": 1.2},
                                        "seed": 32}}, 0.01, levels={"min_cells": 16}),
                 "domain": {"bounds": [0, 2, 0, 1], "units": "1"}},
                str(REFERENCES / "heldout-rect-8.nc")),
        Problem("heldout-integrals-16", "elliptic, 16x16 Matern prior (std 1.5, correlation "
                "0.2), u = 0 on the boundary, source 2, nine integral observations only, noise "
                "0.005",
                _base("heldout-integrals-16", 4,
                      {"kind": "matern", "std": 1.5, "correlation_length": 0.2},
                      {"kind": "elliptic", "source": 2.0, "dirichlet": {"all": 0.0}},
                      {"functions": _bumps(_grid(3), 0.12)},
                      {"synthetic": {"truth": {"shape": "gaussian", "center": [0.35, 0.6],
                                               "width": 0.15, "amplitude": 1.5},
                                     "seed": 33}}, 0.005),
                str(REFERENCES / "heldout-integrals-16.nc")),
    ] + _heldout_features()


def _mirror_pairs(xs, ys, width):
    """Sensors of a problem symmetric under s2 -> 1 - s2: at each x, a Gaussian at y and its
    mirror image at 1 - y summed into one observation for every y < 1/2, and one on the axis."""
    def bump(x, y):
        return {"shape": "gaussian", "center": [x, y], "width": width}
    return [f for x in xs for f in ([[bump(x, y), bump(x, round(1 - y, 6))] for y in ys]
                                    + [[bump(x, 0.5)]])]


def _heldout_features():
    """Held-out problems on what the others leave out: a 64x64 elliptic field (4096
    parameters), triangles with quadratic elements and almost no data, and a mirror-symmetric
    elliptic posterior whose two modes are joined by a shallow saddle (2.9 nats below the MAP,
    `benchmarks/elliptic_modes.py`), where chains may cross between them now and then."""
    return [
        Problem("heldout-elliptic-64", "elliptic, 64x64 Matern prior (std 1, correlation "
                "0.2), u = 1 on the left and 0 on the right, a uniform source, 16 heads on a "
                "grid, noise 0.01 (4096 parameters)",
                _base("heldout-elliptic-64", 6,
                      {"kind": "matern", "std": 1.0, "correlation_length": 0.2},
                      {"kind": "elliptic", "source": 1.0,
                       "dirichlet": {"left": 1.0, "right": 0.0}},
                      {"points": _grid(4)},
                      {"synthetic": {"truth": "prior", "seed": 5}}, 0.01),
                str(REFERENCES / "heldout-elliptic-64.nc")),
        Problem("heldout-triangles-16", "elliptic, 16x16 Matern prior (std 1, correlation "
                "0.25) on a triangle mesh with quadratic elements, u = 0 on the boundary, a "
                "uniform source, one head and one integral of u, noise 0.002 (a posterior close "
                "to the prior)",
                {**_base("heldout-triangles-16", 4,
                         {"kind": "matern", "std": 1.0, "correlation_length": 0.25},
                         {"kind": "elliptic", "degree": 2, "source": 1.0,
                          "dirichlet": {"all": 0.0}},
                         {"points": [[0.5, 0.5]],
                          "functions": [{"shape": "gaussian", "center": [0.3, 0.7],
                                         "width": 0.15}]},
                         {"synthetic": {"truth": "prior", "seed": 6}}, 0.002),
                 "domain": {"bounds": [0, 1, 0, 1], "units": "1", "cell": "triangle"}},
                str(REFERENCES / "heldout-triangles-16.nc")),
        Problem("heldout-mirror-16", "elliptic, 16x16 Matern prior (std 1, correlation 1, "
                "alpha 3), symmetric under s2 -> 1 - s2: u = 0 on the left and right, inflow "
                "0.5 through the top and bottom, a uniform source, 15 mirrored sensor pairs and "
                "5 on the axis, an asymmetric truth, noise 1e-4: two modes of equal mass with a "
                "shallow saddle between them",
                {**_base("heldout-mirror-16", 4,
                         {"kind": "matern", "std": 1.0, "correlation_length": 1.0, "alpha": 3},
                         {"kind": "elliptic", "source": 1.0,
                          "dirichlet": {"left": 0.0, "right": 0.0},
                          "neumann": {"top": 0.5, "bottom": 0.5}},
                         {"functions": _mirror_pairs((0.15, 0.35, 0.5, 0.65, 0.85),
                                                     (0.1, 0.25, 0.4), 0.05)},
                         {"synthetic": {"truth": {"shape": "gaussian", "center": [0.5, 0.25],
                                                  "width": 0.25, "amplitude": 3.0},
                                        "seed": 3}}, 1e-4,
                         levels={"refine": 1, "min_cells": 32}),
                 "output": {"direction": "exp(-((x-0.5)^2 + (y-0.25)^2)/0.045) - "
                                         "exp(-((x-0.5)^2 + (y-0.75)^2)/0.045)"}},
                str(REFERENCES / "heldout-mirror-16.nc"), True),
    ]


def by_name(name):
    if name.startswith("drawn-"):           # a problem drawn at random (drawn.py)
        from drawn import by_seed_name
        found = by_seed_name(name)
        if found is not None:
            return found
    for p in problems() + heldout():
        if p.name == name:
            return p
    raise SystemExit(f"no suite problem {name!r}; known: "
                     f"{[p.name for p in problems() + heldout()]}")


# -- references ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Reference:
    """Mean and std ``(n, n)``, the data direction (bimodal problems, ``(n, n)``), exact
    samples and the exact log density (exact problems), and the exact 1-D statistics of
    t = <direction, x>."""

    mean: np.ndarray
    std: np.ndarray
    direction: np.ndarray = None
    exact: object = None
    samples: np.ndarray = None
    t_stats: dict = None
    about: str = ""
    orthants: np.ndarray = None     # several data directions: exact mass of each orthant


def _t_stats(t):
    """Mass of t > 0, centre and width of each side, and the mass between the modes
    (|t| below half the mean |t|)."""
    t = np.asarray(t, float)
    half = 0.5 * np.abs(t).mean()
    out = {"positive": float((t > 0).mean()), "between": float((np.abs(t) < half).mean()),
           "between_threshold": float(half)}
    for side, sel in (("plus", t > 0), ("minus", t < 0)):
        out[f"centre_{side}"] = float(t[sel].mean()) if sel.any() else math.nan
        out[f"width_{side}"] = float(t[sel].std()) if sel.sum() > 1 else math.nan
    return out


def reference(problem):
    """The :class:`Reference` of ``problem``."""
    case = problem.case()
    level, shape = case.finest, (2 ** case.finest,) * 2
    prior = case.prior()
    if problem.reference == "exact":
        forward = case.forward(level)
        mean0, cov = prior.mean(level).ravel(), prior.covariance(level)
        if case.config["forward"]["kind"] == "linear":
            exact = ExactLinearPosterior(mean0, cov, forward.matrix, case.data, case.noise,
                                         shape=shape)
            return Reference(exact.mean.reshape(shape), np.sqrt(np.diag(exact.cov)).reshape(shape),
                             exact=exact, samples=exact.sample(4000, torch.Generator()
                                                               .manual_seed(11)).numpy(),
                             about="exact (Kalman)")
        if forward.n_obs > 1:
            return _orthant_reference(mean0, cov, forward.matrix, case, shape)
        w = forward.functional
        exact = ExactQuadraticPosterior(mean0, cov, w, case.data, case.noise, shape=shape)
        mean, var, (t,) = _conditional_moments(mean0, cov, [exact])
        return Reference(mean.reshape(shape), np.sqrt(var).reshape(shape), w.reshape(shape),
                         exact, exact.sample(4000, torch.Generator().manual_seed(13)).numpy(),
                         _t_stats(t), "exact (1-D quadrature, Matheron's rule)")
    import xarray as xr
    path = Path(problem.reference)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run benchmarks/suite/reference.py "
                                f"{problem.name} first")
    with xr.open_dataset(path) as ds:
        samples = ds["samples"].values.astype(np.float64)
        direction = None
        if problem.bimodal:
            direction = case.evaluate(case.config["output"]["direction"])
        ref = Reference(ds["mean"].values, ds["std"].values, direction, None, samples,
                        about=f"{ds.attrs.get('method', 'MCMC')}, {int(ds.attrs.get('nfs', 0))} "
                        f"nFS, R-hat {float(ds.attrs.get('rhat', ds.attrs.get('rhat_folded', math.nan))):.3f}")
    if direction is not None:
        ref.t_stats = _t_stats(samples.reshape(len(samples), -1) @ direction.ravel())
    return ref


# -- scores -------------------------------------------------------------------------------------


def _conditional_moments(mean0, cov, parts):
    """Mean and variance ``(d,)`` of quadratic posteriors whose data directions t_k are
    independent under the prior N(mean0, cov) (``parts``: their
    :class:`ExactQuadraticPosterior`), from the prior conditional given t and 4e6 draws of
    each t_k (seeds 12, 13, ...), which are returned too."""
    mean, var, draws = mean0, np.diag(cov), []
    for k, part in enumerate(parts):
        t = part.sample_t(4_000_000, torch.Generator().manual_seed(12 + k)).numpy()
        sw, s2 = part._Sw, part.t_std ** 2
        mean = mean + sw * (t.mean() - part.t_mean) / s2
        var = var - sw ** 2 / s2 + sw ** 2 * t.var() / s2 ** 2
        draws.append(t)
    return mean, var, draws


def _orthant_reference(mean0, cov, W, case, shape):
    """Several quadratic observations independent under the prior: the exact posterior, its
    moments (:func:`_conditional_moments`) and its orthant masses."""
    exact = ExactQuadraticsPosterior(mean0, cov, W, case.data, case.noise, shape=shape)
    mean, var, _ = _conditional_moments(mean0, cov, exact.parts)
    return Reference(mean.reshape(shape), np.sqrt(var).reshape(shape), exact=exact,
                     samples=exact.sample(4000, torch.Generator().manual_seed(13)).numpy(),
                     orthants=exact.orthant_masses(),
                     about="exact (1-D quadrature per direction, Matheron's rule)")


def scores(ref, samples):
    """Per-cell errors of ``samples (N, n, n)`` in reference-std units and, for bimodal
    problems, the 1-D statistics along the data direction against the reference's."""
    x = np.asarray(samples, float).reshape(len(samples), -1)
    m, s = ref.mean.ravel(), ref.std.ravel()
    out = {"mean_error_rms": float(np.sqrt(np.mean(((x.mean(0) - m) / s) ** 2))),
           "mean_error_max": float(np.max(np.abs(x.mean(0) - m) / s)),
           "std_error_rms": float(np.sqrt(np.mean((x.std(0, ddof=1) / s - 1) ** 2)))}
    if ref.orthants is not None:
        got = np.bincount(ref.exact.orthant(torch.as_tensor(x)).numpy(),
                          minlength=len(ref.orthants)) / len(x)
        out["orthants"], out["orthants_ref"] = got.tolist(), ref.orthants.tolist()
        out["orthant_error"] = float(np.abs(got - ref.orthants).max())
    if ref.t_stats is not None:
        t = x @ ref.direction.ravel()
        got = _t_stats(t)
        half = ref.t_stats["between_threshold"]
        got["between"] = float((np.abs(t) < half).mean())
        for key in ("positive", "between", "centre_plus", "centre_minus", "width_plus",
                    "width_minus"):
            out[f"t_{key}"] = got[key]
            out[f"t_{key}_ref"] = ref.t_stats[key]
    return out
