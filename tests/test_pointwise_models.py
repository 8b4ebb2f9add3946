"""kdray.models.pointwise: output shapes for every model and head set, the formulas (FM against a brute-force pair
sum, the cross layer, MMoE's gate mixture, biased MF), rebuilding from JSON args with weights_only loads, that each
model can fit a small problem, and the ConfigErrors."""

from __future__ import annotations

import io
import itertools
import json

import pytest
import torch

from kdray.errors import ConfigError
from kdray.models.pointwise import POINTWISE_MODELS, build_pointwise_model, pointwise_model_args
from kdray.models.pointwise_layers import CrossNetwork, MMoEHeads

SHAPE = dict(n_users=5, n_items=6, cardinalities=[3, 4], n_num=2)


def _batch(b: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"user": torch.randint(0, 5, (b,), generator=g), "item": torch.randint(0, 6, (b,), generator=g),
            "cat": torch.stack([torch.randint(0, 3, (b,), generator=g), torch.randint(0, 4, (b,), generator=g)], 1),
            "num": torch.randn(b, 2, generator=g)}


VARIANTS = [("dcnv2", {"multitask": "shared_bottom"}), ("dcnv2", {"multitask": "mmoe", "tower": [8]}),
            ("dcnv2", {"structure": "stacked", "hidden": [16]}), ("mlp", {}), ("mlp", {"multitask": "mmoe"}),
            ("fm", {}), ("mf", {})]


@pytest.mark.parametrize("name,options", VARIANTS)
@pytest.mark.parametrize("heads", [["like"], ["rating"], ["rating", "like"]])
def test_outputs_and_rebuild_from_args(name, options, heads):
    torch.manual_seed(0)
    model = build_pointwise_model(name, **SHAPE, heads=heads, **options).eval()
    out = model(_batch())
    assert list(out) == [h for h in ("like", "rating") if h in heads]  # canonical order
    assert all(v.shape == (8,) and torch.isfinite(v).all() for v in out.values())
    args = json.loads(json.dumps(pointwise_model_args(model)))  # JSON-able
    buffer = io.BytesIO()
    torch.save({"args": args, "state": model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(1)  # a different initialisation: the weights must come from the state dict
    rebuilt = build_pointwise_model(**saved["args"])
    rebuilt.load_state_dict(saved["state"])
    again = rebuilt.eval()(_batch())
    assert all(torch.equal(out[h], again[h]) for h in out)


def test_fm_equals_the_brute_force_pair_sum():
    torch.manual_seed(0)
    model = build_pointwise_model("fm", **SHAPE, heads=["like"], dim=4)
    with torch.no_grad():
        model.first_order.weight.normal_()
        model.num_weights.normal_()
        model.out.bias.fill_(0.3)
    batch = _batch(3)
    v = torch.cat([model.fields(batch), batch["num"].unsqueeze(-1) * model.num_factors], dim=1)  # x_i v_i
    w = torch.cat([model.first_order(model.fields.ids(batch)).squeeze(-1), batch["num"] * model.num_weights], 1)
    for b in range(3):
        pairs = sum(v[b, i] @ v[b, j] for i, j in itertools.combinations(range(v.shape[1]), 2))
        expected = 0.3 + w[b].sum() + pairs
        assert model(batch)["like"][b].item() == pytest.approx(expected.item(), abs=1e-5)


def test_biased_mf_formula():
    torch.manual_seed(0)
    model = build_pointwise_model("mf", **SHAPE, heads=["rating"], dim=3, rating_init=3.5)
    with torch.no_grad():
        model.user_bias.weight.normal_()
        model.item_bias.weight.normal_()
    batch = _batch(4)
    u, i = batch["user"], batch["item"]
    expected = 3.5 + model.user_bias.weight[u, 0] + model.item_bias.weight[i, 0] + \
        (model.user_emb.weight[u] * model.item_emb.weight[i]).sum(1)
    assert torch.allclose(model(batch)["rating"], expected, atol=1e-6)


def test_cross_layer_formula():
    torch.manual_seed(0)
    cross = CrossNetwork(3, 2)
    x0 = torch.randn(4, 3)
    x1 = x0 * (x0 @ cross.layers[0].weight.T + cross.layers[0].bias) + x0
    x2 = x0 * (x1 @ cross.layers[1].weight.T + cross.layers[1].bias) + x1
    assert torch.allclose(cross(x0), x2, atol=1e-6)


def test_mmoe_mixes_experts_by_each_task_gate():
    torch.manual_seed(0)
    heads = MMoEHeads(5, ["like", "rating"], n_experts=3, expert=[4], tower=[], dropout=0.0, rating_init=2.0)
    z = torch.randn(6, 5)
    experts = torch.stack([e(z) for e in heads.experts], 1)  # [B, E, H]
    for head in ("like", "rating"):
        gate = torch.softmax(heads.gates[head](z), -1)
        mixed = (gate.unsqueeze(-1) * experts).sum(1)
        assert torch.allclose(heads(z)[head], heads.towers[head](mixed).squeeze(-1), atol=1e-6)
    assert heads.towers["rating"][-1].bias.item() == 2.0


@pytest.mark.parametrize("name", sorted(POINTWISE_MODELS))
def test_each_model_fits_a_learnable_rule(name):
    # like = (user + item) is even: needs both ids, which every model sees
    torch.manual_seed(0)
    users, items = torch.meshgrid(torch.arange(5), torch.arange(6), indexing="ij")
    batch = {"user": users.flatten(), "item": items.flatten(), "cat": torch.zeros(30, 2, dtype=torch.int64),
             "num": torch.zeros(30, 2)}
    like = ((batch["user"] + batch["item"]) % 2 == 0).float()
    small = {"dim": 8, "hidden": [16]} if name == "dcnv2" else {}
    model = build_pointwise_model(name, **SHAPE, heads=["like"], **small)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch)["like"], like)
        loss.backward()
        opt.step()
    accuracy = ((model(batch)["like"] > 0).float() == like).float().mean().item()
    assert accuracy >= 0.9, (name, accuracy)


@pytest.mark.parametrize("name,args,match", [
    ("deepfm", {}, "not one of"),
    ("fm", {"hidden": [8]}, "no option 'hidden'"),
    ("dcnv2", {"heads": ["click"]}, "heads"),
    ("dcnv2", {"heads": []}, "heads"),
    ("dcnv2", {"heads": ["like", "like"]}, "heads"),
    ("dcnv2", {"multitask": "ple"}, "multitask"),
    ("dcnv2", {"structure": "serial"}, "structure"),
    ("dcnv2", {"dim": 0}, "dim"),
    ("dcnv2", {"hidden": [8, -1]}, "hidden"),
    ("dcnv2", {"cardinalities": [3, 0]}, "cardinalities"),
    ("dcnv2", {"dropout": 1.0}, "dropout"),
    ("mlp", {"hidden": []}, "hidden"),
    ("mlp", {"multitask": "mmoe", "n_experts": 0}, "n_experts"),
])
def test_config_errors(name, args, match):
    with pytest.raises(ConfigError, match=match):
        build_pointwise_model(name, **{**SHAPE, **args})


def test_missing_shape_argument():
    with pytest.raises(ConfigError, match="'n_items'"):
        build_pointwise_model("fm", n_users=3)
