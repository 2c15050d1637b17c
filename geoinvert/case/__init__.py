"""Case files: the schema, loading and validation, the resolved :class:`Case`, the cost
estimate and the generated reference tables.

- :mod:`geoinvert.case.schema`: one :class:`Key` per case-file key and typed views of a
  configuration;
- :mod:`geoinvert.case.load`: :func:`load_case` (bounded YAML, every key, cross-key rules,
  input files, what a run needs);
- :mod:`geoinvert.case.inputs`: data files, truths and meshes;
- :mod:`geoinvert.case.build`: :class:`Case` and the model objects it builds;
- :mod:`geoinvert.case.cost`: solves, time and memory of a run, the check summary;
- :mod:`geoinvert.case.docs`: ``docs/case-files.md``'s tables.

Importing it needs neither torch nor dolfinx.
"""

from geoinvert.case.build import Case
from geoinvert.case.cost import (estimate_cost, estimate_memory, machine_memory, memory_refusal,
                                 reserved_solves, training_solves)
from geoinvert.case.docs import schema_markdown, update_doc
from geoinvert.case.load import load_case, prior_from_text
from geoinvert.case.schema import (FLOW_KINDS, KEYS, KINDS, MAX_SEED, MCMC_KINDS, REQUIRED,
                                   SAMPLER_KEY_KINDS, SAMPLER_KINDS, SCHEMA, SECTIONS,
                                   TRAINED_KINDS, VI_KINDS, Key,
                                   chain_config, correction_config, flow_config, train_options)

__all__ = ["Case", "Key", "SCHEMA", "SECTIONS", "KEYS", "KINDS", "REQUIRED", "MAX_SEED",
           "SAMPLER_KINDS", "MCMC_KINDS", "FLOW_KINDS", "VI_KINDS", "TRAINED_KINDS",
           "SAMPLER_KEY_KINDS", "load_case", "prior_from_text", "estimate_cost", "estimate_memory", "machine_memory",
           "memory_refusal", "reserved_solves", "training_solves", "correction_config",
           "flow_config", "chain_config", "train_options", "schema_markdown", "update_doc"]
