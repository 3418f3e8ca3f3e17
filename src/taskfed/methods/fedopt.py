"""Server optimisers on the averaged update: FedAvgM, FedAdagrad, FedYogi, FedAdam (methods.md, "More
methods"). The clients do exactly FedAvg's job; the server treats the round's mean update as a
pseudo-gradient and takes one optimizer step on the global adapter, elementwise on every A and B tensor:

    Delta_t = mean_i (y_i - x_t)            (sample-weighted for FedAvgM, uniform for the adaptive three)
    FedAvgM    u_t = beta u_{t-1} + Delta_t;                     x_{t+1} = x_t + eta u_t
    adaptive   m_t = beta1 m_{t-1} + (1 - beta1) Delta_t
               FedAdagrad  v_t = v_{t-1} + Delta_t^2
               FedYogi     v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)
               FedAdam     v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2
               x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau);     m_{-1} = 0, v_{-1} = tau^2

The server state (u; m, v) is float64, lives in the method's attributes and so in every checkpoint, and
moves only in a round with at least one accepted upload. Evaluation: the one global adapter in every mode.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from taskfed.methods.base import RunningMean
from taskfed.methods.fedavg import FedAvg

State = dict[str, torch.Tensor]  # float64, adapter-shaped


class FedAvgMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    eta: float = Field(default=1.0, gt=0)  # server learning rate (Hsu et al.'s form: 1)
    beta: float = Field(default=0.9, ge=0, lt=1)  # server momentum (the FedOpt authors' server_sgd_momentum)
    # heavy_ball: u = beta u + Delta (Hsu, Flower); ema: OpenFedLLM's u = beta u + (1 - beta) Delta, u_0 = Delta_0
    avgm_form: Literal["heavy_ball", "ema"] = "heavy_ball"
    mean: Literal["samples", "uniform"] = "samples"  # how Delta weighs the clients (OpenFedLLM: by samples)


class FedOptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    eta: float = Field(default=1e-3, gt=0)  # OpenFedLLM's defaults; the paper tuned eta and tau per task
    tau: float = Field(default=1e-3, gt=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    # 0.99 (OpenFedLLM) by default; 0.999 (Keras) when bias_correction is on and beta2 is not given.
    beta2: float | None = Field(default=None, gt=0, lt=1)
    first_momentum: Literal["ema", "full"] = "ema"  # full: m_0 = Delta_0 (OpenFedLLM), not (1 - beta1) Delta_0
    # The authors' TF (Keras) optimisers: v starts at 0, epsilon = tau, and Adam/Yogi steps are scaled by
    # sqrt(1 - beta2^t) / (1 - beta1^t).
    bias_correction: bool = False
    mean: Literal["samples", "uniform"] = "uniform"  # how Delta weighs the clients (OpenFedLLM: uniformly)


class FedAdagradParams(FedOptParams):
    beta1: float = Field(default=0.0, ge=0, lt=1)  # m_t = Delta_t (OpenFedLLM; Keras Adagrad has no momentum)


class _ServerOptimizer(FedAvg):
    """FedAvg's clients; a server step after the streaming mean. Subclasses give `step(Delta) -> x change`."""

    def __init__(self, params, fed):
        super().__init__(params, fed)
        self.t = 0  # server steps taken (rounds with an accepted upload)
        self.step_norm = 0.0  # ||x_{t+1} - x_t|| of the last step, for the round's record

    def aggregate(self, round_idx: int, results) -> None:
        mean = RunningMean()
        for r in results:
            mean.add(r.weights, r.n_client if self.params.mean == "samples" else 1.0)
        if not mean:  # every upload was refused: no step, the state stays
            return
        x = self.global_adapter
        delta = {k: v.double() - x[k].double() for k, v in mean.mean().items()}
        self.t += 1
        change = self.step(delta)
        self.step_norm = float(sum(c.pow(2).sum() for c in change.values()) ** 0.5)
        self.global_adapter = {k: (x[k].double() + change[k]).float() for k in x}

    def step(self, delta: State) -> State:
        raise NotImplementedError

    def round_report(self, round_idx: int) -> dict:
        return {"server_step_norm": self.step_norm}


class FedAvgM(_ServerOptimizer):
    name = "fedavgm"
    Params = FedAvgMParams

    def __init__(self, params, fed):
        super().__init__(params, fed)
        self.u: State | None = None  # the server momentum

    def step(self, delta: State) -> State:
        p = self.params
        if self.u is None:  # u_{-1} = 0: both forms start at u_0 = Delta_0
            self.u = {k: d.clone() for k, d in delta.items()}
        elif p.avgm_form == "heavy_ball":
            self.u = {k: p.beta * self.u[k] + d for k, d in delta.items()}
        else:
            self.u = {k: p.beta * self.u[k] + (1 - p.beta) * d for k, d in delta.items()}
        return {k: p.eta * u for k, u in self.u.items()}


class _Adaptive(_ServerOptimizer):
    """The FedOpt family: Adam-like moments of the pseudo-gradient; subclasses give the second moment."""

    Params = FedOptParams

    def __init__(self, params, fed):
        super().__init__(params, fed)
        self.m: State | None = None  # kept only when beta1 > 0 (with beta1 = 0, m_t = Delta_t)
        self.v: State | None = None

    @property
    def beta2(self) -> float:
        p = self.params
        return p.beta2 if p.beta2 is not None else (0.999 if p.bias_correction else 0.99)

    def step(self, delta: State) -> State:
        p = self.params
        sq = {k: d * d for k, d in delta.items()}
        if self.v is None:
            v0 = 0.0 if p.bias_correction else p.tau ** 2
            self.v = {k: torch.full_like(d, v0) for k, d in delta.items()}
        self.v = {k: self.second_moment(self.v[k], sq[k]) for k in delta}
        if p.beta1 == 0:
            m = delta
        elif self.m is None and p.first_momentum == "full":
            m = self.m = {k: d.clone() for k, d in delta.items()}
        else:
            prev = self.m if self.m is not None else {k: torch.zeros_like(d) for k, d in delta.items()}
            m = self.m = {k: p.beta1 * prev[k] + (1 - p.beta1) * d for k, d in delta.items()}
        lr = p.eta * self.bias_factor()
        return {k: lr * m[k] / (self.v[k].sqrt() + p.tau) for k in delta}

    def bias_factor(self) -> float:
        """Keras's bias correction for the Adam-style second moments (Adagrad's sum needs none)."""
        p = self.params
        if not p.bias_correction:
            return 1.0
        return (1 - self.beta2 ** self.t) ** 0.5 / (1 - p.beta1 ** self.t)

    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FedAdagrad(_Adaptive):
    name = "fedadagrad"
    Params = FedAdagradParams

    def second_moment(self, v, sq):
        return v + sq

    def bias_factor(self) -> float:
        return 1.0


class FedYogi(_Adaptive):
    name = "fedyogi"

    def second_moment(self, v, sq):
        return v - (1 - self.beta2) * sq * torch.sign(v - sq)


class FedAdam(_Adaptive):
    name = "fedadam"

    def second_moment(self, v, sq):
        return self.beta2 * v + (1 - self.beta2) * sq
