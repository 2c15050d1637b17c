"""Writes the example meshes of meshes/ as XDMF (grid ``mesh``, facet tags ``facets``).

    .venv/bin/python meshes/make_meshes.py

``lshape.xdmf``: the L-shaped domain [0, 1]^2 minus (0.5, 1] x (0.5, 1], 32 quadrilaterals per
unit length. Facet tags: 1 west (x = 0), 2 south (y = 0), 3 the two re-entrant edges,
4 the remaining outer edges (east of the lower arm, north of the upper arm).
"""

from pathlib import Path

import numpy as np
import ufl
from dolfinx import mesh
from dolfinx.io import XDMFFile
from mpi4py import MPI

HERE = Path(__file__).resolve().parent


def lshape(n=32):
    """Quadrilateral L-shape: vertices on a (n+1)^2 grid, cells outside the notch."""
    xs = np.linspace(0.0, 1.0, n + 1)
    X, Y = np.meshgrid(xs, xs)
    points = np.column_stack([X.ravel(), Y.ravel()])
    vid = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    cells = []
    for i in range(n):
        for j in range(n):
            if (j + 0.5) / n > 0.5 and (i + 0.5) / n > 0.5:
                continue
            cells.append([vid[i, j], vid[i, j + 1], vid[i + 1, j], vid[i + 1, j + 1]])
    used = np.unique(cells)
    renumber = -np.ones(points.shape[0], dtype=np.int64)
    renumber[used] = np.arange(used.size)
    domain = ufl.Mesh(ufl.VectorElement("Lagrange", ufl.quadrilateral, 1))
    return mesh.create_mesh(MPI.COMM_WORLD, renumber[np.array(cells)], points[used], domain)


def tag_facets(msh):
    def on(p, x=None, y=None):
        return np.isclose(p[0], x) if x is not None else np.isclose(p[1], y)

    markers = [
        (1, lambda p: on(p, x=0.0)),
        (2, lambda p: on(p, y=0.0)),
        (3, lambda p: (on(p, x=0.5) & (p[1] >= 0.5 - 1e-12)) | (on(p, y=0.5) & (p[0] >= 0.5 - 1e-12))),
        (4, lambda p: on(p, x=1.0) | on(p, y=1.0)),
    ]
    fdim = msh.topology.dim - 1
    msh.topology.create_connectivity(fdim, msh.topology.dim)
    facets, values = [], []
    for tag, where in markers:
        f = mesh.locate_entities_boundary(msh, fdim, where)
        facets.append(f)
        values.append(np.full(f.size, tag, dtype=np.int32))
    facets, values = np.concatenate(facets), np.concatenate(values)
    facets, first = np.unique(facets, return_index=True)
    tags = mesh.meshtags(msh, fdim, facets, values[first])
    tags.name = "facets"
    return tags


def main():
    msh = lshape()
    msh.name = "mesh"
    tags = tag_facets(msh)
    with XDMFFile(msh.comm, str(HERE / "lshape.xdmf"), "w") as xdmf:
        xdmf.write_mesh(msh)
        xdmf.write_meshtags(tags)


if __name__ == "__main__":
    main()
