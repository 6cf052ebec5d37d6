"""Linear regression head with a parameter-free "unscale" (the inverse of the data standardisation).

The linear layer predicts standardised targets; the loss is taken there (so every output dimension
weighs alike), and predictions are mapped back to data units by ``y = z * std + mean`` with the
dataset's statistics held as buffers (saved with the checkpoint, never trained).

Forecasting heads can add a **linear skip** from the observed history (``skip: x`` for the sensor graph,
``skip: obs`` for trajectories): ``z = linear(pooled) + W h + b``, where ``h`` [B, T_in, R] is the batch's
history and ``W`` [T_out, T_in] maps the input steps to the output steps, shared over the R series (sensors,
coordinates). This is LSTNet's autoregressive "highway" (Lai et al., SIGIR 2018): the linear part carries the
scale and the regular cycle of each series, which a pooled token of a language model reproduces poorly, and
the LLM path learns what is left. ``skip_init: least_squares`` (the default) starts ``W`` and ``b`` at the
ridge solution over the training split (``init_from_data``, called by the trainer once before the first
step; observed targets only) and the pooled linear layer at zero, so training starts from the linear fit and
the LLM path learns the residual; ``zeros`` starts the skip at zero. The evaluation's
``linear_autoregressive`` / ``ridge`` baselines are the closed-form fit of a linear map alone, which says what
the rest of the model adds.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from allspark.registry import HEADS
from allspark.sizing import as_int_list, from_data
from allspark.types import LLMOutput, Output, pooled_size


@HEADS.register("regression")
class RegressionHead(nn.Module):
    """Pooled hidden state -> ``out_shape`` targets.

    ``target_mean`` / ``target_std`` come from the dataset info (keys of the same names) unless given;
    they broadcast against ``out_shape``, which defaults to the info's ``target_shape``. When the batch holds ``<target_key>_mask`` (True = observed),
    only observed targets enter the loss (for example the zero readings of traffic sensors).
    """

    def __init__(
        self,
        hidden_size: int,
        out_shape: int | Sequence[int] | None = None,
        *,
        info: dict[str, Any] | None = None,
        target_mean: float | list | None = None,
        target_std: float | list | None = None,
        pooling: str = "last",
        target_key: str = "target",
        loss: str = "mse",
        skip: str | None = None,
        skip_len: int | None = None,
        skip_scale: float | str = 1.0,
        skip_init: str = "least_squares",
    ) -> None:
        super().__init__()
        info = info or {}
        # unset: the reader's target shape (info ``target_shape``, e.g. [horizon, number of sensors]); set:
        # checked against it. A bare number is a shape of one dimension.
        shape = from_data("regression head", "out_shape", out_shape, info, "target_shape", where="model.head.args",
                          found="gives targets of shape {}",
                          convert=lambda v: as_int_list([v] if isinstance(v, numbers.Real) else v))
        self.out_shape = tuple(shape)
        if not self.out_shape or min(self.out_shape) < 1:
            raise ValueError(f"regression head: out_shape must list sizes >= 1, got {list(self.out_shape)}")
        mean = target_mean if target_mean is not None else info.get("target_mean", 0.0)
        std = target_std if target_std is not None else info.get("target_std", 1.0)
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if not torch.isfinite(std_t).all() or (std_t <= 0).any():
            raise ValueError(f"regression head: target_std must be finite and positive, got {std}")
        torch.broadcast_shapes(mean_t.shape, self.out_shape)
        torch.broadcast_shapes(std_t.shape, self.out_shape)
        self.register_buffer("target_mean", mean_t)
        self.register_buffer("target_std", std_t)
        if loss not in ("mse", "l1", "huber"):
            raise ValueError(f"regression head: loss must be 'mse', 'l1' or 'huber', got {loss!r}")
        self.loss_name = loss
        self.pooling = pooling
        self.target_key = target_key
        size = pooled_size(pooling, hidden_size)
        self.norm = nn.LayerNorm(size)
        self.linear = nn.Linear(size, math.prod(self.out_shape))
        # the linear skip from the observed history (module docstring); None: no skip
        self.skip_key = skip
        self.skip = None
        if skip is not None:
            if not isinstance(skip, str) or not skip:
                raise ValueError(f"regression head: skip must name a batch key of the history (e.g. 'x'), got {skip!r}")
            if len(self.out_shape) < 2:
                raise ValueError("regression head: skip needs an out_shape of [output steps, series ...], "
                                 f"got {list(self.out_shape)}")
            # unset: the reader's input window (info ``input_len`` for sensor series, ``obs_len`` for tracks)
            key = "input_len" if info.get("input_len") is not None or info.get("obs_len") is None else "obs_len"
            steps = from_data("regression head", "skip_len", skip_len, info, key, where="model.head.args",
                              found="gives {} input steps")
            if steps < 1:
                raise ValueError(f"regression head: skip_len must be >= 1, got {steps}")
            if skip_scale == "target_std":  # history in the targets' units (e.g. positions): one typical spread
                skip_scale = float(std_t.mean())
            if isinstance(skip_scale, bool) or not isinstance(skip_scale, numbers.Real) or not skip_scale > 0 \
                    or not math.isfinite(skip_scale):
                raise ValueError("regression head: skip_scale must be a positive number or 'target_std', "
                                 f"got {skip_scale!r}")
            self.skip_scale = float(skip_scale)
            if skip_init not in ("least_squares", "zeros"):
                raise ValueError(f"regression head: skip_init must be 'least_squares' or 'zeros', got {skip_init!r}")
            self.skip_init = skip_init
            self.skip = nn.Linear(steps, self.out_shape[0])
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.target_std + self.target_mean

    def scale(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.target_mean) / self.target_std

    @torch.no_grad()
    def init_from_data(self, batches, ridge: float = 1e-3) -> dict[str, Any] | None:
        """Ridge fit of the skip on ``batches`` (the training split, in a fixed order): per output step
        ``o``, ``[W_o, b_o] = argmin sum over observed (sample, series) of (W_o h + b_o - z_o)^2 + ridge |W_o|^2``
        in standardised target units; then the pooled linear layer is zeroed, so the head starts as that linear
        fit. Returns a summary (rows used, the fit's mean squared error), or None when there is nothing to do."""
        if self.skip is None or self.skip_init != "least_squares":
            return None
        steps, out_steps = self.skip.in_features, self.out_shape[0]
        gram = torch.zeros(out_steps, steps + 1, steps + 1, dtype=torch.float64)
        rhs = torch.zeros(out_steps, steps + 1, dtype=torch.float64)
        yy = torch.zeros(out_steps, dtype=torch.float64)
        rows = torch.zeros(out_steps, dtype=torch.float64)
        for batch in batches:
            target = batch[self.target_key]
            b = target.shape[0]
            h = self._history(batch, b).double()  # [B, T_in, S]
            h1 = torch.cat([h, torch.ones_like(h[:, :1])], dim=1).transpose(1, 2)  # [B, S, T_in + 1]
            z = self.scale(target.float()).double().reshape(b, out_steps, -1)  # [B, T_out, S]
            mask = batch.get(f"{self.target_key}_mask")
            m = torch.ones_like(z) if mask is None else mask.reshape(b, out_steps, -1).to(z.dtype)
            gram += torch.einsum("bos,bst,bsu->otu", m, h1, h1)
            rhs += torch.einsum("bos,bst,bos->ot", m, h1, z)
            yy += torch.einsum("bos,bos->o", m, z * z)
            rows += m.sum(dim=(0, 2))
        if (rows == 0).any():
            raise ValueError("regression head: no observed training target to fit the skip at output step(s) "
                             f"{(torch.nonzero(rows == 0).flatten() + 1).tolist()}")
        penalty = ridge * torch.eye(steps + 1, dtype=torch.float64) * rows.mean()
        penalty[-1, -1] = 0.0  # the intercept is not penalised
        coef = torch.linalg.solve(gram + penalty, rhs[..., None])[..., 0]  # [T_out, T_in + 1]
        mse = (yy - 2 * (coef * rhs).sum(-1) + torch.einsum("ot,otu,ou->o", coef, gram, coef)) / rows
        self.skip.weight.copy_(coef[:, :steps].float())
        self.skip.bias.copy_(coef[:, steps].float())
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        return {"rows": int(rows.sum()), "fit_mse": float(mse.mean())}

    def _history(self, batch: dict[str, Any], b: int) -> torch.Tensor:
        """The skip's input as [B, T_in, series], divided by ``skip_scale`` (checked against out_shape)."""
        if self.skip_key not in batch:
            raise ValueError(f"regression head: skip={self.skip_key!r} but the batch has no such key "
                             f"(keys: {', '.join(sorted(map(str, batch)))})")
        h = batch[self.skip_key]
        series = math.prod(self.out_shape[1:])
        steps = self.skip.in_features
        if not torch.is_tensor(h) or h.dim() < 2 or h.shape[0] != b or h.shape[1] != steps \
                or math.prod(h.shape[2:]) != series:
            found = list(h.shape) if torch.is_tensor(h) else type(h).__name__
            raise ValueError(f"batch[{self.skip_key!r}]: the skip expects [B={b}, {steps} steps, series with "
                             f"{series} values in all] (out_shape {list(self.out_shape)}), got {found}")
        return h.float().reshape(b, steps, series) / self.skip_scale

    def _skip(self, batch: dict[str, Any], b: int) -> torch.Tensor:
        """W h + b: the history's steps mapped linearly to the output steps, one map for every series."""
        h = self._history(batch, b)
        out = torch.einsum("bts,ot->bos", h, self.skip.weight.to(h.dtype)) + self.skip.bias[None, :, None]
        return out.reshape(b, *self.out_shape)

    def forward(self, llm_out: LLMOutput, batch: dict[str, Any]) -> Output:
        pooled = self.norm(llm_out.pool(self.pooling).float())
        z = self.linear(pooled).view(-1, *self.out_shape)
        if self.skip is not None:
            z = z + self._skip(batch, z.shape[0])
        loss = None
        target = batch.get(self.target_key)
        if target is not None:
            if target.shape[1:] != self.out_shape:
                raise ValueError(
                    f"batch[{self.target_key!r}]: expected shape [*, {', '.join(map(str, self.out_shape))}],"
                    f" got {list(target.shape)}"
                )
            err = z - self.scale(target.float())
            fn = {"mse": lambda e: e.square(), "l1": lambda e: e.abs(),
                  "huber": lambda e: F.huber_loss(e, torch.zeros_like(e), reduction="none")}[self.loss_name]
            per = fn(err)
            mask = batch.get(f"{self.target_key}_mask")
            if mask is not None:
                mask = mask.to(per.dtype)
                loss = (per * mask).sum() / mask.sum().clamp_min(1.0)
            else:
                loss = per.mean()
        return Output(loss, {"pred": self.unscale(z)})
