"""The backends of the loss, each computing the per-row loss of hdccf_triton/LOSS.md from one
:class:`~hdccf_triton.terms.LossInputs`:

* :mod:`.reference`: PyTorch, the exact oracle and the CPU path (every similarity);
* :mod:`.triton_dot`: fused Triton kernels for :class:`~hdccf_triton.similarity.Dot` and
  :class:`~hdccf_triton.similarity.Cosine`;
* :mod:`.triton_modulated`: fused Triton kernels for a
  :class:`~hdccf_triton.ModulatedSimilarity`;
* :mod:`._triton_runtime`: what the two Triton backends share (kernel loading, the
  interpreter, the index layout, splits).

:func:`hdccf_triton.loss.select_backend` chooses one, once per call; no backend hands work
to another. Every backend has the signature
``per_row_loss(inputs, interactions, options, row_offset=0) -> [M]``.
"""

from ._triton_runtime import unavailable_reason

__all__ = ["unavailable_reason"]
