"""The correction's convergence block by block: R-hat, ESS and errors against the solves.

Usage (one problem, five variants of the correction's settings; several problems give one
results set with a section each)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/suite/correction_trace.py elliptic-demo

The correction (:func:`geoinvert.inference.correction.correct`) runs alone, without a flow: HMC
in the coordinates of the problem's Laplace fit, from Laplace draws, with the package's
warm-up (step and dense-metric adaptation) and no independence moves, for ``--max-draws``
draws per chain, in five variants: the package's settings (4 chains, warm-up 250, at most 128
leapfrog steps), at most 16 leapfrog steps, 8 chains (the default before), 4 chains with twice
the warm-up (the solves of 8 chains' warm-up, so that the metric windows hold as many draws),
and NUTS in place of the fixed-length HMC transitions (``nuts.py``: each trajectory doubles
until it turns back, at most 255 leapfrog steps); ``--variants default,leapfrog64`` compares a
cap of 64 leapfrog steps (the default was 32 before it was raised to 128), and ``refmetric``
the metric fixed to the reference draws' covariance (the best fixed metric, which the warm-up's
estimate can at most reach), ``blockmetric`` the metric re-estimated after every block from
all the chains' draws so far, ``trajmetric`` the warm-up's metric estimated from every leapfrog
point of its windows' finite trajectories instead of the transitions' end points alone (the
Hamiltonian flow keeps the posterior, so each point is nearly a posterior draw: some thirty
times the points at no more solves), and ``fishermetric`` the affine map that minimises the
Fisher divergence to N(0, I) of a Gaussian fitted to the windows' draws and gradients (the
geometric mean of the draws' covariance and the inverse of the gradients' covariance, as
nutpie adapts its metric; the gradients come free with the draws), ``weightedmetric`` the
covariance of every point of the windows' trajectories weighted by exp(H_0 - H_k), its
Hamiltonian's change since the trajectory's start (for a start drawn from the posterior and a
fresh momentum the weighted points are exact draws, as the leapfrog map keeps volume: failed
and rejected trajectories weigh what their energy error says, unlike ``trajmetric``), and
``widewindow`` and ``onewindow`` other windows: the first ends at 30 % of the warm-up instead
of 40 %, so that the last holds 55 % of the iterations instead of 45 %, or a single window from
15 to 85 %.
After every block of
``--block`` draws it records the solves so far (the Laplace fit, made once and counted in every
variant, included), the largest split R-hat and smallest bulk and tail ESS (the package's
stopping rule wants R-hat <= 1.01 and both ESS >= 400), and the mean and std errors against the
suite reference; and, per variant, the bulk ESS gained per 1000 solves between the first and
the last block (the sampling's efficiency after warm-up). This shows which criterion binds
and what each costs.

Writes ``benchmarks/results/correction_trace.json`` and ``.md`` (``--name`` for another name).
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nuts import NUTSKernel  # noqa: E402
from problems import ROOT, by_name, reference, scores  # noqa: E402

from geoinvert.app import _convergence  # noqa: E402
from geoinvert.inference.config import CorrectionConfig  # noqa: E402
from geoinvert.inference import correction  # noqa: E402
from geoinvert.inference.correction import correct  # noqa: E402
from geoinvert.inference.laplace import fit_laplace  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


VARIANTS = {"default": {}, "leapfrog16": {"leapfrog": 16}, "leapfrog64": {"leapfrog": 64},
            "chains8": {"chains": 8}, "warmup500": {"warmup": 500}, "nuts": {"nuts": True},
            "refmetric": {"refmetric": True}, "blockmetric": {"blockmetric": True},
            "trajmetric": {"estimate": "trajectory"}, "fishermetric": {"estimate": "fisher"},
            "weightedmetric": {"estimate": "weighted"},
            "widewindow": {"windows": lambda w: ((int(0.15 * w), int(0.3 * w)),
                                                 (int(0.3 * w), int(0.85 * w)))},
            "onewindow": {"windows": lambda w: ((int(0.15 * w), int(0.85 * w)),)}}


def _geometric_mean(a, b):
    """A # B = A^1/2 (A^-1/2 B A^-1/2)^1/2 A^1/2 of symmetric positive definite matrices."""
    w, v = torch.linalg.eigh(a)
    half, inv = (v * w.sqrt()) @ v.T, (v / w.sqrt()) @ v.T
    w2, v2 = torch.linalg.eigh(inv @ b @ inv)
    return half @ ((v2 * w2.clamp(min=0).sqrt()) @ v2.T) @ half


