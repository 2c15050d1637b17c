"""A batched No-U-Turn kernel for the correction's trace (``correction_trace.py``, variant
``nuts``): does a trajectory length chosen per transition pay on the 64-parameter problems?

The package's correction integrates every HMC transition for a quarter period of the
metric-whitened posterior (a fixed number of leapfrog steps after warm-up). NUTS (Hoffman and
Gelman 2014) instead doubles a trajectory in random directions until it turns back on itself,
and draws the next state from the whole trajectory. This module is the multinomial variant
Stan uses (Betancourt 2017): progressive multinomial sampling inside each new subtree, biased
progressive sampling when it joins the tree, and the generalized no-U-turn criterion (the sum
of the momenta against the momenta at both ends) on the whole tree and on every aligned
sub-block of each new subtree. A subtree that turns or diverges (energy error above 1000, or
a failed solve) is discarded and ends the tree.

The chains are advanced in lockstep: at each doubling every chain still building its tree
extends it by the same number of leapfrog steps in its own direction, and only those chains
are evaluated (one solve each per step), so chains whose trees ended cost nothing.

``python benchmarks/suite/nuts.py`` checks the kernel on an anisotropic Gaussian (scales 0.1
to 10): the draws' means and standard deviations in units of the scales.

References:
    Hoffman, Gelman. The No-U-Turn sampler. JMLR 15 (2014).
    Betancourt. A conceptual introduction to Hamiltonian Monte Carlo. arXiv:1701.02434 (2017).
"""

import math
import sys

import torch

from geoinvert.samplers.chains import WhitenedState

F64 = torch.float64
DIVERGENCE = 1000.0


