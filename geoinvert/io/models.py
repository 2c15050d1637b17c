"""Saved models and training checkpoints beside a result file, written atomically."""

import logging
import os
import shutil
import tempfile
from pathlib import Path

from geoinvert.io.dataset import atomic_path

__all__ = ['model_path', 'checkpoint_path', 'checkpoint_meta', 'write_checkpoint', 'read_checkpoint', 'save_model', 'load_model']

logger = logging.getLogger(__name__)


def model_path(path):
    """The saved model beside a result file: ``result.nc -> result.pt`` (+ ``result.json``)."""
    return Path(path).with_suffix(".pt")


def checkpoint_path(path):
    """The training checkpoint beside a result file: ``result.nc -> result.ckpt``."""
    return Path(path).with_suffix(".ckpt")


def checkpoint_meta(case, seed):
    from geoinvert import __version__
    return {"case": case.text, "folder": str(case.folder), "seed": seed,
            "geoinvert_version": __version__}


def write_checkpoint(path, state, meta):
    """Save a training state with its run metadata to ``path`` atomically."""
    import torch
    with atomic_path(path) as tmp:
        torch.save({"meta": meta, "state": state}, tmp)
    logger.debug("checkpoint: stage %d, step %d -> %s", state["stage"], state["step"], path)


def read_checkpoint(case, path, seed):
    """The training state saved at ``path`` for this case and seed, or None if there is none.

    Raises:
        CaseError: The file cannot be read, or it was written for another case text or seed.
    """
    import torch
    from geoinvert.errors import CaseError
    if not path.is_file():
        logger.warning("no checkpoint at %s: training from the start", path)
        return None
    try:
        saved = torch.load(path, weights_only=True)    # never runs pickled code
        meta, state = saved["meta"], saved["state"]
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user problem
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
        raise CaseError(str(path), f"not a readable geoinvert checkpoint ({type(err).__name__}: "
                        f"{first}); delete it to train from the start") from None
    if meta.get("case") != case.text:
        raise CaseError(str(path), "was written for a different case file; run without "
                        "--resume to start afresh (it will be overwritten)")
    if meta.get("seed") != seed:
        raise CaseError(str(path), f"was written with seed {meta.get('seed')}, not {seed}; "
                        f"resume with --seed {meta.get('seed')}")
    logger.info("resuming from %s: stage %d, step %d", path, state["stage"], state["step"])
    return state


def save_model(model, path, metadata):
    """Save ``model`` to ``path`` (.pt + .json) atomically through a temporary folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp"))
    try:
        model.save(tmpdir / path.name, metadata=metadata)
        os.replace(tmpdir / path.with_suffix(".json").name, path.with_suffix(".json"))
        os.replace(tmpdir / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def load_model(path):
    """Reload a model saved by :func:`run` (``result.pt`` beside ``result.nc``).

    The prior is rebuilt from the case text stored with the model.

    Args:
        path: The ``.pt`` file, or the result ``.nc`` beside it.

    Returns:
        :class:`~geoinvert.flows.msign.MsIGN` (or, for ``iaf`` and ``meanfield`` runs, a
        :class:`~geoinvert.flows.autoregressive.WhitenedFlow`) with ``.sample(n)`` and
        ``.log_prob(x)``.
    """
    import json
    from geoinvert.case import prior_from_text
    from geoinvert.flows.msign import MsIGN
    path = model_path(path)
    info = json.loads(path.with_suffix(".json").read_text())
    prior = prior_from_text(info.get("metadata", {})["case"])
    if info.get("kind") in ("iaf", "meanfield"):
        from geoinvert.flows.autoregressive import WhitenedFlow
        return WhitenedFlow.load(path, prior)
    return MsIGN.load(path, prior)
