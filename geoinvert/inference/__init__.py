"""Inference around a trained flow: correction of its draws to exact posterior samples.

:mod:`geoinvert.inference.config` (``CorrectionConfig``) is torch-free, so that the case schema
can use it; :mod:`geoinvert.inference.correction` (``FlowTransport``, ``LatentTarget``,
``correct``) imports torch.
"""
