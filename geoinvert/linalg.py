"""Batched supernodal multifrontal Cholesky for many SPD matrices sharing one sparsity pattern."""

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["BatchedCholesky", "nested_dissection"]

# Relaxed amalgamation (CHOLMOD's rule, CHOLMOD's defaults, which measured fastest here): merge
# a supernode into its parent if the merged one has at most NRELAX[0] columns, or at most
# NRELAX[1] columns and a fraction of explicit zeros below ZRELAX[0], or at most NRELAX[2] and
# below ZRELAX[1], or any size with fewer than ZRELAX[2].
NRELAX = (4, 16, 48)
ZRELAX = (0.8, 0.1, 0.05)
# Fronts of one tree level are stacked in one batched call when their padded size stays within
# this ratio of the largest member.
PAD_RATIO = 0.9


def nested_dissection(indptr, indices):
    """Nested-dissection fill-reducing ordering of a symmetric CSR pattern (PETSc ``"nd"``).

    Args:
        indptr: CSR row pointers, shape (n + 1,).
        indices: CSR column indices, shape (nnz,), both triangles present.

    Returns:
        perm: shape (n,), new -> old, so that ``A[perm][:, perm]`` has a sparse Cholesky factor.
    """
    import petsc4py

    petsc4py.init()
    from petsc4py import PETSc

    n = len(indptr) - 1
    mat = PETSc.Mat().createAIJ(size=(n, n), comm=PETSc.COMM_SELF,
                                csr=(np.asarray(indptr, dtype=PETSc.IntType),
                                     np.asarray(indices, dtype=PETSc.IntType),
                                     np.ones(len(indices))))
    rows, _ = mat.getOrdering("nd")
    perm = rows.getIndices().astype(np.int64)
    mat.destroy()
    return perm


# -- symbolic phase --------------------------------------------------------------------------

def _lower_csc(indptr, indices, perm):
    """Lower triangle (diagonal included) of ``A[perm][:, perm]`` as CSC plus source positions.

    Returns:
        colptr (n + 1,), rows (nnz_L,), src (nnz_L,): column ``j`` holds rows
        ``rows[colptr[j]:colptr[j+1]]`` (sorted, first is ``j``) whose values are ``values[src]``.
    """
    n = len(indptr) - 1
    inv = np.empty(n, dtype=np.int64)
    inv[perm] = np.arange(n)
    r = inv[np.repeat(np.arange(n), np.diff(indptr))]
    c = inv[np.asarray(indices, dtype=np.int64)]
    keep = np.flatnonzero(r >= c)
    order = keep[np.lexsort((r[keep], c[keep]))]
    colptr = np.concatenate([[0], np.cumsum(np.bincount(c[order], minlength=n))])
    return colptr, r[order], order


def _etree_counts(colptr, rows, n):
    """Elimination tree and column counts of L (diagonal included) by column-structure merging.

    struct(L_j) = struct(A_j) U (U_{children c} struct(L_c) \\ {j}), parent(j) = min struct(L_j).
    """
    parent = np.full(n, -1, dtype=np.int64)
    counts = np.empty(n, dtype=np.int64)
    pending = [[] for _ in range(n)]
    for j in range(n):
        parts = [rows[colptr[j] + 1:colptr[j + 1]]] + [s[1:] for s in pending[j]]
        pending[j] = None
        s = np.unique(np.concatenate(parts)) if len(parts) > 1 else parts[0]
        counts[j] = s.size + 1
        if s.size:
            parent[j] = s[0]
            pending[s[0]].append(s)
    return parent, counts


def _postorder(parent, counts):
    """Postorder of a forest (children ordered by column count, the largest last)."""
    n = len(parent)
    children = [[] for _ in range(n)]
    for j in np.lexsort((np.arange(n), counts))[::-1]:
        if parent[j] >= 0:
            children[parent[j]].append(j)
    stack = [int(j) for j in np.flatnonzero(parent < 0)]
    order = []
    while stack:
        j = stack.pop()
        order.append(j)
        stack.extend(children[j])
    return np.array(order[::-1], dtype=np.int64)


