"""Record the ops one forward call dispatches, then replay them for later calls with inputs of
the same shape: the Python around the kernels (module calls, the exporter's bookkeeping)
runs once per input shape instead of once per call. At batch 1 that Python costs more than
the kernels of a small integer model.

Recording runs the function eagerly under a TorchDispatchMode and notes every op with its
arguments. A tensor argument is the input, the output of an earlier op, or a constant (a
weight, a cached packed weight, a grid's scale: any tensor the call did not derive from its
input; an op whose tensor arguments are all constants is a constant too and is not replayed).
Replay runs the noted ops in order on the new input and drops each intermediate after its
last use, as eager execution would. Where the compiled extension is built, a C++ plan
(`synq_kernels._C.ReplayPlan`, csrc/replay.cpp) runs them: the same ops with the same
arguments, converted once, called through the dispatcher without Python in between (the
Python loop is the fallback, and `Recording(..., compiled=False)` asks for it).

A recording is refused (and the function keeps running eagerly for that input key) when the
call turns an input-derived value into a Python number (`.item()`, `bool()`, `int()`,
`.tolist()`, `.numpy()`: the ops that follow may depend on it), or writes an input-derived
value into a constant. Callers must drop recordings when what the Python depended on changes: weights replaced or changed in
place, the backend chosen (see `synq.deploy.IntModel`)."""
from __future__ import annotations

import warnings
import weakref

import torch
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read a tensor's data into Python: control flow may depend on the value.
_TO_PYTHON = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero"}


class _Slot:
    """An argument filled from the replay's table of live tensors."""

    __slots__ = ("i",)

    def __init__(self, i):
        self.i = i


class _Step:
    __slots__ = ("op", "func", "args", "kwargs", "dyn", "nested", "outs", "free")

    def __init__(self, op, args, kwargs, outs):
        # op: the OpOverload; func: its C++ callable (what OpOverload.__call__ forwards to)
        self.op, self.func = op, getattr(op, "_op", op)
        self.args, self.kwargs, self.outs = args, kwargs, outs
        # top-level positional slots filled by index; anything nested goes through pytree
        self.dyn = [(j, a.i) for j, a in enumerate(args) if isinstance(a, _Slot)]
        self.nested = any(isinstance(leaf, _Slot) for leaf in pytree.tree_leaves(
            ([a for a in args if not isinstance(a, _Slot)], kwargs)))
        self.free = ()


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        # id(tensor) -> (weakref, slot); the weakref tells a live tensor from a later one
        # that got the id of a freed one (which is then a constant, or gets its own slot)
        self.slot_of = {}
        self.steps = []
        self.n = 0
        self.refused = None         # why this call cannot be replayed

    def slot(self, t):
        e = self.slot_of.get(id(t))
        return e[1] if e is not None and e[0]() is t else None

    def new_slot(self, t):
        self.slot_of[id(t)] = (weakref.ref(t), self.n)
        self.n += 1
        return self.n - 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.refused:
            return out
        leaves = pytree.tree_leaves((args, kwargs))
        dynamic = any(isinstance(t, torch.Tensor) and self.slot(t) is not None for t in leaves)
        if not dynamic:
            if any(isinstance(t, torch.Tensor) for t in leaves):
                return out          # a constant (folded): its value is kept as is
        elif func._schema.name.split("::")[-1] in _TO_PYTHON:
            self.refused = f"{func} reads an input-derived value into Python"
            return out
        else:
            for i, a in enumerate(func._schema.arguments):
                v = args[i] if i < len(args) else kwargs.get(a.name)
                written = a.alias_info is not None and a.alias_info.is_write
                if written and isinstance(v, torch.Tensor) and self.slot(v) is None:
                    self.refused = f"{func} writes an input-derived value into a constant"
                    return out

        def to_slot(x):
            if isinstance(x, torch.Tensor):
                s = self.slot(x)
                return x if s is None else _Slot(s)
            return x

        rec_args = pytree.tree_map(to_slot, tuple(args))
        rec_kwargs = pytree.tree_map(to_slot, kwargs)

        def out_slot(x):
            if not isinstance(x, torch.Tensor):
                return None
            s = self.slot(x)
            return s if s is not None else self.new_slot(x)

        outs = pytree.tree_map(out_slot, out)
        self.steps.append(_Step(func, rec_args, rec_kwargs, outs))
        return out