def _traced(kernel, step, eps, generator):
    """``(acceptance, points)``: ``step(eps, generator)`` of an HMC ``kernel``, with the
    ``(u, log target, gradient)`` of every leapfrog point its target evaluated."""
    points, whitened = [], kernel.target.whitened

    def spy(u, **kw):
        out = whitened(u, **kw)
        points.append((u.detach(), out[1], out[2]))
        return out
    kernel.target.whitened = spy
    try:
        prob = step(eps, generator)
    finally:
        del kernel.target.whitened
    return prob, points


class _Recorder:
    """An HMC kernel factory whose kernels record, for every transition, the latent positions
    z = S u and gradients grad_z of the chains' states and (``trajectory``) of every leapfrog
    point of the finite trajectories; ``pool`` and ``metric`` estimate a window's metric from
    them."""

    def __init__(self, estimate, chains):
        self.estimate, self.chains, self.steps, self.window = estimate, chains, [], None

    def kernel(self, kind, target, x, config):
        recorder = self
        if self.estimate == "weighted":
            return _WeightedRecording(recorder, target, x,
                                      n_leapfrog=correction._leapfrog(0.3, config), jitter=0.2)

        class Recording(correction.HMCKernel):
            def step(self, eps, generator):
                prob, points = _traced(self, super().step, eps, generator)
                finite = torch.stack([torch.isfinite(v) for _, v, _ in points]).all(0)
                if recorder.estimate == "trajectory":
                    u = torch.cat([p[finite] for p, _, _ in points])
                    g = torch.cat([q[finite] for _, _, q in points])
                else:
                    u, g = self.z, self.grad
                recorder.steps.append((self.target.latent(u), recorder.to_z(self.target, g)))
                del recorder.steps[:-1000]        # more than any window holds
                return prob

        return Recording(target, x, n_leapfrog=correction._leapfrog(0.3, config), jitter=0.2)

    @staticmethod
    def to_z(target, g):
        """grad_z = S^-T grad_u."""
        s = target.factor
        if s is None:
            return g
        if s.ndim == 1:
            return g / s
        return torch.linalg.solve_triangular(s.T, g.T, upper=True).T

    def pool(self, z):
        """Take the metric window's recorded points in place of its ``z.shape[0] / chains``
        draws (the correction's ``pool``, called just before the window's metric)."""
        n = z.shape[0] // self.chains
        self.window = (torch.cat([a for a, _ in self.steps[-n:]]),
                       torch.cat([b for _, b in self.steps[-n:]]))
        return z

    def weighted_metric(self):
        """The factor of the window's importance-weighted covariance of every leapfrog point
        (``weighted``), shrunk as the correction's estimate is by the weights' effective
        number."""
        z, logw = self.window
        w = torch.exp(logw - logw.max())
        w = w / w.sum()
        n = 1.0 / float(w.square().sum())
        mean = (w[:, None] * z).sum(0)
        c = z - mean
        cov = (w[:, None] * c).T @ c
        keep = n / (n + correction._SHRINK)
        eye = torch.eye(z.shape[1], dtype=torch.float64)
        return torch.linalg.cholesky(keep * cov + (1 - keep) * 1e-3 * eye)

    def metric(self, z, dense):
        """In place of the correction's ``_metric``: the factor of the window's metric, dense
        whatever the window's size: the covariance of its points, or (``fisher``) the
        geometric mean of that covariance and the inverse covariance of the gradients, the
        affine map that minimises the Fisher divergence to N(0, I) for a Gaussian (the
        adaptation of nutpie, by Seyboldt, Carlson and Carpenter)."""
        if self.estimate == "weighted":
            return self.weighted_metric()
        z, g = self.window
        d, n = z.shape[1], z.shape[0]
        keep = n / (n + correction._SHRINK)
        eye = torch.eye(d, dtype=torch.float64)
        a = keep * torch.cov(z.T) + (1 - keep) * 1e-3 * eye
        if self.estimate == "fisher":
            b = keep * torch.cov(g.T) + (1 - keep) * 1e-3 * eye
            a = _geometric_mean(a, torch.linalg.inv(b))
            a = 0.5 * (a + a.T)
        return torch.linalg.cholesky(a)


