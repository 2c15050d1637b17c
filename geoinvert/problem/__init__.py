"""The inverse problem: forward models (``problem.forward``), the Gaussian likelihood and the
posterior (``problem.posterior``). Importing this package loads neither torch nor dolfinx."""
