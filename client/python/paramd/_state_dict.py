"""torch's `state_dict()` and `load_state_dict()` for paramd.torch's
optimizers, read from and written to the server (see the README's
"Python client" section): the format, its checks against the job, and the
confirmation that a load was applied."""

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from . import errors
from .client import ParamState
from .config import Adam


class StateDict:
    """The state_dict half of `paramd.torch._Remote`. It relies on the
    optimizer's `client`, `job`, `round`, `rank`, `last`, `optimizer_step`,
    `_base` (the paramd optimizer), `_schedule`, `_names` and `_params`,
    and keeps `_loading`, the load sent for a round and not yet confirmed
    by its step: (round, id, states, optimizer step)."""

    _loading: Optional[Tuple[int, int, Dict[str, ParamState], int]] = None

    def _torch_groups(self, step: Optional[int] = None) -> List[Tuple[Dict[str, Any], List[str]]]:
        """The param groups as torch writes them in a state_dict (every
        setting but `params`), each with the names of its parameters; `lr`
        is the scheduled lr of optimizer step `step` (the next step's when
        None)."""
        raise NotImplementedError

    def _next_lr(self, base_lr: float, step: Optional[int] = None) -> float:
        """The lr a group of base lr `base_lr` steps with at optimizer step
        `step` (the next one when None), as torch's `group['lr']` holds it
        under LambdaLR."""
        if self._schedule is None:
            return base_lr
        return self._schedule.lr(base_lr, self.optimizer_step if step is None else step)

    def _buffers_kept(self, group: Mapping[str, Any]) -> List[str]:
        """The state buffers the job's optimizer keeps for a group, by torch's
        names."""
        if isinstance(self._base, Adam):
            return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group.get("amsgrad") else [])
        return ["momentum_buffer"] if group.get("momentum", 0) != 0 else []

    def _format(self, params: Mapping[str, ParamState], step: Optional[int]) -> Dict[str, Any]:
        """torch's state_dict of per-parameter states `params`, with the lrs
        of optimizer step `step`."""
        adam = isinstance(self._base, Adam)
        out_state: Dict[int, Dict[str, Any]] = {}
        out_groups = []
        index = 0
        for group, names in self._torch_groups(step):
            ids = []
            for n in names:
                ps = params.get(n)
                if ps is not None and ps.step > 0:
                    entry: Dict[str, Any] = {k: torch.from_numpy(np.array(v)) for k, v in ps.buffers.items()}
                    if adam:
                        entry = {"step": torch.tensor(float(ps.step)), **entry}
                    if entry:
                        out_state[index] = entry
                ids.append(index)
                index += 1
            out_groups.append(dict(group, params=ids))
        return {"state": out_state, "param_groups": out_groups}

    def state_dict(self) -> Dict[str, Any]:
        """The optimizer's state in torch's format, read from the server as
        of the current round: `{"state": {index: {...}}, "param_groups":
        [...]}`, parameters indexed as torch indexes them (in group order).
        SGD's entries hold `momentum_buffer`; Adam's and AdamW's `step` (a
        float32 scalar tensor, as torch keeps it), `exp_avg`, `exp_avg_sq`
        and, with amsgrad, `max_exp_avg_sq`. A parameter never stepped has
        no entry, as in torch. Each group's `lr` is the scheduled lr of the
        next step. `torch.save` keeps it, and a torch optimizer of the same
        parameters and groups continues from it with `load_state_dict`.
        After `load_state_dict` and before the next step, it is the state
        loaded."""
        if self._loading is not None and self._loading[0] == self.round:
            _, _, params, step = self._loading
            return self._format(params, step)
        return self._format(self.client.state(self.job, self.round).params, None)

    def load_state_dict(self, state_dict: Mapping[str, Any], *, step: Optional[int] = None) -> None:
        """Sets the optimizer state on the server from torch's format, as
        torch's `load_state_dict` does: each parameter's `step`,
        `momentum_buffer`, `exp_avg`, `exp_avg_sq` and `max_exp_avg_sq`,
        indexed in group order. The state_dict of a torch optimizer of the
        same parameters and groups moves a run onto paramd mid-training;
        one of `state_dict()` resumes it. A parameter without an entry
        starts afresh, as in torch.

        The state is loaded with the next step, before it, on every shard
        at once (`state_dict()` returns it meanwhile); that step raises
        `paramd.FailedPrecondition` if the server did not apply it. The
        groups' hyperparameters must be the job's, and each group's `lr`
        the job's schedule at the position loaded, `step` (by default
        Adam's largest per-parameter step, or the job's current step for
        SGD): the server keeps hyperparameters and schedule, and would not
        reproduce others. Under DistributedOptimizer every rank calls it
        with the same state, as with torch: rank 0 sends it, and every rank
        checks it."""
        params, step = self._read_state_dict(state_dict, step)
        load_id = 0
        if self.rank == 0:
            load_id = self.client.load_state(self.job, self.round, params, step)
        self._loading = (self.round, load_id, params, step)

    def _read_state_dict(self, state_dict: Mapping[str, Any], step: Optional[int]) -> Tuple[Dict[str, ParamState], int]:
        """The per-parameter states a torch state_dict gives, checked against
        the job, and the optimizer step to load at."""
        where = "load_state_dict"
        if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("param_groups"), (list, tuple)):
            raise errors.InvalidArgument("%s: a dict with 'state' and 'param_groups' is expected" % where)
        saved_groups = list(state_dict["param_groups"])
        saved_state = dict(state_dict.get("state") or {})
        groups = self._torch_groups()
        if len(saved_groups) != len(groups):
            raise errors.InvalidArgument(
                "%s: param_groups: %d groups, the optimizer has %d" % (where, len(saved_groups), len(groups))
            )
        adam = isinstance(self._base, Adam)
        shapes = dict(zip(self._names, (tuple(p.shape) for p in self._params)))
        entries = []
        for gi, ((mine, names), theirs) in enumerate(zip(groups, saved_groups)):
            ids = list(theirs.get("params", ()))
            if len(ids) != len(names):
                raise errors.InvalidArgument(
                    "%s: param_groups[%d] has %d parameters, the optimizer's %d" % (where, gi, len(ids), len(names))
                )
            for key in self._base.options:
                if key == "lr" or key not in theirs or key not in mine:
                    continue
                a, b = theirs[key], mine[key]
                if (tuple(a) if isinstance(a, (list, tuple)) else a) != (
                    tuple(b) if isinstance(b, (list, tuple)) else b
                ):
                    raise errors.InvalidArgument(
                        "%s: param_groups[%d].%s is %r, job %r's is %r: the server keeps the hyperparameters, "
                        "and would not reproduce another" % (where, gi, key, a, self.job, b)
                    )
            kept = self._buffers_kept(mine)
            entries.extend((gi, n, kept, ids[k]) for k, n in enumerate(names))
        known = {idx for _, _, _, idx in entries}
        unknown = [k for k in saved_state if k not in known]
        if unknown:
            raise errors.InvalidArgument(
                "%s: state holds entries %r that no param group lists" % (where, sorted(unknown, key=str))
            )

        def steps_of(entry: Mapping[str, Any], idx: Any) -> int:
            v = entry.get("step")
            f = float(v.item() if isinstance(v, torch.Tensor) else v)
            if not (f >= 0 and f == int(f)):
                raise errors.InvalidArgument("%s: state[%r].step is %r: a whole count is expected" % (where, idx, v))
            return int(f)

        if step is None:
            adam_steps = [steps_of(saved_state[i], i) for _, _, _, i in entries if adam and i in saved_state]
            step = max(adam_steps) if adam_steps else self.optimizer_step
        if not isinstance(step, int) or step < 0:
            raise errors.InvalidArgument("%s: step must be a whole count, got %r" % (where, step))
        for gi, ((mine, _), theirs) in enumerate(zip(self._torch_groups(step), saved_groups)):
            if "lr" not in theirs:
                continue
            lr = float(theirs["lr"])
            if not math.isclose(lr, mine["lr"], rel_tol=1e-9, abs_tol=1e-30):
                raise errors.InvalidArgument(
                    "%s: param_groups[%d].lr is %r, job %r's schedule gives %r at step %d: the server runs "
                    "the schedule (pass step= for another position)" % (where, gi, lr, self.job, mine["lr"], step)
                )
        params: Dict[str, ParamState] = {}
        for gi, name, kept, idx in entries:
            entry = saved_state.get(idx)
            if entry is None:
                params[name] = ParamState(0, {b: np.zeros(shapes[name], np.float32) for b in kept})
                continue
            extra = [k for k in entry if k not in kept and k != "step" and entry[k] is not None]
            missing = [b for b in kept if entry.get(b) is None]
            if extra or missing:
                raise errors.InvalidArgument(
                    "%s: state[%r] (parameter %r) holds %s; the job's optimizer keeps %s"
                    % (where, idx, name, sorted(k for k in entry if entry[k] is not None), ["step"] * adam + kept)
                )
            buffers = {}
            for b in kept:
                t = torch.as_tensor(entry[b]).detach().to("cpu", torch.float32).contiguous()
                if tuple(t.shape) != shapes[name]:
                    raise errors.InvalidArgument(
                        "%s: state[%r].%s has shape %s, parameter %r %s"
                        % (where, idx, b, tuple(t.shape), name, shapes[name])
                    )
                buffers[b] = t.numpy()
            # SGD keeps no step: a parameter with a momentum buffer has stepped.
            own = steps_of(entry, idx) if adam else (max(step, 1) if buffers else 0)
            params[name] = ParamState(own, buffers)
        return params, step

    def _check_loaded(self) -> None:
        """After a step: raises if a state loaded for it was not applied."""
        loading, self._loading = self._loading, None
        if loading is None or self.last is None:
            return
        load_round, load_id, _, _ = loading
        got = int(self.last.loaded_state)
        if self.last.round == load_round and (got == load_id if load_id else got != 0):
            return
        raise errors.FailedPrecondition(
            "the optimizer state loaded for round %d of job %r was not applied (a shard did not hold it whole "
            "when the round closed); this step ran on the previous state: load it again" % (load_round, self.job)
        )
