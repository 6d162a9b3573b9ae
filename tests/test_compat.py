"""The recipes of docs/compatibility.md: models nobody here wrote, wrapped in one line.

torchdiffeq and lightning come from the ``integrations`` extra; their tests skip without it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from noether_experiments.models import Seq2Seq, Transformer
from noether_wrap import Affine, NoetherWrapper, Rollout
from noether_wrap.embeddings import MLPEmbedding


def _train_step(net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    opt.zero_grad()
    nn.functional.mse_loss(net(x), target).backward()
    opt.step()


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_rnn_default_wrap_says_what_will_work(cell: type[nn.Module]) -> None:
    """vmap has no batching rule for the RNN kernels: the error names the cause and the ways
    through, and the affine adapt is one of them."""
    torch.manual_seed(0)
    model = Seq2Seq(cell)
    frames = torch.randn(3, 6, 2)
    net = NoetherWrapper(model, MLPEmbedding(2))
    with pytest.raises(ValueError, match="Affine.*low-rank.*per_sample=False") as info:
        net(frames)
    assert "fit the model" not in str(info.value)
    for fix in (Affine("decoder"), "head.*"):
        net = NoetherWrapper(model, MLPEmbedding(2), adapt=fix)
        _train_step(net, frames, torch.randn(3, 5, 2))
        assert net.last_path == ("affine" if isinstance(fix, Affine) else "lowrank")
    shared = NoetherWrapper(model, MLPEmbedding(2), per_sample=False)
    _train_step(shared, frames, torch.randn(3, 5, 2))


def test_tailor_works_wherever_forward_works() -> None:
    """A GRU tailored on its nn.Linear head runs on the low-rank path; tailor() must still give
    the weights (one sequence at a time), and tailored_model must reproduce forward."""
    torch.manual_seed(0)
    net = NoetherWrapper(Seq2Seq(nn.GRU).double(), MLPEmbedding(2).double(), adapt="head.*")
    frames = torch.randn(3, 6, 2, dtype=torch.float64)
    out = net(frames)
    weights = net.tailor(frames)
    assert weights["head.weight"].shape == (3, 2, 16)
    for i in range(3):
        copy = net.tailored_model(frames, index=i)
        torch.testing.assert_close(copy(frames[i : i + 1])[0], out[i], rtol=1e-9, atol=1e-10)


def test_keep_if_better_is_honoured_by_tailored_model() -> None:
    torch.manual_seed(0)
    step = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    net = NoetherWrapper(
        Rollout(step, 4), MLPEmbedding(2).double(), inner_lr=30.0, keep_if_better=True
    )
    x = torch.randn(6, 2, dtype=torch.float64)
    info = net(x, return_info=True)
    worse = info.noether_losses[:, -1] >= info.noether_losses[:, 0]
    assert bool(worse.any()) and not bool(worse.all())  # the case this test is about
    for i in range(6):
        copy = net.tailored_model(x, index=i)
        torch.testing.assert_close(copy(x[i : i + 1])[0], info.prediction[i], rtol=1e-9, atol=1e-10)


def test_causal_transformer_trains_on_every_path() -> None:
    """Second order through fused attention: the wrapper runs attention on the math kernel
    while the inner gradient is differentiated again."""
    torch.manual_seed(0)
    model = Transformer()
    frames, target = torch.randn(3, 6, 2), torch.randn(3, 5, 2)
    for kwargs in ({}, {"per_sample": False}, {"adapt": Affine("encoder.layers.*.linear2")}):
        net = NoetherWrapper(model, MLPEmbedding(2), inner_lr=0.05, **kwargs)
        _train_step(net, frames, target)
        assert all(torch.isfinite(p).all() for p in net.parameters())


class _NoGradInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.step = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return Rollout(self.step, 3)(x)


def test_a_model_without_autograd_inside_is_not_a_silent_no_op() -> None:
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="does not depend on the adapted parameters"):
        NoetherWrapper(_NoGradInside(), MLPEmbedding(2), per_sample=False)(x)
    for path in ("lowrank", "vmap"):
        net = NoetherWrapper(_NoGradInside(), MLPEmbedding(2), per_sample_path=path)
        with pytest.warns(RuntimeWarning, match="did not change the prediction"):
            net(x)


def test_tuple_and_dict_outputs_through_an_adapter() -> None:
    class TupleModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rollout = Rollout(nn.Linear(2, 2), 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            pred = self.rollout(x)
            return pred, {"pred": pred, "aux": pred.sum()}

    class First(nn.Module):
        """Adapter: the prediction out of a model that returns more."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.model(x)[1]["pred"]
            return out

    x = torch.randn(3, 2)
    with pytest.raises(TypeError, match="must return a Tensor"):
        NoetherWrapper(TupleModel(), MLPEmbedding(2))(x)
    net = NoetherWrapper(First(TupleModel()), MLPEmbedding(2))
    assert net(x).shape == (3, 4, 2)