class Recording:
    """The ops of one call, replayable on inputs of the recorded shape, strides, dtype and
    device. `guard(tensors)` makes `run_if_current` refuse (return STALE) once one of those
    tensors changed in place."""

    def __init__(self, steps, n_slots, result, compiled=True):
        self.steps, self.n_slots, self.result = steps, n_slots, result
        self._guarded = ()
        # the result's slots, in the leaf order _rebuild fills them in
        self._result_slots = [leaf.i for leaf in pytree.tree_leaves(
            result, is_leaf=lambda a: isinstance(a, _Slot)) if isinstance(leaf, _Slot)]
        last = {}
        for k, st in enumerate(steps):
            for leaf in pytree.tree_leaves((st.args, st.kwargs)):
                if isinstance(leaf, _Slot):
                    last[leaf.i] = k
        kept = {leaf.i for leaf in pytree.tree_leaves(result) if isinstance(leaf, _Slot)}
        frees = {}
        for s, k in last.items():
            if s not in kept and s != 0:
                frees.setdefault(k, []).append(s)
        for k, st in enumerate(steps):
            st.free = tuple(frees.get(k, ()))
        self.plan = _compile(self) if compiled else None

    def guard(self, tensors, versions=None) -> None:
        """Remember `tensors`' version counters (none may be an inference tensor): their
        current values, or `versions` (read before the recorded call, so that a call which
        changed them in place leaves the recording stale)."""
        tensors = list(tensors)
        versions = [t._version for t in tensors] if versions is None else list(versions)
        if len(versions) != len(tensors):
            raise ValueError(f"{len(tensors)} tensors but {len(versions)} versions")
        self._guarded = list(zip(tensors, versions))
        if self.plan is not None:
            self.plan.guard(tensors, versions)

    def run_if_current(self, x):
        """The replay on x, or STALE when a guarded tensor changed since `guard`."""
        if self.plan is not None:
            out = self.plan.run(x)
            return STALE if out is None else self._rebuild(out)
        if any(t._version != v for t, v in self._guarded):
            return STALE
        return self._replay(x)

    def __call__(self, x):
        if self.plan is not None:
            return self._rebuild(self.plan.run(x, False))
        return self._replay(x)

    def _rebuild(self, tensors):
        if isinstance(self.result, _Slot):      # the common case, without pytree's walk
            return tensors[0]
        it = iter(tensors)
        return pytree.tree_map(lambda a: next(it) if isinstance(a, _Slot) else a, self.result,
                               is_leaf=lambda a: isinstance(a, _Slot))

    def _replay(self, x):
        env = [None] * self.n_slots
        env[0] = x
        for st in self.steps:
            if st.nested:
                fill = (lambda a: env[a.i] if isinstance(a, _Slot) else a)
                args = pytree.tree_map(fill, st.args, is_leaf=lambda a: isinstance(a, _Slot))
                kwargs = pytree.tree_map(fill, st.kwargs,
                                         is_leaf=lambda a: isinstance(a, _Slot))
            else:
                args, kwargs = st.args, st.kwargs
                if st.dyn:
                    args = list(args)
                    for j, s in st.dyn:
                        args[j] = env[s]
            out = st.func(*args, **kwargs)
            outs = st.outs
            if isinstance(outs, int):
                env[outs] = out
            elif outs is not None:
                for o, t in zip(pytree.tree_leaves(outs), pytree.tree_leaves(out)):
                    if isinstance(o, int):
                        env[o] = t
            for s in st.free:
                env[s] = None
        return self._rebuild([env[s] for s in self._result_slots])


STALE = object()     # run_if_current's answer when a guarded tensor changed

_TENSOR_TYPES = ("Tensor", "Optional[Tensor]")
_TENSOR_LISTS = ("List[Tensor]", "List[Optional[Tensor]]")


def _has_slot(tree) -> bool:
    return any(isinstance(leaf, _Slot) for leaf in pytree.tree_leaves(tree))