class _WeightedRecording(correction.HMCKernel):
    """The correction's HMC transition, recording every point of its trajectory (the start
    included) with the importance weight exp(H_0 - H_k) relative to the start (0 where a
    solve failed): for a start drawn from pi x N(0, I) the leapfrog map keeps volume, so the
    weighted points are draws from pi (``weighted``). The kernel's own transition runs; the
    step and the momenta follow from the recorded positions and gradients (the leapfrog
    scheme gives z_k+1 - 2 z_k + z_k-1 = eps^2 grad_k)."""

    def __init__(self, recorder, target, x, **kw):
        super().__init__(target, x, **kw)
        self.recorder = recorder

    def step(self, eps, generator):
        start, value0, grads0 = self.z, self.value, self.grad
        prob, points = _traced(self, super().step, eps, generator)
        z = torch.stack([start] + [u for u, _, _ in points])           # (L + 1, chains, d)
        values = torch.stack([value0] + [v for _, v, _ in points])
        grads = torch.stack([grads0] + [g for _, _, g in points])
        ok = torch.isfinite(values) & torch.isfinite(grads).all(2)
        ok = torch.cumprod(ok.to(torch.int64), 0).bool()     # a failed solve ends the path
        if z.shape[0] >= 3:
            second = z[2] - 2 * z[1] + z[0]
            eps2 = (second * grads[1]).sum(1) / grads[1].square().sum(1)
            eps_c = eps2.clamp(min=0).sqrt()[:, None]
        else:
            eps_c = torch.full((z.shape[1], 1), float(eps), dtype=z.dtype)
        half = (z[1:] - z[:-1]) / eps_c                             # p_k+1/2
        synced = torch.cat([half[:1] - 0.5 * eps_c * grads[:1],
                            half + 0.5 * eps_c * grads[1:]])         # p_k at z_k
        h = -values + 0.5 * synced.square().sum(2)
        logw = torch.where(ok, h[0] - h, -torch.inf)
        keep = torch.isfinite(logw).reshape(-1)
        u = z.reshape(-1, z.shape[2])[keep]
        self.recorder.steps.append((self.target.latent(u), logw.reshape(-1)[keep]))
        del self.recorder.steps[:-1000]
        return prob


def _reference_metric(laplace, ref):
    """The ``refmetric`` variant's stand-in for the warm-up's metric estimate: the Cholesky
    factor of the reference draws' covariance in the Laplace coordinates, the best fixed
    metric (the warm-up still adapts the step). It bounds what a better metric estimate could
    gain."""
    u = laplace.transport.to_z(torch.as_tensor(ref.samples, dtype=torch.float64))
    factor = torch.linalg.cholesky(torch.cov(u.T))

    def metric(z, dense):
        return factor
    return metric


def _nuts_state(kind, target, x, config):
    """The correction's kernel for the ``nuts`` variant: NUTS with at most 2^8 - 1 leapfrog
    steps per transition (``kind`` is hmc)."""
    return NUTSKernel(target, x, max_depth=8)


def trace(posterior, laplace, state, ref, settings, args):
    """The block-by-block rows and the summary of one variant, its generator at ``state``
    (where the Laplace fit left it)."""
    gen = torch.Generator()
    gen.set_state(state)
    chains = settings.get("chains", CorrectionConfig.chains)
    u = torch.randn((chains, laplace.transport.dim), generator=gen, dtype=torch.float64)
    starts, _ = laplace.transport.to_x(u)
    config = CorrectionConfig(kernel="hmc", chains=chains,
                              warmup=settings.get("warmup", args.warmup),
                              draws=args.block, max_draws=args.max_draws,
                              leapfrog=settings.get("leapfrog", CorrectionConfig.leapfrog),
                              independence=False)
    rows, begin, captured = [], time.perf_counter(), []

    def record(samples, log_target, nfs):
        """Record the scores after a block; ask for the next (fixed) block. ``blockmetric``:
        then re-estimate the metric from every draw so far, pooled over the chains (adaptive
        MCMC with diminishing adaptation; the step and trajectory stay)."""
        d = _convergence(samples, log_target)
        s = scores(ref, samples.reshape(-1, *samples.shape[2:]))
        rows.append({"draws": samples.shape[1], "nfs": int(nfs + laplace.nfs),
                     "rhat": d["rhat"], "ess": d["ess"], "ess_tail": d["ess_tail"],
                     "mean_error_rms": s["mean_error_rms"], "std_error_rms": s["std_error_rms"],
                     "wall_s": time.perf_counter() - begin})
        print(json.dumps(rows[-1]), flush=True)
        if settings.get("until_met") and d["rhat"] <= 1.01 and min(d["ess"],
                                                                   d["ess_tail"]) >= 400:
            return 0                 # the stopping rule's criteria hold: no further block
        if settings.get("blockmetric") and captured:
            u = laplace.transport.to_z(torch.as_tensor(
                samples.reshape(-1, *samples.shape[2:]), dtype=torch.float64))
            correction._rescale(captured[0], u, "hmc")
        return args.block

    def capturing(kind, target, x, config):
        state = new_state(kind, target, x, config)
        captured.append(state)
        return state
    new_state = correction._new_state

    # nuts: the correction's HMC kernel swapped for the benchmark's NUTS kernel (nuts.py); the
    # warm-up, metric, step adaptation and stopping are the package's
    kernel = mock.patch.object(correction, "_new_state", _nuts_state) \
        if settings.get("nuts") else contextlib.nullcontext()
    metric = mock.patch.object(correction, "_metric", _reference_metric(laplace, ref)) \
        if settings.get("refmetric") else contextlib.nullcontext()
    capture = mock.patch.object(correction, "_new_state", capturing) \
        if settings.get("blockmetric") else contextlib.nullcontext()
    pool, estimate = None, contextlib.nullcontext()
    if settings.get("estimate"):
        recorder = _Recorder(settings["estimate"], chains)
        pool = recorder.pool
        estimate = contextlib.ExitStack()
        estimate.enter_context(mock.patch.object(correction, "_new_state", recorder.kernel))
        estimate.enter_context(mock.patch.object(correction, "_metric", recorder.metric))
    windows = mock.patch.object(correction, "metric_windows", settings["windows"]) \
        if settings.get("windows") else contextlib.nullcontext()
    with kernel, metric, capture, estimate, windows:
        res = correct(posterior, laplace.transport, starts, config, generator=gen, extend=record,
                      pool=pool)
    if len(rows) == 0 or rows[-1]["draws"] != res.chains.samples.shape[1]:
        record(res.chains.samples, res.chains.log_prob, res.chains.nfs)     # the last block
    cap = 2 ** 8 - 1 if settings.get("nuts") else config.leapfrog
    return {"chains": chains, "warmup": config.warmup, "leapfrog_cap": cap,
            "kernel": "nuts" if settings.get("nuts") else "hmc",
            "leapfrog": res.leapfrog,
            "step": float(res.chains.step_size),
            "acceptance": float(res.chains.acceptance.mean()), "failed": int(res.failed),
            "rows": rows}


