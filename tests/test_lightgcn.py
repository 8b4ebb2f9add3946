"""kdray.models.lightgcn: the normalised adjacency and the propagation against hand-computed values on a 2-user,
3-item graph and against a dense numpy reference, score == gathered score_all, the inference cache and its
invalidation, the graph in the state dict (weights_only round trip through a checkpoint), DDP's ignore list, the
cosine-temperature scores against hand-computed values, and argument errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kdray.checkpoint import Vocab, load_checkpoint, save_checkpoint
from kdray.errors import ConfigError, DataError
from kdray.models import LightGCN, build_model, count_parameters, embedding_tables, model_args
from kdray.models.lightgcn import SymmetricSpmm, graph_edges, normalized_adjacency
from kdray.sparse import Csr

S = 1 / math.sqrt(2)
# user 0 -> items 0, 1; user 1 -> item 1; item 2 has no interaction.
# degrees: u0 = 2, u1 = 1, i0 = 1, i1 = 2, i2 = 0
# Â (users 0-1, items 2-4 as nodes): (u0, i0) = 1/sqrt(2 * 1) = S, (u0, i1) = 1/sqrt(2 * 2) = 1/2, (u1, i1) = S
TINY_USERS, TINY_ITEMS = np.array([0, 0, 1, 0]), np.array([0, 1, 1, 1])  # (0, 1) twice: kept once
E0_USERS, E0_ITEMS = [[1.0], [2.0]], [[3.0], [4.0], [5.0]]


def _tiny(n_layers: int, dim_values: tuple[list, list] = (E0_USERS, E0_ITEMS),
          cosine_temperature: float = 0.0) -> LightGCN:
    model = build_model("lightgcn", n_users=2, n_items=3, dim=len(dim_values[0][0]), n_layers=n_layers,
                        graph=(TINY_USERS, TINY_ITEMS), cosine_temperature=cosine_temperature)
    with torch.no_grad():
        model.user_emb.weight.copy_(torch.tensor(dim_values[0]))
        model.item_emb.weight.copy_(torch.tensor(dim_values[1]))
    return model.eval()


def _random_graph(n_users: int, n_items: int, seed: int) -> Csr:
    rng = np.random.default_rng(seed)
    users = np.concatenate([np.arange(n_users), rng.integers(0, n_users, 3 * n_users)])  # every user has an item
    items = np.concatenate([rng.integers(0, n_items - 1, n_users), rng.integers(0, n_items - 1, 3 * n_users)])
    return Csr.from_pairs(users, items, n_users, n_items)  # the last item has no interaction


def _dense_reference(model: LightGCN, csr: Csr) -> tuple[np.ndarray, np.ndarray]:
    """Straight from the paper's matrix form with dense numpy: A, D^-1/2 A D^-1/2 (0 where the degree is 0), the
    mean of E_0..E_K."""
    u, i = model.n_users, model.n_items
    r = np.zeros((u, i))
    r[csr.rows_of(), csr.indices] = 1.0
    a = np.block([[np.zeros((u, u)), r], [r.T, np.zeros((i, i))]])
    deg = a.sum(1)
    d = np.where(deg > 0, 1 / np.sqrt(np.where(deg > 0, deg, 1)), 0.0)
    norm = d[:, None] * a * d[None, :]
    e = torch.cat([model.user_emb.weight, model.item_emb.weight]).detach().double().numpy()
    layers = [e]
    for _ in range(model.n_layers):
        layers.append(norm @ layers[-1])
    final = np.mean(layers, axis=0)
    return final[:u], final[u:]


def test_normalised_adjacency_hand_computed():
    edges = graph_edges((TINY_USERS, TINY_ITEMS), 2, 3)
    assert edges.tolist() == [[0, 0, 1], [0, 1, 1]]  # deduplicated, sorted by user
    dense = normalized_adjacency(edges, 2, 3).to_dense()
    expected = torch.zeros(5, 5)
    for (a, b), v in {(0, 2): S, (0, 3): 0.5, (1, 3): S}.items():
        expected[a, b] = expected[b, a] = v
    assert torch.allclose(dense, expected)
    assert torch.equal(dense, dense.T)
    assert dense[4].abs().sum() == 0  # item 2: no edge, an empty row, no NaN


def test_propagation_hand_computed_one_and_two_layers():
    # E0 (dim 1): u = [1, 2], i = [3, 4, 5]
    # E1 = Â E0: u0 = S*3 + 1/2*4 = 3S + 2, u1 = S*4 = 4S, i0 = S*1 = S, i1 = 1/2*1 + S*2 = 1/2 + 2S, i2 = 0
    # E2 = Â E1: u0 = S*S + 1/2*(1/2 + 2S) = 3/4 + S, u1 = S*(1/2 + 2S) = S/2 + 1,
    #            i0 = S*(3S + 2) = 3/2 + 2S, i1 = 1/2*(3S + 2) + S*4S = 3 + 3S/2, i2 = 0
    e1_u, e1_i = [3 * S + 2, 4 * S], [S, 0.5 + 2 * S, 0.0]
    e2_u, e2_i = [0.75 + S, S / 2 + 1], [1.5 + 2 * S, 3 + 1.5 * S, 0.0]
    one_u = [(a + b) / 2 for a, b in zip([1, 2], e1_u)]  # [2.560660, 2.414214]
    one_i = [(a + b) / 2 for a, b in zip([3, 4, 5], e1_i)]  # [1.853553, 2.957107, 2.5]
    two_u = [(a + b + c) / 3 for a, b, c in zip([1, 2], e1_u, e2_u)]  # [(15/4 + 4S) / 3, (3 + 9S/2) / 3]
    two_i = [(a + b + c) / 3 for a, b, c in zip([3, 4, 5], e1_i, e2_i)]  # [(9/2 + 3S) / 3, (15/2 + 7S/2) / 3, 5/3]
    assert one_u == pytest.approx([2.560660, 2.414214], abs=1e-6)
    assert one_i == pytest.approx([1.853553, 2.957107, 2.5], abs=1e-6)
    assert two_u == pytest.approx([2.192809, 2.060660], abs=1e-6)
    assert two_i == pytest.approx([2.207107, 3.324958, 1.666667], abs=1e-6)
    for n_layers, (eu, ei) in {1: (one_u, one_i), 2: (two_u, two_i)}.items():
        u, i = _tiny(n_layers).propagate()
        assert u[:, 0].tolist() == pytest.approx(eu, abs=1e-6), n_layers
        assert i[:, 0].tolist() == pytest.approx(ei, abs=1e-6), n_layers
    # score = dot product of the final tables: s(u0, i1) at K = 1 = 2.560660 * 2.957107 = 7.572146
    assert _tiny(1).score_all(torch.tensor([0]))[0, 1].item() == pytest.approx(one_u[0] * one_i[1], abs=1e-5)
    # K = 0 is the plain dot product of the id embeddings
    assert _tiny(0).score_all(torch.tensor([1])).tolist() == [[6.0, 8.0, 10.0]]


def test_cosine_temperature_hand_computed():
    # K = 0 (the id embeddings themselves), t = 0.5: u0 = (3, 4), |u0| = 5; u1 = (1, 0)
    # items (1, 0), (0, 2), (-3, 0): cos(u0, .) = 3/5, 8/10, -9/15 = 0.6, 0.8, -0.6 -> / 0.5 = 1.2, 1.6, -1.2
    #                                cos(u1, .) = 1, 0, -1 -> 2, 0, -2
    model = _tiny(0, ([[3.0, 4.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]), cosine_temperature=0.5)
    with torch.no_grad():
        scores = model.score_all(torch.tensor([0, 1]))
        assert scores.tolist() == [pytest.approx([1.2, 1.6, -1.2], abs=1e-6), pytest.approx([2.0, 0.0, -2.0], abs=1e-6)]
        assert torch.allclose(model.score(torch.tensor([0, 1]), torch.tensor([[1, 2], [0, 0]])),
                              torch.tensor([[1.6, -1.2], [2.0, 2.0]]))
    # K = 1 on dim 1: every propagated vector is positive (2.56, 2.41; 1.85, 2.96, 2.5), so every cosine is 1
    assert _tiny(1, cosine_temperature=0.25).score_all(torch.tensor([0, 1])).tolist() == [[4.0] * 3, [4.0] * 3]
    # the same model with t = 0 keeps the paper's dot product
    assert _tiny(0, ([[3.0, 4.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])).score_all(
        torch.tensor([0])).tolist() == [[3.0, 8.0, -9.0]]


def test_cosine_temperature_matches_normalised_dense_reference_and_trains():
    csr = _random_graph(11, 17, seed=5)
    torch.manual_seed(0)
    model = build_model("lightgcn", n_users=11, n_items=17, dim=4, n_layers=2, graph=csr, cosine_temperature=0.2)
    ref_u, ref_i = _dense_reference(model, csr)
    ref_u = ref_u / np.linalg.norm(ref_u, axis=1, keepdims=True) / 0.2
    ref_i = ref_i / np.linalg.norm(ref_i, axis=1, keepdims=True)
    model.eval()
    with torch.no_grad():
        scores = model.score_all(torch.arange(11)).double().numpy()
    assert np.allclose(scores, ref_u @ ref_i.T, atol=1e-5)
    assert np.abs(scores).max() <= 1 / 0.2 + 1e-5  # every logit within [-1/t, 1/t]
    model.train()
    model.score_all(torch.tensor([0, 3])).logsumexp(1).sum().backward()
    assert model.user_emb.weight.grad.abs().sum() > 0 and model.item_emb.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("n_layers", [0, 1, 3])
def test_propagation_matches_dense_reference(n_layers):
    csr = _random_graph(11, 17, seed=n_layers)
    torch.manual_seed(0)
    model = build_model("lightgcn", n_users=11, n_items=17, dim=4, n_layers=n_layers, graph=csr).eval()
    ref_u, ref_i = _dense_reference(model, csr)
    u, i = model.propagate()
    assert np.allclose(u.detach().numpy(), ref_u, atol=1e-6) and np.allclose(i.detach().numpy(), ref_i, atol=1e-6)


def test_csr_and_pair_arrays_build_the_same_graph():
    csr = _random_graph(7, 9, seed=1)
    from_csr = graph_edges(csr, 7, 9)
    pairs = graph_edges((np.concatenate([csr.rows_of(), csr.rows_of()]), np.concatenate([csr.indices] * 2)), 7, 9)
    assert torch.equal(from_csr, pairs)


def test_score_equals_gathered_score_all_and_shared_candidates():
    torch.manual_seed(0)
    model = build_model("lightgcn", n_users=11, n_items=17, dim=4, graph=_random_graph(11, 17, 2)).eval()
    users = torch.tensor([0, 4, 10, 4])
    items = torch.tensor([[0, 1, 16, 3], [5, 5, 6, 7], [16, 2, 0, 9], [1, 1, 1, 1]])
    with torch.no_grad():
        everything = model.score_all(users)
        assert torch.allclose(model.score(users, items), everything.gather(1, items), atol=1e-6)
        shared = torch.tensor([3, 0, 16]).unsqueeze(0).expand(4, -1)  # sampled softmax's stride-0 candidates
        assert torch.allclose(model.score(users, shared), everything[:, [3, 0, 16]], atol=1e-6)
    assert torch.equal(model(users), everything)  # forward without items is score_all (what DDP calls)


def test_gradients_reach_the_id_embeddings_through_the_graph():
    model = _tiny(2).train()
    model.score_all(torch.tensor([1]))[0, 0].backward()  # s(u1, i0): no edge, but connected through u0 and i1
    assert model.user_emb.weight.grad[0].abs().sum() > 0 and model.item_emb.weight.grad[1].abs().sum() > 0
    assert model.item_emb.weight.grad[2].abs().sum() == 0  # the isolated item does not influence (u1, i0)
    assert not model.graph_edges.requires_grad and embedding_tables(model)[0] is model.user_emb


def test_inference_caches_the_tables_and_training_does_not(monkeypatch):
    model = _tiny(2)
    calls = []
    original = LightGCN.propagate
    monkeypatch.setattr(LightGCN, "propagate", lambda self: calls.append(1) or original(self))
    with torch.inference_mode():
        first = model.score_all(torch.tensor([0, 1]))
        model.score_all(torch.tensor([1]))
        model.score(torch.tensor([0]), torch.tensor([[2, 1]]))
    with torch.no_grad():
        model.score_all(torch.tensor([0]))
    assert len(calls) == 1  # one propagation for every inference call
    model.score_all(torch.tensor([0]))  # eval, but gradients wanted: recomputed, so they can flow
    assert len(calls) == 2
    model.train()
    with torch.no_grad():
        model.score_all(torch.tensor([0]))
        model.score_all(torch.tensor([0]))
    assert len(calls) == 4  # training: one propagation per forward
    model.eval()
    with torch.no_grad():
        again = model.score_all(torch.tensor([0, 1]))
    assert len(calls) == 5 and torch.equal(first, again)  # train() dropped the cache


def test_cache_is_invalidated_by_parameter_changes():
    model = _tiny(1)
    users = torch.tensor([0, 1])
    with torch.no_grad():
        before = model.score_all(users)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model.score_all(users).sum().backward()
    optimizer.step()  # an in-place update
    model.eval()
    with torch.no_grad():
        after_step = model.score_all(users)
        assert not torch.allclose(before, after_step)
        model.item_emb.weight[2] += 1.0  # an in-place edit in eval mode, no train() in between
        edited = model.score_all(users)
        assert torch.allclose(edited, model.propagate()[0][users] @ model.propagate()[1].T)
        assert not torch.allclose(edited, after_step)
        model.load_state_dict(_tiny(1).state_dict())  # back to the original weights
        assert torch.allclose(model.score_all(users), before)


def test_state_dict_carries_the_graph_and_rebuilds_from_model_args():
    torch.manual_seed(0)
    csr = _random_graph(11, 17, 3)
    model = build_model("lightgcn", n_users=11, n_items=17, dim=4, n_layers=2, graph=csr).eval()
    args = json.loads(json.dumps(model_args(model)))
    assert args["n_layers"] == 2 and args["n_edges"] == csr.nnz
    assert set(model.state_dict()) == {"user_emb.weight", "item_emb.weight", "graph_edges"}
    assert count_parameters(model) == (11 + 17) * 4  # the edges are a buffer, not a parameter
    rebuilt = build_model(**args)  # zero edges of the recorded count, filled by load_state_dict
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert torch.equal(rebuilt.graph_edges, model.graph_edges)
    with torch.no_grad():
        assert torch.equal(rebuilt.score_all(torch.arange(11)), model.score_all(torch.arange(11)))


def test_cosine_temperature_travels_in_model_args_and_older_args_mean_dot_product():
    torch.manual_seed(0)
    model = build_model("lightgcn", n_users=11, n_items=17, dim=4, graph=_random_graph(11, 17, 6),
                        cosine_temperature=0.1).eval()
    args = json.loads(json.dumps(model_args(model)))
    assert args["cosine_temperature"] == 0.1
    rebuilt = build_model(**args)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval().score_all(torch.arange(11)), model.score_all(torch.arange(11)))
    del args["cosine_temperature"]  # a checkpoint written before the option existed
    assert build_model(**args).cosine_temperature == 0.0


@pytest.mark.parametrize("cosine_temperature", [0.0, 0.1])
def test_checkpoint_round_trip_with_weights_only(tmp_path, cosine_temperature):
    torch.manual_seed(0)
    csr = _random_graph(11, 17, 4)
    model = build_model("lightgcn", n_users=11, n_items=17, dim=4, graph=csr,
                        cosine_temperature=cosine_temperature).eval()
    vocab = Vocab(user_ids=np.array([f"u{i}" for i in range(11)]), item_ids=np.array([f"i{i}" for i in range(17)]),
                  seen=csr)
    save_checkpoint(tmp_path / "ckpt", model, role="teacher", config={}, vocab=vocab)
    state = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert torch.equal(state["graph_edges"], graph_edges(csr, 11, 17))
    loaded = load_checkpoint(tmp_path / "ckpt").model  # build_model(**args) + load_state_dict, weights_only
    assert isinstance(loaded, LightGCN) and loaded.n_layers == model.n_layers
    assert loaded.cosine_temperature == cosine_temperature
    with torch.no_grad():
        assert torch.equal(loaded.score_all(torch.arange(11)), model.score_all(torch.arange(11)))


def test_ddp_ignores_the_graph_buffer():
    # DistributedDataParallel reads this list: the edges are neither broadcast at wrap time nor before each forward
    model = _tiny(1)
    assert model._ddp_params_and_buffers_to_ignore == ["graph_edges"]
    assert "graph_edges" in dict(model.named_buffers())


def test_to_another_dtype_and_back_rebuilds_nothing_stale():
    model = _tiny(1)
    with torch.no_grad():
        before = model.score_all(torch.tensor([0]))
        model.double()  # new parameter tensors: the cache key changes
        assert model.score_all(torch.tensor([0])).dtype == torch.float64
        model.float()
        assert torch.allclose(model.score_all(torch.tensor([0])), before)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(), ConfigError, "training graph"),
        (dict(n_edges=-1), ConfigError, "training graph"),
        (dict(graph=(TINY_USERS, TINY_ITEMS), hidden=(4,)), ConfigError, "hidden"),
        (dict(graph=(TINY_USERS, TINY_ITEMS), dropout=0.1), ConfigError, "dropout"),
        (dict(graph=(TINY_USERS, TINY_ITEMS), n_layers=-1), ConfigError, "n_layers"),
        (dict(graph=(TINY_USERS, TINY_ITEMS), n_layers=1.5), ConfigError, "n_layers"),
        (dict(graph=(np.array([0, 2]), np.array([0, 1]))), DataError, "row ids"),
        (dict(graph=(np.array([], dtype=int), np.array([], dtype=int))), DataError, "no interactions"),
        (dict(graph=Csr.from_pairs(np.array([0]), np.array([0]), 3, 3)), DataError, "3 users x 3 items"),
        (dict(graph=(TINY_USERS, TINY_ITEMS), cosine_temperature=-0.1), ConfigError, "cosine_temperature"),
        (dict(graph=(TINY_USERS, TINY_ITEMS), cosine_temperature=float("nan")), ConfigError, "cosine_temperature"),
        (dict(graph=(TINY_USERS, TINY_ITEMS), cosine_temperature=True), ConfigError, "cosine_temperature"),
    ],
)
def test_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        build_model("lightgcn", n_users=2, n_items=3, dim=2, **kwargs)


def test_other_models_refuse_a_cosine_temperature():
    with pytest.raises(ConfigError, match="cosine_temperature=0.1 is a lightgcn option; model 'mf'"):
        build_model("mf", n_users=2, n_items=3, dim=2, cosine_temperature=0.1)


def test_corrupt_edges_from_a_state_dict_are_refused():
    model = _tiny(1)
    state = model.state_dict()
    state["graph_edges"] = torch.tensor([[0, 0, 1], [0, 1, 7]])  # item 7 of 3
    model.load_state_dict(state)
    with pytest.raises(DataError, match="outside 2 users x 3 items"):
        with torch.no_grad():
            model.score_all(torch.tensor([0]))


def test_symmetric_spmm_gives_the_dense_products_and_gradient():
    # the CSR propagation and its hand-written backward (adj @ grad, as adj is symmetric) against dense autograd
    csr = _random_graph(9, 13, seed=7)
    model = build_model("lightgcn", n_users=9, n_items=13, dim=3, n_layers=2, graph=csr)
    adj = model.adjacency(torch.float64)
    assert adj.layout == torch.sparse_csr
    dense = normalized_adjacency(model.graph_edges, 9, 13).to(torch.float64).to_dense()
    assert torch.equal(adj.to_dense(), dense)
    torch.manual_seed(0)
    x = torch.randn(22, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(22, 3, dtype=torch.float64)
    y = SymmetricSpmm.apply(adj, x)
    (y * upstream).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = dense @ x_ref
    (y_ref * upstream).sum().backward()
    assert torch.allclose(y, y_ref) and torch.allclose(x.grad, x_ref.grad)
    assert torch.allclose(x.grad, dense.T @ upstream)  # the transpose, which equals adj here


def test_pickle_and_deepcopy_after_propagation_rebuild_the_graph_matrix():
    import copy
    import pickle

    model = _tiny(2)
    with torch.no_grad():
        before = model.score_all(torch.tensor([0, 1]))  # builds the CSR matrix and caches the tables
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone._adjacency is None and clone._cache is None
        with torch.no_grad():
            assert torch.equal(clone.score_all(torch.tensor([0, 1])), before)
    assert model._adjacency is not None  # the original keeps its own


# ----------------------------------------------------------------------------------------------------------------
# Ranking over the users' known history: test ranks over train + valid, validation over train.


def test_with_history_hand_computed_one_layer():
    model = _tiny(1)
    with torch.no_grad():
        before = model.score_all(torch.tensor([0, 1]))
    # the tiny graph plus (user 1, item 2): degrees u0 = 2, u1 = 2, i0 = 1, i1 = 2, i2 = 1
    known = Csr.from_pairs(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 2]), 2, 3)
    wider = model.with_history(known)
    u = [(1 + (S * 3 + 0.5 * 4)) / 2, (2 + (0.5 * 4 + S * 5)) / 2]  # (E0 + Â E0) / 2 of users 0 and 1
    i = [(3 + S * 1) / 2, (4 + 0.5 * 1 + 0.5 * 2) / 2, (5 + S * 2) / 2]
    with torch.no_grad():
        assert torch.allclose(wider.score_all(torch.tensor([0, 1])), torch.tensor(u)[:, None] * torch.tensor(i))
    assert wider.user_emb.weight is model.user_emb.weight and wider.item_emb.weight is model.item_emb.weight
    assert not wider.training and model.graph_edges.shape[1] == 3  # the original keeps its own graph and scores
    with torch.no_grad():
        assert torch.equal(model.score_all(torch.tensor([0, 1])), before)
    assert model.with_history(Csr.from_pairs(TINY_USERS, TINY_ITEMS, 2, 3)) is model  # its own graph: itself


def test_with_history_matches_a_model_built_on_that_graph_and_other_models_ignore_it():
    from kdray.distill.teacher import Ensemble

    train, known = _random_graph(12, 9, seed=1), _random_graph(12, 9, seed=2)
    model = build_model("lightgcn", n_users=12, n_items=9, dim=4, graph=train).eval()
    direct = build_model("lightgcn", n_users=12, n_items=9, dim=4, graph=known).eval()
    direct.load_state_dict({**model.state_dict(), "graph_edges": direct.graph_edges})
    users = torch.arange(12)
    with torch.no_grad():
        own = model.score_all(users)
        assert torch.allclose(model.with_history(known).score_all(users), direct.score_all(users))
        assert torch.equal(model.score_all(users), own)
        ensemble = Ensemble([model, model]).with_history(known)
        assert all(torch.equal(m.graph_edges, direct.graph_edges) for m in ensemble.members)
        # a model twice is itself: the log of the mixture of two equal softmax distributions
        assert torch.allclose(ensemble.score_all(users), direct.score_all(users).log_softmax(-1), atol=1e-6)
    mf = build_model("mf", n_users=12, n_items=9, dim=4)
    assert mf.with_history(known) is mf and Ensemble([mf]).with_history(known).members[0] is mf


def test_evaluation_ranks_test_over_train_and_valid_and_validation_over_train():
    from pathlib import Path

    from kdray.data.prepare import PreparedData
    from kdray.evaluate import evaluate_model
    from kdray.metrics import full_ranking_evaluate

    rng = np.random.default_rng(3)
    train = _random_graph(40, 30, seed=4)
    # random pairs; overlaps with train do not matter here, since both sides of each check mask the same pairs
    valid, test = (Csr.from_pairs(rng.integers(0, 40, n), rng.integers(0, 30, n), 40, 30) for n in (60, 80))
    data = PreparedData(path=Path("."), n_users=40, n_items=30, train=train, valid=valid, test=test,
                        user_ids=np.arange(40).astype(str), item_ids=np.arange(30).astype(str), user_features=None,
                        item_features=None, meta={})
    model = build_model("lightgcn", n_users=40, n_items=30, dim=8, graph=train).eval()
    union = Csr.union(train, valid)
    on_union = build_model("lightgcn", n_users=40, n_items=30, dim=8, graph=union).eval()
    on_union.load_state_dict({**model.state_dict(), "graph_edges": on_union.graph_edges})
    with torch.no_grad():
        expected = full_ranking_evaluate(on_union.score_all, test, [train, valid], (5,))
        own_graph = full_ranking_evaluate(model.score_all, test, [train, valid], (5,))
        assert evaluate_model(model, data, "test", ks=(5,)) == expected != own_graph
        assert evaluate_model(model, data, "valid", ks=(5,)) == full_ranking_evaluate(model.score_all, valid,
                                                                                      [train], (5,))
    assert union.nnz == len({(u, i) for c in (train, valid) for u, i in zip(c.rows_of(), c.indices)})