def _relabel(parent, post):
    """Parent array after renumbering nodes by ``post`` (new -> old)."""
    inv = np.empty_like(post)
    inv[post] = np.arange(len(post))
    p = parent[post]
    return np.where(p >= 0, inv[np.maximum(p, 0)], -1)


def _fundamental(parent, counts):
    """First columns of fundamental supernodes (postordered etree), shape (nsuper + 1,)."""
    n = len(parent)
    nchild = np.bincount(parent[parent >= 0], minlength=n)
    join = np.zeros(n, dtype=bool)
    j = np.arange(n - 1)
    join[1:] = (parent[j] == j + 1) & (nchild[j + 1] == 1) & (counts[j + 1] == counts[j] - 1)
    return np.append(np.flatnonzero(~join), n)


def _snode_tree(start, parent, counts):
    """Supernodal tree of column ranges: parent supernode, columns k and rows below m."""
    ns = len(start) - 1
    sn = np.repeat(np.arange(ns), np.diff(start))
    last = start[1:] - 1
    sparent = np.where(parent[last] >= 0, sn[np.maximum(parent[last], 0)], -1)
    k = np.diff(start)
    return sparent, k, counts[start[:-1]] - k


def _merge_ok(K, M, true, nrelax, zrelax):
    """CHOLMOD's relaxation test for a merged supernode of K columns and M rows below."""
    z = 1.0 - true / (K * (K + 1) / 2 + K * M)
    return K <= nrelax[0] or (K <= nrelax[1] and z < zrelax[0]) \
        or (K <= nrelax[2] and z < zrelax[1]) or z < zrelax[2]


def _amalgamate(start, parent, counts, nrelax=NRELAX, zrelax=ZRELAX):
    """Relaxed amalgamation: merge any child supernode into its parent when the merged front
    passes :func:`_merge_ok` (children tried by fewest added zeros); then renumber.

    Returns:
        order: column permutation (new -> old) making every merged supernode contiguous and
            the supernodal tree postordered.
        start: first columns of the merged supernodes in the new numbering, (nsuper + 1,).
    """
    sparent, k, m = _snode_tree(start, parent, counts)
    ns = len(k)
    K, true = k.astype(float), (k * (k + 1) / 2 + k * m).astype(float)
    children = [[] for _ in range(ns)]
    for c in range(ns):
        if sparent[c] >= 0:
            children[sparent[c]].append(c)
    rep = np.arange(ns)
    for p in range(ns):
        for c in sorted(children[p], key=lambda c: m[p] + K[p] - m[c]):
            if _merge_ok(K[p] + K[c], m[p], true[p] + true[c], nrelax, zrelax):
                rep[c], K[p], true[p] = p, K[p] + K[c], true[p] + true[c]
    for c in range(ns - 1, -1, -1):
        rep[c] = rep[rep[c]]
    return _renumber(start, sparent, rep)


def _renumber(start, sparent, rep):
    """Columns grouped by merged supernode, merged supernodes in postorder (see _amalgamate)."""
    roots = np.unique(rep)
    new_parent = np.where(sparent[roots] >= 0, rep[np.maximum(sparent[roots], 0)], -1)
    index = {r: i for i, r in enumerate(roots)}
    tree_parent = np.array([index[p] if p >= 0 else -1 for p in new_parent], dtype=np.int64)
    post = _postorder(tree_parent, np.zeros(len(roots), dtype=np.int64))
    members = [[] for _ in roots]
    for s in range(len(rep)):
        members[index[rep[s]]].append(s)
    cols = [np.concatenate([np.arange(start[s], start[s + 1]) for s in members[r]]) for r in post]
    sizes = np.array([c.size for c in cols])
    return np.concatenate(cols), np.concatenate([[0], np.cumsum(sizes)])


def _structures(start, colptr, rows):
    """Row structure below the diagonal block of each supernode and the supernodal tree.

    Returns:
        structs: list of sorted int arrays, rows of L_s below its last column.
        sparent: (nsuper,) parent supernode or -1.
    """
    ns = len(start) - 1
    sn = np.repeat(np.arange(ns), np.diff(start))
    pending = [[] for _ in range(ns)]
    structs, sparent = [], np.full(ns, -1, dtype=np.int64)
    for s in range(ns):
        a, b = start[s], start[s + 1]
        parts = [rows[colptr[a]:colptr[b]]] + pending[s]
        pending[s] = None
        r = np.unique(np.concatenate(parts))
        r = r[r >= b]
        structs.append(r)
        if r.size:
            sparent[s] = sn[r[0]]
            pending[sparent[s]].append(r)
    return structs, sparent