class NUTSKernel(WhitenedState):
    """NUTS transitions of a batch of chains on ``target`` (unit metric in its coordinates).

    ``step(eps, generator)`` returns each chain's mean acceptance statistic over the new
    trajectory's states (the quantity Stan's dual averaging targets). ``n_leapfrog`` is the
    mean number of leapfrog steps of the last transition.

    Args:
        target, x: as for :class:`~geoinvert.samplers.chains.WhitenedState`.
        max_depth: most doublings (at most 2^max_depth - 1 leapfrog steps).
    """

    def __init__(self, target, x, *, max_depth=8):
        super().__init__(target, x)
        self.max_depth, self.n_leapfrog = max_depth, 1

    def _evaluate(self, z, rows):
        t = self.target
        if getattr(t, "multimodal", False):
            return t.whitened(z, modes=t.modes[rows])
        return t.whitened(z)

    def step(self, eps, generator):
        num, d = self.z.shape
        p0 = torch.randn((num, d), generator=generator, dtype=F64)
        h0 = -self.value + 0.5 * p0.square().sum(1)
        ends = {+1: [self.z.clone(), p0.clone(), self.grad.clone()],
                -1: [self.z.clone(), p0.clone(), self.grad.clone()]}
        rho, log_w = p0.clone(), -h0
        pick = [self.z.clone(), self.x.clone(), self.value.clone(), self.grad.clone(),
                self.log_prob.clone()]
        building = torch.ones(num, dtype=torch.bool)
        accept_sum, steps = torch.zeros(num, dtype=F64), torch.zeros(num, dtype=F64)
        for depth in range(self.max_depth):
            rows = torch.nonzero(building).squeeze(1)
            if rows.numel() == 0:
                break
            forward = torch.rand(num, generator=generator, dtype=F64)[rows] < 0.5
            sub = self._subtree(rows, forward, ends, h0, eps, 2 ** depth, generator)
            ok, sub_log_w, sub_pick, sub_rho, (ez, ep, eg), a, n = sub
            accept_sum[rows] += a
            steps[rows] += n
            stop = torch.zeros(num, dtype=torch.bool)
            stop[rows[~ok]] = True
            good = rows[ok]
            if good.numel():
                # biased progressive sampling: the new subtree's draw replaces the tree's
                # with probability min(1, w_subtree / w_tree)
                u = torch.rand(good.numel(), generator=generator, dtype=F64)
                take = u < torch.exp(torch.clamp(sub_log_w[ok] - log_w[good], max=0.0))
                for store, new in zip(pick, sub_pick):
                    store[good[take]] = new[ok][take]
                log_w[good] = torch.logaddexp(log_w[good], sub_log_w[ok])
                for sign in (+1, -1):
                    side = (forward[ok] if sign > 0 else ~forward[ok])
                    for store, new in zip(ends[sign], (ez, ep, eg)):
                        store[good[side]] = new[ok][side]
                rho[good] += sub_rho[ok]
                r = rho[good]
                turned = ((r * ends[-1][1][good]).sum(1) <= 0) | \
                    ((r * ends[+1][1][good]).sum(1) <= 0)
                stop[good[turned]] = True
            building &= ~stop
        self.accept(torch.ones(num, dtype=torch.bool), *pick)
        self.n_leapfrog = max(1, int(steps.mean()))
        return accept_sum / steps.clamp(min=1)

    def _subtree(self, rows, forward, ends, h0, eps, length, generator):
        """Extend the trees of chains ``rows`` by ``length`` leapfrog steps, each from its
        right end (``forward``) or left end. Returns per row: valid (no divergence, no U-turn
        inside), log of the subtree's weight, its multinomial draw (z, x, value, grad,
        log_prob), its momentum sum, its far end (z, p, grad), the acceptance statistics' sum
        and the leapfrog steps taken."""
        m, d = rows.numel(), self.z.shape[1]
        sign = torch.where(forward, 1.0, -1.0)[:, None].to(F64)
        end = [torch.where(forward[:, None], ends[+1][k][rows], ends[-1][k][rows])
               for k in range(3)]
        ok = torch.ones(m, dtype=torch.bool)
        log_w = torch.full((m,), -math.inf, dtype=F64)
        draw = [end[0].clone(), self.x[rows].clone(), self.value[rows].clone(),
                end[2].clone(), self.log_prob[rows].clone()]
        prefix, momenta = [torch.zeros((m, d), dtype=F64)], []
        accept_sum, steps = torch.zeros(m, dtype=F64), torch.zeros(m, dtype=F64)
        for k in range(1, length + 1):
            live = torch.nonzero(ok).squeeze(1)
            if live.numel() == 0:
                break
            e = eps * sign[live]
            p = end[1][live] + 0.5 * e * end[2][live]
            z = end[0][live] + e * p
            x, value, grad, log_prob = self._evaluate(z, rows[live])
            p = p + 0.5 * e * grad
            h = -value + 0.5 * p.square().sum(1)
            finite = torch.isfinite(h)
            error = torch.where(finite, h - h0[rows[live]], math.inf)
            accept_sum[live] += torch.exp(torch.clamp(-error, max=0.0))
            steps[live] += 1
            for store, new in zip(end, (z, p, grad)):
                store[live] = new
            pk = torch.zeros((m, d), dtype=F64)
            pk[live] = p
            momenta.append(pk)
            prefix.append(prefix[-1] + pk)
            # progressive multinomial sampling inside the subtree
            w = torch.where(finite, -h, -math.inf)
            total = torch.logaddexp(log_w[live], w)
            take = finite & (torch.rand(live.numel(), generator=generator, dtype=F64)
                             < torch.exp(w - total))
            log_w[live] = total
            for store, new in zip(draw, (z, x, value, grad, log_prob)):
                store[live[take]] = new[take]
            bad = error > DIVERGENCE
            size = 2
            while size <= k:           # every aligned sub-block that ends at step k
                if k % size == 0:
                    r = prefix[k][live] - prefix[k - size][live]
                    bad |= ((r * momenta[k - size][live]).sum(1) <= 0) | ((r * p).sum(1) <= 0)
                size *= 2
            ok[live[bad]] = False
        return ok, log_w, draw, prefix[-1], end, accept_sum, steps


def check(seed=3, d=10, chains=16, iterations=3000, burn=200, eps=0.08):
    """Means and standard deviations of NUTS draws of N(0, diag(scales^2)), in units of the
    scales (want 0 and 1 within Monte-Carlo error)."""

    scales = torch.logspace(-1, 1, d, dtype=F64)

    class Gaussian:
        def to_z(self, x):
            return x.reshape(x.shape[0], -1)

        def whitened(self, z):
            value = -0.5 * (z / scales).square().sum(1)
            return z[:, None].clone(), value, -z / scales ** 2, value

    gen = torch.Generator().manual_seed(seed)
    kernel = NUTSKernel(Gaussian(), torch.randn(chains, 1, d, generator=gen, dtype=F64),
                        max_depth=10)
    draws = []
    for i in range(iterations):
        kernel.step(eps, gen)
        if i >= burn:
            draws.append(kernel.z.clone())
    z = torch.stack(draws)
    return (z.mean((0, 1)) / scales).numpy(), (z.std((0, 1)) / scales).numpy()


if __name__ == "__main__":
    mean, std = check()
    print("mean / scale:", mean.round(3))
    print("std / scale: ", std.round(3))
    sys.exit(0 if abs(mean).max() < 0.05 and abs(std - 1).max() < 0.05 else 1)
