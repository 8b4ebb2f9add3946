"""What a student needs of its teachers: frozen copies shipped through the object store, the cached top-K (Ray Data
batch inference) and the teacher-initialised start (PCA of the teacher's vectors)."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import torch

from kdray.checkpoint import build_from_info, model_info
from kdray.distill import losses
from kdray.models import RecModel, embedding_tables
from kdray.models.pointwise import PointwiseModel
from kdray.sparse import Csr
from kdray.train.shard import table_batch


def model_state(model: RecModel | PointwiseModel) -> dict[str, Any]:
    """A frozen model (ranking or pointwise) as plain data for the object store: its description and CPU tensors."""
    model = getattr(model, "module", model)
    return {"info": model_info(model), "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def rebuild(state: dict[str, Any], device: torch.device | str = "cpu") -> RecModel | PointwiseModel:
    model = build_from_info(state["info"])
    model.load_state_dict(state["state"])
    return model.to(device)


def frozen(model: RecModel) -> RecModel:
    model.eval()
    model.requires_grad_(False)
    return model


class Ensemble(torch.nn.Module):
    """Several teachers scored as one: the ranking a student distils them into, the mixture of their softmax
    distributions over the catalog (:func:`kdray.distill.losses.ensemble_teacher_logits` at T = 1, ``weights``
    normalised, None = uniform). It has a RecModel's ``n_users``, ``n_items`` and ``score_all``, so the evaluation and
    latency code take it as they take one model; its parameters are the members'."""

    def __init__(self, members: list[RecModel], weights: list[float] | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        sizes = {(m.n_users, m.n_items) for m in members}
        if len(sizes) != 1:
            raise ValueError(f"the members differ in (users, items): {sorted(sizes)}")
        if weights and len(weights) != len(members):
            raise ValueError(f"{len(weights)} weights for {len(members)} members")
        self.members = torch.nn.ModuleList(members)
        self.weights = list(weights) if weights else None
        self.n_users, self.n_items = members[0].n_users, members[0].n_items

    def with_history(self, known: Csr) -> "Ensemble":
        """The same mixture of ``member.with_history(known)`` (:meth:`kdray.models.RecModel.with_history`)."""
        members = [m.with_history(known) for m in self.members]
        if all(a is b for a, b in zip(members, self.members)):
            return self
        return Ensemble(members, self.weights)

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """``[B, n_items]``: one member's logits, or the log of the members' softmax mixture."""
        logits = [m.score_all(users) for m in self.members]
        return losses.ensemble_teacher_logits(logits, self.weights, kind="rd") if len(logits) > 1 else logits[0]


# ----------------------------------------------------------------------------------------------------------------
# Cached teacher top-K (distill.cached_topk): Ray Data batch inference, once, before the student trains.


class TeacherTopK:
    """``map_batches`` UDF: adds each user's teacher top-K unobserved items, best first (``t_items``): all that the
    losses that read only the teacher's order (rd, rrd) need."""

    def __init__(self, teachers: list[Any], weights: list[float] | None, k: int, n_threads: int = 1):
        import ray

        torch.set_num_threads(n_threads)
        states = [ray.get(t) if isinstance(t, ray.ObjectRef) else t for t in teachers]
        self.ensemble = frozen(Ensemble([rebuild(s) for s in states], weights))
        self.k = k

    def __call__(self, table: pa.Table) -> pa.Table:
        batch = table_batch(table)
        with torch.inference_mode():
            combined = self.ensemble.score_all(batch.users).clone()
            combined[batch.pos_rows, batch.pos_items] = -math.inf  # unobserved items only
            items = combined.topk(self.k, dim=1).indices  # sorted: the teacher's order
        return table.append_column("t_items", pa.FixedSizeListArray.from_arrays(pa.array(items.reshape(-1).numpy()),
                                                                               self.k))


# ----------------------------------------------------------------------------------------------------------------
# The knowledge-transfer start: student embeddings from the teacher's, projected by PCA.


def teacher_factors(teacher: RecModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's user and item vectors whose dot product is its score: tower outputs for a two-tower model,
    id embeddings otherwise (for NeuMF, its GMF half)."""
    with torch.no_grad():
        if hasattr(teacher, "user_vectors"):
            teacher.eval()
            return (teacher.user_vectors(torch.arange(teacher.n_users)),
                    teacher.item_vectors(torch.arange(teacher.n_items)))
        tu, ti = embedding_tables(teacher)
        return tu.weight.detach(), ti.weight.detach()


def pca_init_state(student: RecModel, teacher: RecModel) -> dict[str, torch.Tensor]:
    """The student's state dict with its id embeddings replaced by the teacher's user and item vectors projected onto
    their top principal directions (one projection shared by users and items, so that dot products keep their best
    low-rank approximation), rescaled to the student's initial scale."""
    su, si = embedding_tables(student)
    d = su.weight.shape[1]
    tu, ti = teacher_factors(teacher)
    with torch.no_grad():
        joint = torch.cat([tu, ti])  # [U + I, D]
        _, _, v = torch.linalg.svd(joint - joint.mean(0, keepdim=True), full_matrices=False)  # v: [D', D]
        proj = v[: min(d, v.shape[0])].T  # [D, d']
        u, i = tu @ proj, ti @ proj
        if u.shape[1] < d:  # a teacher narrower than the student: keep the student's own init in the rest
            u = torch.cat([u, su.weight[:, u.shape[1]:]], 1)
            i = torch.cat([i, si.weight[:, i.shape[1]:]], 1)
        scale = su.weight.std() / torch.cat([u, i]).std().clamp_min(1e-12)
        names = {id(p): n for n, p in student.named_parameters()}
        state = {k: v.clone() for k, v in student.state_dict().items()}
        state[names[id(su.weight)]] = u * scale
        state[names[id(si.weight)]] = i * scale
    return state