def _heights(sparent):
    """Distance of each supernode to its deepest leaf (children precede parents)."""
    h = np.zeros(len(sparent), dtype=np.int64)
    for s, p in enumerate(sparent):
        if p >= 0:
            h[p] = max(h[p], h[s] + 1)
    return h


def _buckets(members, k, m, ratio=PAD_RATIO):
    """Split one tree level into lists of supernodes whose padded fronts stay within ``ratio``."""
    order = sorted(members, key=lambda s: (k[s] + m[s], k[s]), reverse=True)
    out, cur, kk, mm = [], [], 0, 0
    for s in order:
        k2, m2 = max(kk, k[s]), max(mm, m[s])
        if cur and (k[s] + m[s]) < ratio * (k2 + m2):
            out.append(cur)
            cur, k2, m2 = [], k[s], m[s]
        cur.append(s)
        kk, mm = k2, m2
    return out + [cur] if cur else out


def _take(x, index):
    """``x[:, index]`` for a (B, N) tensor (``gather`` is much faster than ``index_select``)."""
    return torch.gather(x, 1, index.expand(x.shape[0], -1))


def _solve_index(snodes, K, M, start, structs, n):
    """Global indices of the pivots (g K,) and update rows (g M,) of padded fronts; padding -> n."""
    piv = np.full((len(snodes), K), n, dtype=np.int64)
    upd = np.full((len(snodes), M), n, dtype=np.int64)
    for t, s in enumerate(snodes):
        piv[t, :start[s + 1] - start[s]] = np.arange(start[s], start[s + 1])
        upd[t, :structs[s].size] = structs[s]
    return torch.from_numpy(piv.ravel()), torch.from_numpy(upd.ravel())


def _arena(groups):
    """First-fit offsets of the update matrices in one arena (per sample); returns its size."""
    free, size = [], 0
    for G in groups:
        need = G.g * G.M * G.M
        hole = next((h for h in free if h[1] >= need), None)
        if hole is None:
            G.u_off, size = size, size + need
        else:
            free.remove(hole)
            G.u_off = hole[0]
            if hole[1] > need:
                free.append((hole[0] + need, hole[1] - need))
        for ic in G.release:
            free.append((groups[ic].u_off, groups[ic].g * groups[ic].M * groups[ic].M))
    return size


@dataclass
class _Group:
    """Fronts factored in one batched call: g supernodes padded to K pivots and M update rows."""

    snodes: np.ndarray
    K: int
    M: int
    a_dst: torch.Tensor = None
    a_lo: int = 0
    a_hi: int = 0
    u_off: int = 0
    pad: torch.Tensor = None
    piv: torch.Tensor = None
    upd: torch.Tensor = None
    children: list = field(default_factory=list)
    release: list = field(default_factory=list)

    @property
    def F(self):
        return self.K + self.M

    @property
    def g(self):
        return len(self.snodes)


def _local(rows, s, start, skey, soff, K, n):
    """Local row index inside the padded front of supernode ``s`` for global ``rows`` (arrays)."""
    first, last = start[s], start[s + 1] - 1
    inside = rows <= last
    pos = np.searchsorted(skey, s * n + rows) - soff[s]
    return np.where(inside, rows - first, K[s] + pos)


