"""GraSP scores, w * (H g), on a plain Linear-Tanh-Linear model against a dense float64
reference from torch.func (g = grad of the mean loss, H g = the vector-Jacobian product
of that gradient with g), for every way of computing H g, with a squared-error and a cross-entropy loss."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparseft import SparseConfig, get_sparse_model
from sparseft.scoring import grasp


class TwoLayer(nn.Module):
    def __init__(self, loss: str):
        super().__init__()
        self.fc1, self.fc2, self.loss = nn.Linear(6, 8), nn.Linear(8, 3), loss

    def forward(self, x, labels):
        out = self.fc2(torch.tanh(self.fc1(x)))
        if self.loss == "mse":
            return {"loss": F.mse_loss(out, labels), "logits": out}
        return {"loss": F.cross_entropy(out, labels), "logits": out}


def model_and_batches(loss: str):
    torch.manual_seed(0)
    plain = TwoLayer(loss)
    batches = []
    for n in (4, 3):  # unequal batches: g and H g are example-weighted means
        x = torch.randn(n, 6)
        labels = torch.randn(n, 3) if loss == "mse" else torch.randint(0, 3, (n,))
        batches.append({"x": x, "labels": labels})
    sparse = get_sparse_model(copy.deepcopy(plain), SparseConfig(method="random", num_params=1,
                                                                 target_modules=["fc1", "fc2"]))
    sparse.set_index_sets({n: torch.zeros(0, dtype=torch.int32) for n in sparse.target_names})
    return plain, sparse, batches


def reference_scores(plain: nn.Module, batches) -> dict[str, torch.Tensor]:
    plain = copy.deepcopy(plain).double()
    params = {name: p.detach() for name, p in plain.named_parameters()}
    weights = {name: p for name, p in params.items() if name.endswith("weight")}
    total = sum(len(b["x"]) for b in batches)

    def mean_loss(w):
        loss = 0.0
        for b in batches:
            b = {k: v.double() if v.is_floating_point() else v for k, v in b.items()}
            out = torch.func.functional_call(plain, {**params, **w}, (), b)
            loss = loss + out["loss"] * len(b["x"]) / total
        return loss

    g = torch.func.grad(mean_loss)(weights)
    # reverse over reverse (forward mode is what is under test); H is symmetric, so H^T g = H g
    _, pullback = torch.func.vjp(torch.func.grad(mean_loss), weights)
    (hg,) = pullback(g)
    return {name[: -len(".weight")]: (weights[name] * hg[name]).float().reshape(-1) for name in weights}


def assert_matches(got, expected):
    assert set(got) == set(expected)
    for name, ref in expected.items():
        assert float(ref.abs().max()) > 0
        torch.testing.assert_close(got[name], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("hg_method", ["auto", "forward-over-reverse", "double-backward"])
@pytest.mark.parametrize("micro_batch", [None, 1])
def test_grasp_equals_the_dense_reference(loss, hg_method, micro_batch):
    plain, sparse, batches = model_and_batches(loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback needed
        got = grasp.grasp_scores(sparse.sparse_layers(), model=sparse, data=batches, micro_batch=micro_batch,
                                 hg_method=hg_method)
    assert_matches(got, reference_scores(plain, batches))


def test_a_zero_tangent_error_falls_back_to_double_backward_with_the_reason(monkeypatch):
    """Without the squared-error decomposition, forward-mode AD hits PyTorch's immutable
    zero tangent in mse_loss's backward; auto then says so and takes double backward."""
    plain, sparse, batches = model_and_batches("mse")
    monkeypatch.setattr(grasp, "_ForwardModeFriendly", _Nothing)
    layers = sparse.sparse_layers()
    with pytest.raises(RuntimeError, match="ZeroTensors are immutable"):
        grasp.grasp_scores(layers, model=sparse, data=batches, hg_method="forward-over-reverse")
    with pytest.warns(RuntimeWarning, match="ZeroTensors are immutable.*double backward"):
        got = grasp.grasp_scores(layers, model=sparse, data=batches)
    assert_matches(got, reference_scores(plain, batches))


def test_other_runtime_errors_are_not_swallowed(monkeypatch):
    _, sparse, batches = model_and_batches("mse")

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")
    monkeypatch.setattr(grasp, "_hg_forward_over_reverse", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        grasp.grasp_scores(sparse.sparse_layers(), model=sparse, data=batches)


class _Nothing(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))