def _step_spec(st: _Step):
    """add_step's arguments for st, or None when the C++ plan cannot run it: a slot somewhere
    other than a Tensor argument or an element of a list of tensors, or outputs nested
    deeper than a list."""
    schema = st.op._schema
    params = schema.arguments
    names = [a.name for a in params]
    dyn, lists = [], []

    def place(pos, a):
        if isinstance(a, _Slot):
            if str(params[pos].type) not in _TENSOR_TYPES:
                return None
            dyn.append((pos, a.i))
            return _PLACEHOLDER
        if isinstance(a, (list, tuple)) and _has_slot(a):
            if str(params[pos].type) not in _TENSOR_LISTS:
                return None
            for k, e in enumerate(a):
                if isinstance(e, _Slot):
                    lists.append((pos, k, e.i))
                elif _has_slot(e):
                    return None
            return [_PLACEHOLDER if isinstance(e, _Slot) else e for e in a]
        return None if _has_slot(a) else a

    args = []
    for pos, a in enumerate(st.args):
        v = place(pos, a)
        if v is None and a is not None:
            return None
        args.append(v)
    kwargs = {}
    for k, a in st.kwargs.items():
        v = place(names.index(k), a)
        if v is None and a is not None:
            return None
        kwargs[k] = v
    n_ret = len(schema.returns)
    per_return = [st.outs] if n_ret == 1 else (
        [None] * n_ret if st.outs is None else list(st.outs))
    outs = []
    for o in per_return:
        if o is None or isinstance(o, int):
            outs.append([-1 if o is None else o])
        elif isinstance(o, (list, tuple)) and all(e is None or isinstance(e, int) for e in o):
            outs.append([-1 if e is None else e for e in o])
        else:
            return None
    return (schema.name, schema.overload_name, tuple(args), kwargs, dyn, lists, outs,
            list(st.free))


_PLACEHOLDER = torch.empty(0)


def _compile(rec: Recording):
    """The C++ plan of rec's steps, or None (no compiled extension, or a step it cannot run)."""
    from synq_kernels import _ext
    if not _ext.has_cpu_kernels():
        return None
    from synq_kernels import _C
    try:
        specs = [_step_spec(st) for st in rec.steps]
        if any(spec is None for spec in specs):
            return None
        plan = _C.ReplayPlan(rec.n_slots, rec._result_slots)
        for spec in specs:
            plan.add_step(*spec)
    except Exception as e:  # noqa: BLE001 - the Python loop runs any recording
        warnings.warn(f"synq.replay: no C++ plan for this recording ({type(e).__name__}: {e}); "
                      "it replays in Python", RuntimeWarning, stacklevel=2)
        return None
    return plan


class _DataReads(TorchFunctionMode):
    """Refuses the recording when the call reads an input-derived tensor's values into Python
    by a path that dispatches no op (`tolist()`, `numpy()`): control flow may depend on them."""

    READS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy",
             torch.Tensor.__array__: "__array__", torch.Tensor.__dlpack__: "__dlpack__"}

    def __init__(self, rec: _Recorder):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self.READS.get(func)
        if (name is not None and not self.rec.refused and args
                and isinstance(args[0], torch.Tensor) and self.rec.slot(args[0]) is not None):
            self.rec.refused = f"Tensor.{name} reads an input-derived value into Python"
        return func(*args, **(kwargs or {}))


def record(fn, x: torch.Tensor):
    """(fn(x), a Recording of the call or None, why None): the call runs eagerly while its
    ops are noted; a call that cannot be replayed (see the module docstring) still returns
    its result."""
    rec = _Recorder()
    rec.new_slot(x)
    with rec, _DataReads(rec):
        out = fn(x)
    if rec.refused:
        return out, None, rec.refused

    def res(t):
        if isinstance(t, torch.Tensor):
            s = rec.slot(t)
            return t if s is None else _Slot(s)
        return t

    result = pytree.tree_map(res, out)
    return out, Recording(rec.steps, rec.n, result), None


def input_key(x: torch.Tensor) -> tuple:
    return (tuple(x.shape), x.stride(), x.dtype, x.device)