class BatchedCholesky:
    r"""Sparse Cholesky ``P A_b P^T = L_b L_b^T`` of B matrices with one pattern, batched.

    The symbolic phase (ordering, elimination tree, relaxed supernodes, all index maps) depends
    on the pattern only. The numeric phase is multifrontal: for every supernode the front

    .. math:: F = \begin{pmatrix} A_{11} & \\ A_{21} & A_{22} \end{pmatrix}
              + \sum_{c} \mathrm{extend}(U_c),\quad L_{11} L_{11}^T = F_{11},\quad
              L_{21} = F_{21} L_{11}^{-T},\quad U = F_{22} - L_{21} L_{21}^T

    is built and factored for all B samples at once; fronts of the same tree level and similar
    size are padded (identity pivots, zero rows) and stacked into one dense batched call.

    Args:
        indptr: CSR row pointers, shape (n + 1,).
        indices: CSR column indices, shape (nnz,); the full symmetric pattern (both triangles).
        ordering: optional fill-reducing permutation (new -> old), shape (n,); nested dissection
            from PETSc by default.

    Attributes:
        n: number of unknowns.
        nnz: number of stored entries of A.
        nnz_factor: entries of L including the explicit zeros of relaxed supernodes.
        perm: final permutation (new -> old), shape (n,).
        failed: after :meth:`factor`, indices of samples that are not positive definite.

    References:
        Liu, *The multifrontal method for sparse matrix solution: theory and practice*,
        SIAM Review 34 (1992). Chen, Davis, Hager, Rajamanickam, *CHOLMOD*, ACM TOMS 35 (2008).
    """

    def __init__(self, indptr, indices, *, ordering=None):
        indptr = np.asarray(indptr, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64)
        self.n, self.nnz = len(indptr) - 1, len(indices)
        nd = nested_dissection(indptr, indices) if ordering is None else np.asarray(ordering)
        colptr, rows, _ = _lower_csc(indptr, indices, nd)
        parent, counts = _etree_counts(colptr, rows, self.n)
        post = _postorder(parent, counts)
        parent, counts = _relabel(parent, post), counts[post]
        order, start = _amalgamate(_fundamental(parent, counts), parent, counts)
        self.perm = nd[post][order]
        colptr, rows, src = _lower_csc(indptr, indices, self.perm)
        structs, sparent = _structures(start, colptr, rows)
        self._build_groups(start, structs, sparent, colptr, rows, src)
        self._perm_t = torch.from_numpy(self.perm)
        self.failed = np.zeros(0, dtype=np.int64)
        self._factor, self._ws = None, None

    # -- symbolic: index maps -----------------------------------------------------------------
    def _build_groups(self, start, structs, sparent, colptr, rows, src):
        n, ns = self.n, len(start) - 1
        k = np.diff(start)
        m = np.array([s.size for s in structs])
        self.nnz_factor = int((k * (k + 1) // 2 + k * m).sum())
        height = _heights(sparent)
        groups = []
        for h in range(height.max() + 1 if ns else 0):
            groups += [_Group(np.array(b), int(k[b].max()), int(m[b].max()))
                       for b in _buckets(np.flatnonzero(height == h).tolist(), k, m)]
        gid, slot = np.empty(ns, dtype=np.int64), np.empty(ns, dtype=np.int64)
        for i, G in enumerate(groups):
            gid[G.snodes], slot[G.snodes] = i, np.arange(G.g)
        K = np.array([groups[gid[s]].K for s in range(ns)])
        soff = np.concatenate([[0], np.cumsum(m)])
        skey = np.concatenate([s * n + structs[s] for s in range(ns)] + [np.zeros(0, np.int64)])
        loc = (start, skey, soff, K, n)
        self._maps_a(groups, gid, slot, start, colptr, rows, src, loc)
        self._maps_children(groups, gid, slot, structs, sparent, loc)
        self._maps_solve(groups, start, structs)
        self.groups = groups

    def _maps_a(self, groups, gid, slot, start, colptr, rows, src, loc):
        """Positions of the lower entries of A inside the flat fronts of their group."""
        col = np.repeat(np.arange(self.n), np.diff(colptr))
        sn = np.repeat(np.arange(len(start) - 1), np.diff(start))[col]
        r = np.empty_like(rows)
        for s in range(len(start) - 1):
            e = slice(colptr[start[s]], colptr[start[s + 1]])
            r[e] = _local(rows[e], s, *loc)
        c = col - start[sn]
        order = np.argsort(gid[sn], kind="stable")
        bounds = np.searchsorted(gid[sn][order], np.arange(len(groups) + 1))
        self._a_src = torch.from_numpy(src[order])
        for i, G in enumerate(groups):
            e = order[bounds[i]:bounds[i + 1]]
            G.a_lo, G.a_hi = int(bounds[i]), int(bounds[i + 1])
            G.a_dst = torch.from_numpy(slot[sn[e]] * G.F * G.F + r[e] * G.F + c[e])
            pads = [t * G.F * G.F + j * (G.F + 1) for t, s in enumerate(G.snodes)
                    for j in range(start[s + 1] - start[s], G.K)]
            G.pad = torch.tensor(pads, dtype=torch.int64)

    def _maps_children(self, groups, gid, slot, structs, sparent, loc):
        """Extend-add maps: lower entries of each child's update matrix into its parent's front."""
        acc = {}
        for c, p in enumerate(sparent):
            if p < 0:
                continue
            Gc, Gp = groups[gid[c]], groups[gid[p]]
            li = _local(structs[c], p, *loc)
            u, v = np.tril_indices(structs[c].size)
            s_idx = slot[c] * Gc.M * Gc.M + u * Gc.M + v
            d_idx = slot[p] * Gp.F * Gp.F + li[u] * Gp.F + li[v]
            acc.setdefault((gid[p], gid[c]), []).append((s_idx, d_idx))
        consumer = {}
        for (ip, ic), parts in sorted(acc.items()):
            groups[ip].children.append((ic, torch.from_numpy(np.concatenate([a for a, _ in parts])),
                                        torch.from_numpy(np.concatenate([b for _, b in parts]))))
            consumer[ic] = max(consumer.get(ic, ip), ip)
        for ic, ip in consumer.items():
            groups[ip].release.append(ic)
        self._arena = _arena(groups)

    def _maps_solve(self, groups, start, structs):
        """Global indices of each group's pivots and update rows (padding -> n) for the solves."""
        for G in groups:
            G.piv, G.upd = _solve_index(G.snodes, G.K, G.M, start, structs, self.n)

    # -- numeric phase --------------------------------------------------------------------------
    def factor(self, values):
        """Numeric factorisation of B matrices (replaces the stored factor).

        Args:
            values: (B, nnz) array or tensor of A's values in the CSR order of the pattern.

        Returns:
            self. Samples that are not positive definite are listed in :attr:`failed`; the
            others are valid.
        """
        values = torch.as_tensor(values, dtype=torch.float64)
        if values.ndim != 2 or values.shape[1] != self.nnz:
            raise ValueError(f"values must have shape (B, {self.nnz}), got {tuple(values.shape)}")
        B = values.shape[0]
        ws = self._workspace(B)
        vals = _take(values, self._a_src)
        bad = torch.zeros(B, dtype=torch.bool)
        for G, (Linv, L21), U in zip(self.groups, ws["factor"], ws["update"]):
            front = self._assemble(G, vals, ws)
            info = self._partial(G, front.view(B * G.g, G.F, G.F), Linv, L21, U, ws)
            bad |= (info.view(B, G.g) != 0).any(1)
        self._factor, self.B = ws["factor"], B
        self.failed = np.flatnonzero(bad.numpy())
        return self

    def _workspace(self, B):
        """Buffers for B samples, reused between calls: fronts, update arena, the factor."""
        if self._ws is not None and self._ws["B"] == B:
            return self._ws
        self._ws = None
        arena = torch.empty(B * self._arena, dtype=torch.float64)
        dims = [(G.g * B, G.K, G.M) for G in self.groups]
        self._ws = {
            "B": B,
            "front": torch.empty(B * max(G.g * G.F * G.F for G in self.groups) + 1,
                                 dtype=torch.float64),
            "chol": torch.empty(B * max(G.g * G.K * G.K for G in self.groups),
                                dtype=torch.float64),
            "update": [arena[B * G.u_off:B * (G.u_off + G.g * G.M * G.M)].view(N, M, M)
                       for G, (N, _, M) in zip(self.groups, dims)],
            "factor": [(torch.empty(N, K, K, dtype=torch.float64),
                        torch.empty(N, M, K, dtype=torch.float64)) for N, K, M in dims],
        }
        return self._ws

    @staticmethod
    def _assemble(G, vals, ws):
        """Flat fronts (B, g F F): A's lower entries, identity padding, children's updates."""
        B = vals.shape[0]
        front = ws["front"][:B * G.g * G.F * G.F].view(B, -1)
        front.zero_()
        front.index_copy_(1, G.a_dst, vals[:, G.a_lo:G.a_hi])
        front.index_fill_(1, G.pad, 1.0)
        for ic, s_idx, d_idx in G.children:
            front.index_add_(1, d_idx, _take(ws["update"][ic].view(B, -1), s_idx))
        return front

    @staticmethod
    def _partial(G, front, Linv, L21, U, ws):
        r"""Partial Cholesky of (N, F, F) fronts into the stored blocks, returns LAPACK info (N,).

        :math:`L_{11} L_{11}^T = F_{11}`, ``Linv`` :math:`= L_{11}^{-1}` (N, K, K),
        ``L21`` :math:`= F_{21} L_{11}^{-T}` (N, M, K), ``U`` :math:`= F_{22} - L_{21} L_{21}^T`.
        """
        N, K = front.shape[0], G.K
        L11 = ws["chol"][:N * K * K].view(N, K, K)
        _, info = torch.linalg.cholesky_ex(front[:, :K, :K], out=(L11, torch.empty(0, dtype=torch.int32)))
        eye = torch.eye(K, dtype=front.dtype).expand(N, K, K)
        torch.linalg.solve_triangular(L11, eye, upper=False, out=Linv)
        if G.M:
            torch.matmul(front[:, K:, :K], Linv.mT, out=L21)
            torch.baddbmm(front[:, K:, K:], L21, L21.mT, alpha=-1.0, out=U)
        return info

    def solve(self, rhs):
        """Solve ``A_b x_b = rhs_b`` for every sample with the stored factor.

        Args:
            rhs: (B, n) array or tensor.

        Returns:
            (B, n) float64 tensor; rows of failed samples are NaN.
        """
        if self._factor is None:
            raise RuntimeError("call factor() before solve()")
        rhs = torch.as_tensor(rhs, dtype=torch.float64)
        if rhs.shape != (self.B, self.n):
            raise ValueError(f"rhs must have shape ({self.B}, {self.n}), got {tuple(rhs.shape)}")
        x = rhs.new_zeros(self.B, self.n + 1)
        x[:, :self.n] = _take(rhs, self._perm_t)
        for G, (Linv, L21) in zip(self.groups, self._factor):
            self._forward(G, Linv, L21, x)
        for G, (Linv, L21) in zip(reversed(self.groups), reversed(self._factor)):
            self._backward(G, Linv, L21, x)
        out = torch.empty_like(rhs)
        out[:, self.perm] = x[:, :self.n]
        out[self.failed] = float("nan")
        return out

    @staticmethod
    def _forward(G, Linv, L21, x):
        """x1 <- L11^{-1} x1, x2 <- x2 - L21 x1 for the fronts of one group (in place).

        Products are taken as row vectors, ``y^T A^T``: much faster than batched ``A y`` in torch.
        """
        B = x.shape[0]
        y = torch.bmm(_take(x, G.piv).view(B * G.g, 1, G.K), Linv.mT)
        x.index_copy_(1, G.piv, y.view(B, -1))
        if G.M:
            x.index_add_(1, G.upd, torch.bmm(y, L21.mT).view(B, -1), alpha=-1.0)

    @staticmethod
    def _backward(G, Linv, L21, x):
        """x1 <- L11^{-T} (x1 - L21^T x2) for the fronts of one group (in place)."""
        B = x.shape[0]
        y = _take(x, G.piv).view(B * G.g, 1, G.K)
        if G.M:
            y = torch.baddbmm(y, _take(x, G.upd).view(B * G.g, 1, G.M), L21, alpha=-1.0)
        x.index_copy_(1, G.piv, torch.bmm(y, Linv).view(B, -1))

    def logdet(self):
        """log det A_b = -2 sum log diag(L^{-1}) for every sample, shape (B,); NaN if failed."""
        if self._factor is None:
            raise RuntimeError("call factor() before logdet()")
        out = torch.zeros(self.B, dtype=torch.float64)
        for Linv, _ in self._factor:
            out -= 2.0 * torch.log(Linv.diagonal(dim1=-2, dim2=-1).reshape(self.B, -1)).sum(1)
        out[self.failed] = float("nan")
        return out