def markdown(problem, runs, args, command):
    lines = [f"# The correction block by block: {problem}", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python {command}`", "",
             "HMC in the Laplace coordinates from Laplace draws, no independence moves; R-hat "
             f"and ESS after every {args.block} draws per chain. Solves "
             "include the Laplace fit; errors in reference-std units, RMS over cells.", ""]
    for name, r in runs.items():
        first, last = r["rows"][0], r["rows"][-1]
        rate = 1000 * (last["ess"] - first["ess"]) / max(last["nfs"] - first["nfs"], 1)
        steps = "leapfrog steps (mean of the last transition)" if r["kernel"] == "nuts" else \
            "leapfrog steps"
        lines += [f"## {name}: {r['kernel'].upper()}, {r['chains']} chains, warm-up "
                  f"{r['warmup']}, at most {r['leapfrog_cap']} leapfrog steps",
                  "", f"After warm-up {r['leapfrog']} {steps}, step {r['step']:.3g}, "
                  f"acceptance {r['acceptance']:.2f}, {r['failed']} failed solves; bulk ESS "
                  f"{rate:.1f} per 1000 solves from {first['draws']} to {last['draws']} draws "
                  "per chain.", "",
                  "| draws / chain | nFS | R-hat | ESS bulk / tail | mean err | std err | "
                  "wall (s) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {b['draws']} | {b['nfs']} | {b['rhat']:.4f} | {b['ess']:.0f} / "
                  f"{b['ess_tail']:.0f} | {b['mean_error_rms']:.3f} | {b['std_error_rms']:.3f} "
                  f"| {b['wall_s']:.0f} |" for b in r["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("problems", nargs="+", help="suite problems, one trace set each")
    p.add_argument("--variants", default="default,leapfrog16,chains8,warmup500,nuts",
                   help="comma-separated names of VARIANTS (default the five of the module's "
                   "docstring)")
    p.add_argument("--warmup", type=int, default=CorrectionConfig.warmup)
    p.add_argument("--block", type=int, default=125)
    p.add_argument("--max-draws", type=int, default=750)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--name", default="correction_trace",
                   help="the results' file name (benchmarks/results/NAME.json and .md)")
    args = p.parse_args(argv)
    command = "benchmarks/suite/correction_trace.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    results, texts = [], []
    for problem in map(by_name, args.problems):
        ref = reference(problem)
        case = problem.case()
        posterior = case.posterior(case.finest)
        gen = torch.Generator().manual_seed(args.seed)
        laplace = fit_laplace(posterior, generator=gen)       # one fit serves every variant
        state = gen.get_state()
        runs = {}
        for name in args.variants.split(","):
            print(f"{problem.name}: {name}", flush=True)
            runs[name] = trace(posterior, laplace, state, ref, VARIANTS[name], args)
        results.append({"problem": problem.name, "runs": runs})
        texts.append(markdown(problem.name, runs, args, command))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"command": command, "problems": results}, indent=1))
    text = "\n".join(texts)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