def test_dropout_and_mutated_buffers() -> None:
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.2), nn.Linear(8, 2))
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return Rollout(self.step, 3)(x)

    model = Counting()
    net = NoetherWrapper(model, MLPEmbedding(2), per_sample=False, inner_steps=3)
    net(torch.randn(4, 2))
    assert int(model.calls) == 1  # one call, as unwrapped: the inner rollouts ran on clones
    net.eval()  # dropout off: the call is deterministic
    x = torch.randn(4, 2)
    torch.testing.assert_close(net(x), net(x))
    assert int(model.calls) == 3


class _ODE(nn.Module):
    def __init__(self, adjoint: bool) -> None:
        super().__init__()
        self.field = _Field()
        self.adjoint = adjoint
        self.register_buffer("t", torch.linspace(0, 1, 6))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        from torchdiffeq import odeint, odeint_adjoint

        if self.adjoint:
            out = odeint_adjoint(
                self.field,
                x0,
                self.t,
                method="rk4",
                options={"step_size": 0.1},
                adjoint_params=tuple(self.field.parameters()),
            )
        else:
            out = odeint(self.field, x0, self.t, method="rk4", options={"step_size": 0.1})
        result: torch.Tensor = out[1:].transpose(0, 1)
        return result


class _Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def test_torchdiffeq_odeint_trains_and_vmap_says_why_not() -> None:
    pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    x, target = torch.randn(4, 2), torch.randn(4, 5, 2)
    net = NoetherWrapper(_ODE(adjoint=False), MLPEmbedding(2), inner_lr=0.1)
    _train_step(net, x, target)
    assert net.last_path == "lowrank"
    assert all(p.grad is not None for p in net.embedding.parameters())
    vmap = NoetherWrapper(_ODE(adjoint=False), MLPEmbedding(2), per_sample_path="vmap")
    with pytest.raises(ValueError, match="'vmap' path cannot tailor it.*Affine"):
        vmap(x)


def test_torchdiffeq_odeint_adjoint_is_never_silent() -> None:
    pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    x = torch.randn(4, 2)
    with pytest.warns(RuntimeWarning, match="did not change the prediction"):
        NoetherWrapper(_ODE(adjoint=True), MLPEmbedding(2))(x)
    shared = NoetherWrapper(_ODE(adjoint=True), MLPEmbedding(2), per_sample=False)
    with pytest.warns(RuntimeWarning, match="inner gradient carries no graph"):
        shared(x).pow(2).mean().backward()
    assert all(p.grad is None for p in shared.embedding.parameters())


def test_lightning_trains_a_wrapped_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            step = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
            self.net = NoetherWrapper(Rollout(step, 4), MLPEmbedding(2), inner_lr=0.05)

        def training_step(self, batch, _):  # type: ignore[no-untyped-def]
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    data = torch.utils.data.TensorDataset(torch.randn(16, 2), torch.randn(16, 4, 2))
    module = Module()
    before = module.net.embedding.net[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = lightning.Trainer(
            max_steps=3,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert not torch.equal(before, module.net.embedding.net[0].weight)
