"""HuBERT's cluster prediction head, for logit distillation (``objective: cluster_kl``).

A HuBERT pre-training checkpoint predicts, for every frame, a posterior over its k-means clusters:
the encoder output goes through ``final_proj``, and the logits are the cosine similarities between
that projection and each cluster's embedding (``label_embs_concat``) divided by ``logit_temp``
(0.1). Our converter keeps these tensors aside in ``Converted.extras["pretraining_weights"]``
because no upstream uses them; this module rebuilds the head from them.

Logit distillation (the MelHuBERT compression study's KD) trains the student so that its cluster
posterior matches the teacher's: KL(teacher || student) per valid frame. The student gets its own
copy of the head (projection and cluster embeddings, initialised from the teacher's and trained
with it). That copy is a training-only module: it is not part of the student's
:class:`SpeechTransformer`, so it never appears in the upstream's hidden states or in a delta; it
is saved only in the training checkpoint, so that a killed run resumes to the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.config import HUBERT
from ..model.convert import Converted

HEAD_TENSORS = ("final_proj.weight", "final_proj.bias", "label_embs_concat")
DEFAULT_LOGIT_TEMP = 0.1  # fairseq's HubertConfig default


class NoClusterHeadError(ValueError):
    """The teacher has no cluster prediction head, so its cluster posteriors do not exist."""


class ClusterHead(nn.Module):
    """encoder output (..., D) -> cluster logits (..., C): cos(final_proj(x), label embeddings) / temperature."""

    def __init__(self, embed_dim: int, final_dim: int, num_clusters: int, temperature: float) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"the logit temperature must be positive, got {temperature}")
        self.final_proj = nn.Linear(embed_dim, final_dim)
        self.label_embs = nn.Parameter(torch.zeros(num_clusters, final_dim))
        self.temperature = float(temperature)

    @property
    def num_clusters(self) -> int:
        return self.label_embs.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        # In float32 even under autocast: the logits are cosines / 0.1, and the KL compares small differences.
        with torch.autocast(x.device.type, enabled=False):
            projected = self.final_proj(x.float())
            cosine = F.cosine_similarity(projected.unsqueeze(-2), self.label_embs.float(), dim=-1)
        return cosine / self.temperature


def cluster_head_of(base: Converted, temperature: float | None = None) -> ClusterHead:
    """The teacher's cluster head from a converted HuBERT pre-training checkpoint.

    ``temperature`` overrides the checkpoint's ``logit_temp``. Raises :class:`NoClusterHeadError`
    naming the problem when the checkpoint has none (a DistilHuBERT, or a fine-tuned HuBERT whose
    pre-training tensors were removed).
    """
    weights = base.extras.get("pretraining_weights") or {}
    missing = [name for name in HEAD_TENSORS if name not in weights]
    if base.config.kind != HUBERT or missing:
        what = f"a {base.source_format} checkpoint" if base.config.kind != HUBERT else f"it lacks {missing}"
        raise NoClusterHeadError(
            f"objective cluster_kl needs a teacher with HuBERT's cluster prediction head "
            f"({', '.join(HEAD_TENSORS)}), but the base has none ({what}); use a HuBERT pre-training "
            "checkpoint as the base, or `objective: hidden_states`"
        )
    model_cfg = base.extras.get("model_cfg") or {}
    symbols = base.extras.get("dictionaries_symbols") or []
    if model_cfg.get("untie_final_proj") or len(symbols) > 1:
        raise NoClusterHeadError(
            "objective cluster_kl supports one label set (one k-means dictionary, tied final_proj); this "
            f"checkpoint has {len(symbols)} dictionaries (untie_final_proj={model_cfg.get('untie_final_proj')})"
        )
    proj_weight, proj_bias, label_embs = (weights[name].detach().float() for name in HEAD_TENSORS)
    if proj_weight.shape[1] != base.config.embed_dim or label_embs.shape[1] != proj_weight.shape[0]:
        raise NoClusterHeadError(
            f"cluster head shapes do not fit: final_proj {tuple(proj_weight.shape)}, label_embs_concat "
            f"{tuple(label_embs.shape)}, encoder dimension {base.config.embed_dim}"
        )
    if temperature is None:
        temperature = float(model_cfg.get("logit_temp", DEFAULT_LOGIT_TEMP))
    head = ClusterHead(base.config.embed_dim, proj_weight.shape[0], label_embs.shape[0], temperature)
    with torch.no_grad():
        head.final_proj.weight.copy_(proj_weight)
        head.final_proj.bias.copy_(proj_bias)
        head.label_embs.copy_(label_embs)
    return head


def cluster_kl_loss(student_logits: Tensor, teacher_logits: Tensor, padding_mask: Tensor) -> Tensor:
    """Mean over valid frames of KL(teacher posterior || student posterior); (B, T, C) logits, (B, T) mask."""
    valid = ~padding_mask
    student_log_p = F.log_softmax(student_logits[valid].float(), dim=-1)
    teacher_log_p = F.log_softmax(teacher_logits[valid].float(), dim=-1)
    return F.kl_div(student_log_p, teacher_log_p, log_target=True, reduction="batchmean")
