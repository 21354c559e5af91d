"""``pcb_scope: model``: PCB statistics over the whole model, in bounded memory.

``radix`` selects exact order statistics from data streamed tensor by tensor;
``model`` discovers, from inside a running ``mergekit-yaml``, every tensor that
the merge feeds to pcb and gathers each model's statistics over all of them.
"""
