"""The step's peak: the largest of the forward, backward and optimizer phases' live bytes, from the
per-layer activation report (detailed.py) and what the optimizer holds."""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.estimate.detailed import ActivationReport


@dataclass(frozen=True)
class StepPeak:
    """The step's highest point above the weights and optimizer states, and what is alive there."""

    phase: str
    activations_bytes: float
    """Saved activations alive at the peak."""
    gradients_bytes: float
    """Gradients formed by then."""
    transient_bytes: float
    """Short-lived tensors: a layer's live temporaries, loss or layer gradient buffers, optimizer temporaries."""

    @property
    def total_bytes(self) -> float:
        return self.activations_bytes + self.gradients_bytes + self.transient_bytes


def step_peak(report: ActivationReport, *, backprop: bool, top_gradient_bytes: float,
              layer_gradient_bytes: tuple[float, ...], bottom_gradient_bytes: float,
              embedding_backward_bytes: float, optimizer_temporary_bytes: float,
              autocast_copy_bytes: float = 0.0) -> StepPeak:
    """The largest of the forward, backward and optimizer-step phases (module docstring).

    top_gradient_bytes: gradients formed at the top of backward (head, final norm / pooler, a trained LM head
    and, when tied, the embedding matrix); layer_gradient_bytes: each layer's; bottom_gradient_bytes: those
    formed last (embeddings, soft prompts); embedding_backward_bytes: the dense V·h gradient an embedding
    lookup's backward allocates before it is added to an existing (tied) gradient; autocast_copy_bytes: the
    16-bit copies of trained weights AMP makes in forward, saved for backward (gone by the optimizer step)."""
    saved_all = report.embeddings_bytes + report.layers_total_bytes + report.head_bytes
    forward_saved = min(saved_all, report.forward_peak_bytes)
    copies = autocast_copy_bytes
    phases = [StepPeak("forward", forward_saved, 0.0, report.forward_peak_bytes - forward_saved + copies)]
    if not backprop:
        return phases[0]
    below = [report.layer_input_bytes[i] if report.checkpointed[i] else report.layer_bytes[i]
             for i in range(len(report.layer_bytes))]
    resident = report.embeddings_bytes + sum(below)
    phases.append(StepPeak("backward (loss)", resident + report.head_bytes, 0.0, report.head_backward_bytes + copies))
    phases.append(StepPeak("backward (loss)", resident, top_gradient_bytes, report.logits_grad_bytes + copies))
    gradients = top_gradient_bytes
    for i in reversed(range(len(report.layer_bytes))):
        resident -= below[i]
        gradients += layer_gradient_bytes[i]
        if report.layer_backward_bytes[i]:
            phases.append(StepPeak("backward (layers)", resident + report.layer_bytes[i], gradients,
                                   report.layer_backward_bytes[i] + copies))
    gradients += bottom_gradient_bytes
    phases.append(StepPeak("backward (embeddings)", report.embeddings_bytes, gradients, embedding_backward_bytes))
    phases.append(StepPeak("optimizer step", 0.0, gradients, optimizer_temporary_bytes))
    return max(phases, key=lambda phase: phase.total_bytes)
